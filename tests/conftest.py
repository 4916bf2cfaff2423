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
    from fairbook.files import resolve

    root = resolve(SMOKE_DATA)
    sizes = dict(n_train=240, n_val=80, n_test=120)
    generate(root, SynthConfig.preset("default", **sizes), progress=False)
    generate(resolve(SMOKE_CONTROL), SynthConfig.preset("none", **sizes), progress=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CPU runs: one thread is nearly as fast and leaves the other core to the rest of the suite."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip():
    """(model, preprocess_train, preprocess_val, tokenizer) of a randomly initialised fairbook-tiny CLIP on CPU."""
    import torch

    from fairbook.models import create_clip

    torch.manual_seed(0)
    return create_clip("fairbook-tiny", device="cpu")


@pytest.fixture()
def model(clip):
    """A fresh copy of the same randomly initialised tiny CLIP for every test."""
    import copy

    return copy.deepcopy(clip[0])


def pytest_terminal_summary(terminalreporter):
    """Say loudly when the browser checks of the book did not run (no Chromium), so a green run is not mistaken
    for a checked book."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "browser" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_sep("!", f"BROWSER CHECKS DID NOT RUN: {len(skipped)} skipped (no Chromium); "
                                        "run `make browser` as root or `bash .ci/run`", red=True, bold=True)
