"""FairMedFM on the harness: the usages (linear probe, CLIP-Adapt, LoRA, full fine-tuning) and the mitigations
(resampling, GroupDRO), each trained through the one loop and checked against hand or library values."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from fairbook import protocol
from fairbook.data.fairvlmed import FairVLMed
from fairbook.data.synthetic import SynthConfig, generate
from fairbook.methods import FairMedFM, MethodError
from fairbook.mitigations import LAFTR, laftr_adversary_objective
from fairbook.models import ImageClassifier, PromptClassifier, add_lora, lora_parameters
from fairbook.train import FAIRMEDFM_PROMPTS, Classification, TrainConfig, fit, zero_shot_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, clip):
    _, preprocess_train, preprocess_val, tokenizer = clip
    root = tmp_path_factory.mktemp("fairmedfm") / "data"
    generate(root, SynthConfig.preset("default", n_train=96, n_val=32, n_test=32), progress=False)
    return {"root": str(root), "train": FairVLMed(root, "Training", preprocess_train, tokenizer).subset(32, 0),
            "val": FairVLMed(root, "Validation", preprocess_val, tokenizer),
            "full_train": FairVLMed(root, "Training", preprocess_train, tokenizer)}


def recipe(**changes) -> TrainConfig:
    return TrainConfig.preset("fairmedfm", **{"epochs": 1, "batch_size": 16, **changes})


def changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def test_lora_gives_every_adapter_tensor_a_gradient_and_freezes_the_rest(clip):
    visual = add_lora(copy.deepcopy(clip[0].visual), rank=4, alpha=8, mlp=True)
    adapters = lora_parameters(visual)
    blocks = len(visual.transformer.resblocks)
    # per block: attention (in and out projections, A and B each) and the two MLP linears (A and B each)
    assert len(adapters) == blocks * (4 + 4)
    assert {n for n, p in visual.named_parameters() if p.requires_grad} == set(adapters)
    optimizer = torch.optim.SGD(list(adapters.values()), lr=0.1)
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # B starts at zero, so A's gradient is zero until B has moved once
        optimizer.zero_grad()
        visual(images).pow(2).sum().backward()
        optimizer.step()
    zero = [name for name, p in adapters.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert zero == []


def test_lora_on_out_proj_alone_trains_nothing_which_is_why_add_lora_targets_the_attention(clip):
    from peft import LoraConfig, inject_adapter_in_model

    visual = copy.deepcopy(clip[0].visual)
    targets = [f"transformer.resblocks.{i}.attn.out_proj" for i in range(len(visual.transformer.resblocks))]
    visual = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), visual)
    for name, param in visual.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # even with B non-zero no gradient arrives
    assert lora_parameters(visual)  # the adapters exist and are trainable ...
    assert not visual(torch.randn(2, 3, 96, 96)).requires_grad  # ... but no path leads from them to the output


def test_clip_adapt_starts_as_zero_shot_and_trains_only_the_prototypes(clip, data, tmp_path):
    model, _, _, tokenizer = clip
    net = FairMedFM("CLIP-Adapt", usage="clip-adapt").adapt(copy.deepcopy(model), tokenizer)
    assert isinstance(net, PromptClassifier)
    loader = DataLoader(data["val"], batch_size=16)
    y, p_zero_shot, _ = zero_shot_scores(net.clip, tokenizer, loader, FAIRMEDFM_PROMPTS)
    y_start, p_start, _ = Classification().scores(net, loader)
    np.testing.assert_allclose(p_start, p_zero_shot, rtol=1e-5, atol=1e-6)  # sigmoid of the logit difference
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit(net, data["train"], data["val"], recipe(), tmp_path, Classification(), progress=False)
    assert changed(before, net) == {"prototypes"}


@pytest.mark.parametrize("usage, trains", [("lp", {"head.weight", "head.bias"}),
                                           ("ft", None),  # the head and every image-tower tensor
                                           ("lora", "lora")])
def test_each_usage_trains_what_it_says(clip, data, tmp_path, usage, trains):
    net = FairMedFM(usage=usage).adapt(copy.deepcopy(clip[0]), clip[3])
    assert isinstance(net, ImageClassifier)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fit(net, data["train"], data["val"], recipe(), tmp_path, Classification(), progress=False)
    moved = changed(before, net)
    if usage == "lp":
        assert moved == trains
    elif usage == "ft":
        assert {"head.weight", "head.bias", "visual.conv1.weight", "visual.proj"} <= moved
    else:
        assert {"head.weight", "head.bias"} <= moved and any("lora_" in k for k in moved)
        state = net.state_dict()
        frozen = {k for k in moved if not k.startswith("head.") and "lora_" not in k}
        # peft merges the adapters into nn.MultiheadAttention's weights for each forward and subtracts them
        # again: the frozen weights come back up to float rounding, they are not trained
        assert frozen and all(k.endswith(("in_proj_weight", "out_proj.base_layer.weight")) for k in frozen)
        assert max(float((state[k] - before[k]).abs().max()) for k in frozen) < 1e-6


def test_resampling_draws_attribute_by_label_cells_equally_often(data):
    train = data["full_train"]
    method = FairMedFM("LP + resampling", mitigation="resampling")
    cells = train.metadata["race"].astype(str) + " x " + train.metadata["glaucoma"].astype(str)
    draws = np.concatenate([cells.to_numpy()[list(method.sampler(train, "race", seed))] for seed in range(200)])
    counts = draws_by_cell = np.unique(draws, return_counts=True)[1]
    assert len(draws_by_cell) == cells.nunique()
    assert chisquare(counts).pvalue > 1e-3                                 # balanced: uniform over the cells
    assert chisquare(np.unique(cells, return_counts=True)[1]).pvalue < 1e-6  # the data itself is not
    by_attribute = FairMedFM(mitigation="resampling", resample_by="attribute").sampler(train, "race", 0)
    race = train.metadata["race"].to_numpy()
    drawn = np.concatenate([race[list(by_attribute)] for _ in range(50)])
    assert chisquare(np.bincount(drawn)).pvalue > 1e-3
    assert FairMedFM().sampler(train, "race", 0) is None


def test_group_dro_uses_the_training_groups_with_unknown_as_its_own(data):
    train = data["full_train"].subset(40, 0)
    train.metadata.loc[train.metadata.index[:3], "ethnicity"] = -1  # at least three unknowns
    objective = FairMedFM("LP + GroupDRO", mitigation="groupdro", dro_adjustment=1.0).objective(
        None, train, "ethnicity", 0, recipe(), None)
    dro = objective.reduce
    codes = train.metadata["ethnicity"].to_numpy()
    expected = [int((codes == 0).sum()), int((codes == 1).sum()), int((codes == -1).sum())]
    expected = [n for n in expected if n > 0]
    assert dro.n_groups == len(expected)
    np.testing.assert_allclose(dro.adjust.numpy(), 1.0 / np.sqrt(expected), rtol=1e-6)
    assert objective.column == 2
    losses = torch.tensor([1.0, 2.0, 4.0])
    batch = {"attributes": torch.tensor([[0, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 0]])}
    groups = objective.groups(batch)
    assert groups.tolist() == [0, dro.n_groups - 1, 0]                    # unknown: the last group
    out = objective.reduce(losses, groups)
    group_loss = np.zeros(dro.n_groups)
    group_loss[0], group_loss[-1] = 2.5, 2.0
    q = np.exp(0.01 * (group_loss + 1.0 / np.sqrt(expected)))
    q /= q.sum()
    assert float(out) == pytest.approx(float(q @ group_loss), rel=1e-6)


def test_a_usage_with_a_mitigation_trains_saves_and_reloads_through_the_protocol(data, tmp_path):
    setup = protocol.Setup(data["root"], recipe(), n_train=32)
    method = FairMedFM("LoRA + GroupDRO", usage="lora", mitigation="groupdro")
    fit_result = protocol.train_one(tmp_path / "run", method, setup, seed=1, attribute="race")
    y, p, _ = fit_result["scores"]["test"]
    net, preprocess_val, _ = protocol.load_model(tmp_path / "run", "LoRA + GroupDRO", "race", 1)
    test = FairVLMed(data["root"], "Test", preprocess_val)
    _, p_again, _ = Classification().scores(net, DataLoader(test, batch_size=16))
    np.testing.assert_allclose(p_again, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(MethodError, match="usage='nope' is not known"):
        FairMedFM(usage="nope")


# ----------------------------------------------------------------------------------------------------------- LAFTR
def test_laftr_objective_of_each_form_by_hand():
    # two groups; the adversary's probability of the true group: 0.9, 0.6 (group 0), 0.7, 0.2 (group 1)
    probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    groups, labels = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 1, 1])
    errors = [0.1, 0.4, 0.3, 0.8]
    dp = 1 - ((errors[0] + errors[1]) / 2 + (errors[2] + errors[3]) / 2)      # 1 - sum_a mean_{D_a} |h - a|
    eo = 2 - (errors[0] + errors[1] + (errors[2] + errors[3]) / 2)           # cells (0,1), (0,0), (1,1)
    assert float(laftr_adversary_objective(probabilities, groups, labels, "dp")) == pytest.approx(dp)
    assert float(laftr_adversary_objective(probabilities, groups, labels, "eo")) == pytest.approx(eo)


@pytest.mark.parametrize("form", ["dp", "eo"])
def test_one_laftr_step_moves_the_adversary_up_its_objective_and_the_encoder_down(form):
    torch.manual_seed(0)
    features = torch.randn(6, 3, requires_grad=True)
    groups, labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 1, 0, 0, 1])
    laftr = LAFTR(3, 3, form=form, coefficient=0.1)
    term = laftr(features, groups, labels)
    term.backward()
    # by hand: the same objective without the reversal, differentiated directly
    seen = features.detach().clone().requires_grad_(True)
    inputs = seen if form == "dp" else torch.cat([seen, labels.float().view(-1, 1)], 1)
    objective = laftr_adversary_objective(laftr.adversary(inputs).softmax(-1), groups, labels, form)
    grad_features, *grad_adversary = torch.autograd.grad(objective, [seen, *laftr.adversary.parameters()])
    assert float(term.detach()) == pytest.approx(-0.1 * float(objective.detach()), rel=1e-6)
    for param, grad in zip(laftr.adversary.parameters(), grad_adversary):  # descent on -0.1 L: the adversary
        torch.testing.assert_close(param.grad, -0.1 * grad)                   # climbs L
    torch.testing.assert_close(features.grad, 0.1 * grad_features)           # reversed: the encoder descends L


def test_laftr_on_a_linear_probe_trains_a_projection_and_leaves_the_encoder_frozen(clip, data, tmp_path):
    method = FairMedFM("LP + LAFTR", mitigation="laftr", laftr_form="eo")
    net = method.adapt(copy.deepcopy(clip[0]), clip[3])
    objective = method.objective(net, data["train"], "race", 0, recipe(), clip[3])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adversary = {k: v.clone() for k, v in objective.adversary.state_dict().items()}
    result = fit(net, data["train"], data["val"], recipe(lr=3e-4), tmp_path, objective, progress=False)
    assert changed(before, net) == {"projection.weight", "projection.bias", "head.weight", "head.bias"}
    assert changed(adversary, objective.adversary) == {"adversary.weight", "adversary.bias"}
    assert result["history"][0]["reg_loss"] != 0.0                           # the adversary's term entered
    with pytest.raises(MethodError, match="CLIP-Adapt trains only the class prototypes"):
        FairMedFM(usage="clip-adapt", mitigation="laftr")


# ------------------------------------------------------------------------------------------- zero-shot and Table 2
def test_zero_shot_use_scores_the_start_through_the_protocol_without_a_step(clip, data, tmp_path):
    setup = protocol.Setup(data["root"], recipe(epochs=3), n_train=32)
    method = FairMedFM("Zero-shot", usage="zero-shot")
    fit_result = protocol.train_one(tmp_path / "run", method, setup, seed=0)
    assert [h["epoch"] for h in fit_result["history"]] == [0] and fit_result["steps"] == 0
    net, _, preprocess_val, tokenizer = protocol.build_model(method, setup, 0)
    test = FairVLMed(data["root"], "Test", preprocess_val, tokenizer)
    y, p, _ = zero_shot_scores(net, tokenizer, DataLoader(test, batch_size=16), FAIRMEDFM_PROMPTS)
    np.testing.assert_allclose(fit_result["scores"]["test"][1], p, rtol=1e-5, atol=1e-6)
    saved = pd.read_csv(fit_result["folder"] / "test.csv")  # the age is saved in whole years, for age >= 60
    assert saved["age"].tolist() == np.floor(test.metadata["age"]).astype(int).tolist()
    with pytest.raises(MethodError, match="zero-shot use trains nothing"):
        FairMedFM(usage="zero-shot", mitigation="groupdro")


def test_binary_attributes_are_fairmedfms():
    from fairbook.data import binarise, source_attribute

    assert binarise("race-binary", ["Asian", "Black", "White"]) == ["non-White", "non-White", "White"]
    assert binarise("language-binary", ["English", "Spanish", "Unknown"]) == ["English", "non-English", "non-English"]
    assert binarise("sex", ["Female", "Male"]) == ["Female", "Male"] and source_attribute("sex") == "gender"
    assert binarise("age-60", [59, 60, 61.5, "75"]) == ["< 60", ">= 60", ">= 60", ">= 60"]
    with pytest.raises(ValueError, match="unknown binary attribute 'age'"):
        binarise("age", [60])


def test_table2_rows_are_the_seed_means_of_the_report(tmp_path):
    """Table 2 of two seeds of one model on sex, by hand: AUC_ES = AUC / (1 + |AUC_F - AUC_M| / 2)."""
    from fairbook import results, tables

    rng = np.random.default_rng(0)
    n = 200
    frames = {}
    for seed in (0, 1):
        y = rng.integers(0, 2, n)
        p = np.clip(0.3 * y + rng.random(n) * 0.8, 0, 1)
        codes = np.column_stack([rng.integers(0, 3, n), rng.integers(0, 2, n), np.zeros(n), np.zeros(n)])
        results.save(tmp_path, "LP", seed, {"validation": (y, p, codes), "test": (y, p, codes)}, "synthetic",
                     {}, "all")
        frames[seed] = pd.DataFrame({"y": y, "p": p, "sex": np.where(codes[:, 1] == 0, "Female", "Male"),
                                     "white": codes[:, 0] == 2})
    evals = tables.evaluate(results.collect(tmp_path), attributes=["sex", "race-binary"], n_boot=0)
    row = tables.table2(evals, "sex").loc["LP"]
    from sklearn.metrics import roc_auc_score

    auc = [roc_auc_score(f["y"], f["p"]) for f in frames.values()]
    female = [roc_auc_score(f["y"][f["sex"] == "Female"], f["p"][f["sex"] == "Female"]) for f in frames.values()]
    male = [roc_auc_score(f["y"][f["sex"] == "Male"], f["p"][f["sex"] == "Male"]) for f in frames.values()]
    es = [a / (1 + abs(f - m) / 2) for a, f, m in zip(auc, female, male)]
    assert row["AUC ↑"] == f"{100 * np.mean(auc):.2f} ± {100 * np.std(auc, ddof=1):.2f}".replace(" ", "\u00a0")
    assert row["AUC_Female"].startswith(f"{100 * np.mean(female):.2f}")
    assert row["AUC_ES ↑"].startswith(f"{100 * np.mean(es):.2f}") and row["seeds"] == 2
    white = tables.table2(evals, "race-binary")
    assert list(white.columns[:3]) == ["AUC ↑", "AUC_White", "AUC_non-White"]


def test_reuse_reads_another_chapters_models_only_when_trained_the_same_way(data, tmp_path):
    from fairbook.results import ResultsError

    setup = protocol.Setup(data["root"], recipe(), n_train=32)
    protocol.train_one(tmp_path / "usages", FairMedFM("LP", usage="lp"), setup, seed=0)
    rows = protocol.reuse(tmp_path / "usages", ["LP"], setup, [0])
    assert rows[["method", "attribute", "seed"]].to_dict("records") == [{"method": "LP", "attribute": "all",
                                                                        "seed": 0}]
    with pytest.raises(ResultsError, match=r"was trained with config .*not .*'lr': 0.001"):
        protocol.reuse(tmp_path / "usages", ["LP"], setup.replace(config=recipe(lr=1e-3)), [0])
    with pytest.raises(ResultsError, match="no saved 'LP' at seed 1"):
        protocol.reuse(tmp_path / "usages", ["LP"], setup, [0, 1])
    with pytest.raises(ResultsError, match="trained on 32 pairs, not 16"):
        protocol.reuse(tmp_path / "usages", ["LP"], setup.replace(n_train=16), [0])


def test_the_as_coded_threshold_is_best_f1_on_the_test_predictions(tmp_path):
    from fairbook import results, tables
    from fairbook.metrics import choose_threshold
    from fairbook.results import ResultsError

    rng = np.random.default_rng(1)
    y_val, y_test = rng.integers(0, 2, 80), rng.integers(0, 2, 80)
    p_val, p_test = rng.random(80), np.clip(0.4 * y_test + 0.7 * rng.random(80), 0, 1)
    codes = np.column_stack([np.zeros(80), rng.integers(0, 2, 80), np.zeros(80), np.zeros(80)])
    results.save(tmp_path, "LP", 0, {"validation": (y_val, p_val, codes), "test": (y_test, p_test, codes)},
                 "synthetic", {}, "all")
    runs = results.collect(tmp_path)
    honest = tables.evaluate(runs, ["sex"], n_boot=0, threshold="f1")
    as_coded = tables.evaluate(runs, ["sex"], n_boot=0, threshold="f1", threshold_from="test")
    assert honest["threshold"].iloc[0] == pytest.approx(choose_threshold(y_val, p_val, "f1"))
    assert as_coded["threshold"].iloc[0] == pytest.approx(choose_threshold(y_test, p_test, "f1"))
    assert as_coded["threshold_from"].iloc[0] == "test" and as_coded["auc"].iloc[0] == honest["auc"].iloc[0]
    with pytest.raises(ResultsError, match="threshold_from='train'"):
        tables.evaluate(runs, ["sex"], n_boot=0, threshold_from="train")


def test_the_released_codes_recipe_plain_sgd_and_class_weighted_loss_by_hand(data):
    from fairbook.train import _optimizer

    config = TrainConfig.preset("fairmedfm-code")
    optimizer = _optimizer([torch.nn.Parameter(torch.zeros(2))], config)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.0
    objective = FairMedFM(class_weighted=True).objective(None, data["train"], "all", 0, config, None)
    labels = data["train"].metadata["glaucoma"].to_numpy()
    n1 = labels.sum()
    assert objective.class_weights.tolist() == pytest.approx([len(labels) / (2 * (len(labels) - n1)),
                                                              len(labels) / (2 * n1)])

    class Constant(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([0.0, 2.0, -1.0])

    batch = {"image": torch.zeros(3, 1), "label": torch.tensor([1, 0, 0])}
    loss, _ = Classification(class_weights=(0.5, 3.0)).loss(Constant(), batch)
    hand = (3.0 * np.log(2) + 0.5 * np.log(1 + np.exp(2.0)) + 0.5 * np.log(1 + np.exp(-1.0))) / 3
    assert float(loss) == pytest.approx(hand, rel=1e-6)


def test_wide_points_put_each_mean_and_interval_in_columns():
    from fairbook.tables import wide_points

    long = pd.DataFrame({"method": ["LP", "LP", "LoRA", "LoRA"], "group": ["Female", "Male"] * 2,
                         "mean": [0.8, 0.7, 0.9, 0.6], "lo": [0.75, 0.6, 0.85, 0.5], "hi": [0.85, 0.8, 0.95, 0.7]})
    points = wide_points(long, "method", "group").set_index("method")
    assert points.loc["LoRA", ["Female", "Female_lo", "Male_hi"]].tolist() == pytest.approx([90.0, 85.0, 70.0])
    assert points.loc["LP", "Male"] == pytest.approx(70.0)


def test_the_head_starts_at_zero_so_adams_first_step_follows_the_class_difference(clip):
    """Learnability by design: from a zero head, Adam's first step is lr * sign(-dL/dw) for every weight, and
    at zero logits dL/dw = mean((0.5 - y) z): the step points along the class difference of the features."""
    from fairbook.train import _optimizer

    model = ImageClassifier(copy.deepcopy(clip[0].visual).requires_grad_(False))
    assert not model.head.weight.detach().any() and not model.head.bias.detach().any()
    images = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    with torch.no_grad():
        z = model.visual(images)
    config = TrainConfig.preset("fairmedfm")
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], config)
    loss, _ = Classification().loss(model, {"image": images, "label": labels})
    loss.backward()
    optimizer.step()
    direction = ((labels.float() - 0.5)[:, None] * z).mean(0)
    expected = config.lr * torch.sign(direction)
    torch.testing.assert_close(model.head.weight[0], expected, rtol=1e-3, atol=1e-9)
