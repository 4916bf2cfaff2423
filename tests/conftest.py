"""Shared fixtures: the smoke-sized SynthFairVLMed that notebooks read under params/<stem>/smoke.yaml."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOKE_DATA = "data/synth-smoke"
SMOKE_CONTROL = "data/synth-smoke-nobias"  # the bias-free twin (preset "none")


@pytest.fixture(scope="session")
def smoke_data():
    """Write (once; the generator is idempotent) the small datasets the smoke parameters point at."""
    from fairbook.data.synthetic import SynthConfig, generate
    from fairbook.runs import resolve

    root = resolve(SMOKE_DATA)
    sizes = dict(n_train=240, n_val=80, n_test=120)
    generate(root, SynthConfig.preset("default", **sizes), progress=False)
    generate(resolve(SMOKE_CONTROL), SynthConfig.preset("none", **sizes), progress=False)
    return root
