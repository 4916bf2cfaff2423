"""The protocol: one seed of one method, a grid of methods x attributes x seeds, and rebuilding a saved model."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from fairbook import protocol
from fairbook.data.fairvlmed import FairVLMed
from fairbook.data.synthetic import SynthConfig, generate
from fairbook.methods import CLIP, FairCLIP, FairMoE, Method, MethodError, method_from_record
from fairbook.methods.fair_moe import routers
from fairbook.results import ResultsError, model_folder
from fairbook.train import FAIRMEDFM_PROMPTS, TrainConfig, zero_shot_scores

pytestmark = pytest.mark.usefixtures("one_thread")
CALLS: list = []
MOE = dict(n_experts=2, top_k=1, feature_experts=2, feature_top_k=1)


@dataclass(frozen=True)
class Probe(Method):
    """A method that adds Fair-MoE's layers and records what its regulariser was given (a zero loss term)."""

    name: str = "Probe"
    uses_attribute = True

    def adapt(self, model, tokenizer=None):
        return FairMoE(layers=MOE).adapt(model)

    def regulariser(self, model, train, attribute, seed, batch_size):
        CALLS.append((len(routers(model)), len(train), attribute, seed, batch_size))
        return lambda image, text, scale, batch: image.sum() * 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol") / "data"
    generate(root, SynthConfig.preset("default", n_train=48, n_val=32, n_test=32), progress=False)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-4, warmup_steps=0, prompts="fairmedfm")
    return protocol.Setup(data_root=str(root), config=config, n_train=20)


def test_train_one_adapts_regularises_saves_and_reloads(setup, tmp_path):
    CALLS.clear()
    fit = protocol.train_one(tmp_path / "run", Probe(), setup, seed=3, attribute="race")
    assert CALLS == [(4, 20, "race", 3, 8)]  # patched (four routers) before the hook saw the 20 drawn pairs
    folder = tmp_path / "run" / "predictions" / "Probe" / "race" / "seed-3"
    assert fit["folder"] == folder
    test = pd.read_csv(folder / "test.csv")
    assert len(test) == len(FairVLMed(setup.data_root, "Test")) and set(test["split"]) == {"test"}
    info = json.loads((folder / "info.json").read_text())
    assert info["n_train"] == 20 and info["data"].startswith("SynthFairVLMed (synthetic")
    assert info["method"] == {"class": "test_protocol.Probe", "settings": {"name": "Probe"}}
    assert info["checkpoint"] == "checkpoints/Probe/race/seed-3/best.pt"
    # the reloaded model (method record replayed, kept epoch loaded) reproduces the saved test scores
    net, preprocess, tokenizer = protocol.load_model(tmp_path / "run", "Probe", "race", 3)
    assert len(routers(net)) == 4
    loader = DataLoader(FairVLMed(setup.data_root, "Test", preprocess, tokenizer), batch_size=16)
    scores = zero_shot_scores(net, tokenizer, loader, FAIRMEDFM_PROMPTS)
    np.testing.assert_allclose(scores[1], test["y_score"].to_numpy(), atol=1e-5)
    with pytest.raises(ResultsError, match="no saved model 'Other'"):
        protocol.load_model(tmp_path / "run", "Other", "race", 3)


def test_a_seed_gives_the_same_predictions_in_a_grid_as_alone(setup, tmp_path):
    rows = protocol.train_grid(tmp_path / "grid", [CLIP(), FairCLIP(lam=10.0)], setup, seeds=[0, 1],
                               attributes=["race", "gender"])
    assert rows[["method", "attribute", "seed"]].values.tolist() == [
        ["CLIP", "all", 0], ["CLIP", "all", 1],
        ["FairCLIP", "race", 0], ["FairCLIP", "race", 1], ["FairCLIP", "gender", 0], ["FairCLIP", "gender", 1]]
    # the grid keeps the preprocessed evaluation splits between runs; alone, they are read afresh
    alone = protocol.train_one(tmp_path / "alone", FairCLIP(lam=10.0), setup, seed=1, attribute="gender")
    for split in ("validation", "test"):  # byte for byte: runs do not depend on what ran before them
        last = rows["folder"].iloc[-1]
        assert (last / f"{split}.csv").read_bytes() == (alone["folder"] / f"{split}.csv").read_bytes()
    history = protocol.histories(rows)
    assert len(history) == 6 and set(history.columns) >= {"method", "attribute", "seed", "epoch", "val_auc"}


def test_attribute_use_must_match_the_method(setup, tmp_path):
    with pytest.raises(ResultsError, match="CLIP uses no attribute: pass attribute='all'"):
        protocol.train_one(tmp_path, CLIP(), setup, 0, attribute="race")
    with pytest.raises(ResultsError, match="FairCLIP trains for an attribute: pass attribute=one of race"):
        protocol.train_one(tmp_path, FairCLIP(), setup, 0)
    with pytest.raises(ResultsError, match="two methods share a name"):
        protocol.train_grid(tmp_path, [CLIP(), CLIP()], setup, seeds=[0])
    with pytest.raises(ResultsError, match="unknown training attribute 'sex': use one of race, gender"):
        protocol.train_grid(tmp_path, [FairCLIP()], setup, seeds=[0], attributes=["sex"])
    assert not (tmp_path / "predictions").exists()  # refused before anything trained


def test_methods_round_trip_through_their_records():
    for method in (CLIP(), FairCLIP(lam=3.0, form="code"), FairMoE(name="w/o FOL", layers=MOE, fol=None),
                   FairMoE(name="FairCLIP w. FO-MoE", layers=MOE, fol=None, fairclip={"lam": 5.0})):
        assert method_from_record(json.loads(json.dumps(method.record()))) == method
    assert not FairMoE(fol=None).uses_attribute and FairMoE().uses_attribute and FairCLIP.uses_attribute
    assert FairCLIP(lam=3.0).describe() == "FairCLIP (lam=3.0)" and CLIP().describe() == "CLIP"
    with pytest.raises(MethodError, match="choose one loss"):
        FairMoE(fairclip={"lam": 1.0})
    with pytest.raises(MethodError, match="unknown method class 'nowhere.Thing'"):
        method_from_record({"class": "nowhere.Thing"})


def test_build_model_is_seeded_and_adapted(setup):
    a, *_ = protocol.build_model(FairMoE(layers=MOE), setup, seed=4)
    b, *_ = protocol.build_model(FairMoE(layers=MOE), setup, seed=4)
    gates = [n for n, _ in a.named_parameters() if "gate" in n]
    assert gates and all(torch.equal(dict(a.named_parameters())[n], dict(b.named_parameters())[n]) for n in gates)


def test_choose_on_validation_never_reads_test_and_applies_the_declared_criterion(setup, tmp_path):
    candidates = [FairCLIP(f"FairCLIP (lam={lam})", lam=lam) for lam in (1.0, 100.0)]
    chosen, table = protocol.choose_on_validation(tmp_path, candidates, setup, seeds=[0], attributes=["race"])
    assert list(table["method"]) == ["FairCLIP (lam=1.0)", "FairCLIP (lam=100.0)"]
    assert not list(tmp_path.rglob("test.csv"))  # the test split was never scored
    # the criterion, recomputed by hand from the saved validation predictions
    from sklearn.metrics import roc_auc_score

    def by_hand(name):
        val = pd.read_csv(model_folder(tmp_path, name, "race", 0) / "validation.csv")
        auc = roc_auc_score(val["y_true"], val["y_score"])
        deviations = sum(abs(auc - roc_auc_score(g["y_true"], g["y_score"])) for _, g in val.groupby("race")
                         if g["y_true"].nunique() == 2)  # a group with one class has no AUC and is left out
        return auc, auc / (1 + deviations)

    hand = {m.name: by_hand(m.name) for m in candidates}
    for row in table.itertuples():
        assert (row.val_auc, row.val_es_auc) == pytest.approx(hand[row.method])
    best_auc = max(a for a, _ in hand.values())
    eligible = {n: e for n, (a, e) in hand.items() if a >= best_auc - 0.01}
    assert chosen.name == max(eligible, key=eligible.get) and table["chosen"].sum() == 1
    renamed, _ = protocol.choose_on_validation(tmp_path, candidates, setup, [0], ["race"], name="FairCLIP")
    assert renamed == chosen.replace(name="FairCLIP") and renamed.lam == chosen.lam
    with pytest.raises(ResultsError, match="share a name"):
        protocol.choose_on_validation(tmp_path, candidates * 2, setup, seeds=[0], attributes=["race"])


def test_saved_method_returns_the_method_as_trained(setup, tmp_path):
    method = FairCLIP(lam=7.0)
    protocol.train_one(tmp_path, method, setup, seed=0, attribute="race")
    assert protocol.saved_method(tmp_path, "FairCLIP") == method
    with pytest.raises(ResultsError, match="holds no saved model of 'CLIP'"):
        protocol.saved_method(tmp_path, "CLIP")
    protocol.train_one(tmp_path, FairCLIP(lam=8.0), setup, seed=1, attribute="race")
    with pytest.raises(ResultsError, match="models with different settings"):
        protocol.saved_method(tmp_path, "FairCLIP")
