"""environment.yml (conda users) lists the same packages as pyproject.toml (pip users)."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"pytorch": "torch", "open-clip-torch": "open_clip_torch"}
NOT_PYTHON_PACKAGES = {"python", "pip", "nodejs"}


def _name(spec: str) -> str:
    name = re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()
    return CONDA_NAMES.get(name, name).replace("-", "_")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_side = {_name(s) for s in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_side = {_name(s) for s in env["dependencies"] if isinstance(s, str)} - NOT_PYTHON_PACKAGES
    assert conda_side == pip_side, f"only in environment.yml: {conda_side - pip_side}; only in pyproject: {pip_side - conda_side}"
    pip_block = next(s["pip"] for s in env["dependencies"] if isinstance(s, dict))
    assert "-e .[dev]" in pip_block


def test_torch_floor_is_the_same():
    project = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.14"' in project
    assert "pytorch>=2.14" in (ROOT / "environment.yml").read_text()
