"""environment.yml (conda users) lists the same packages as pyproject.toml (pip users)."""
import re
from pathlib import Path

import tomllib
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
    assert conda_side == pip_side, (f"only in environment.yml: {conda_side - pip_side}; "
                                    f"only in pyproject: {pip_side - conda_side}")
    pip_block = next(s["pip"] for s in env["dependencies"] if isinstance(s, dict))
    assert "-e .[dev]" in pip_block


def test_torch_floor_is_the_same():
    project = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.14"' in project
    assert "pytorch>=2.14" in (ROOT / "environment.yml").read_text()


def test_jupyterlab_opens_chapters_as_notebooks_in_this_venv():
    """make setup writes the venv's JupyterLab settings: a .py file opens with jupytext's notebook viewer."""
    import json
    import subprocess
    import sys

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        import pytest

        pytest.skip("not the project's .venv (made by make setup)")
    overrides = json.loads((Path(sys.prefix) / "share/jupyter/lab/settings/overrides.json").read_text())
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["python"] == "Jupytext Notebook"
    extensions = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                                text=True)
    assert "jupyterlab-jupytext" in extensions.stdout + extensions.stderr  # the viewer the setting names exists
    header = (ROOT / "notebooks" / "11-clip-baseline.py").read_text().split("# ---")[1]
    assert "name: fairbook" in header  # and the chapter asks for the fairbook kernel
