"""Segmentation fairness: prompts from the mask, Dice and IoU, the group gaps and both equity-scaled forms, FEBS's
weights, each against hand-worked masks and FairMedFM's own Table 2 numbers."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fairbook.segmentation import losses, make_prompt
from fairbook.segmentation.metrics import dice, iou, segmentation_report, summarise
from fairbook.segmentation.prompts import PromptError, bounding_box, centre_point


def ellipse(h=40, w=48, cy=18, cx=25, ry=9, rx=13):
    rows, cols = np.mgrid[:h, :w]
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1


MASKS = {"disc": ellipse(), "rim": ellipse() & ~ellipse(ry=5, rx=7),  # a ring: its centroid is outside it
         "notched": ellipse() & ~(np.mgrid[:40, :48][1] > 30)}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("kind", ["centre", "1 point", "5 points"])
def test_every_point_prompt_lands_inside_the_mask(name, kind):
    mask = MASKS[name]
    for seed in range(5):
        prompt = make_prompt(kind, mask, seed)
        points = prompt["points"]
        assert len(points) == {"centre": 1, "1 point": 1, "5 points": 5}[kind] == len(prompt["labels"])
        assert all(mask[y, x] for x, y in points)
        assert len({tuple(p) for p in points}) == len(points)
    rows, cols = np.nonzero(mask)
    assert not mask[int(round(rows.mean())), int(round(cols.mean()))] or name != "rim"   # why not the centroid


def test_centre_is_the_innermost_pixel_and_prompts_are_seeded():
    x, y = centre_point(ellipse())[0]
    assert (x, y) == (25, 18)
    np.testing.assert_array_equal(bounding_box(ellipse()), [25 - 13, 18 - 9, 25 + 13, 18 + 9])
    a, b = make_prompt("5 points", MASKS["disc"], 3), make_prompt("5 points", MASKS["disc"], 3)
    np.testing.assert_array_equal(a["points"], b["points"])
    with pytest.raises(PromptError, match="the mask is empty"):
        make_prompt("centre", np.zeros((4, 4)))
    tiny = np.zeros((6, 6), bool)
    tiny[2, 2:5] = True                                             # three pixels, five clicks asked
    clicks = make_prompt("5 points", tiny, 0)["points"]
    assert len(clicks) == 5 and all(tiny[y, x] for x, y in clicks) and len({tuple(p) for p in clicks}) <= 3


@pytest.mark.parametrize("name", list(MASKS))
def test_the_box_bounds_the_mask_tightly(name):
    mask = MASKS[name]
    x0, y0, x1, y1 = make_prompt("box", mask)["box"]
    rows, cols = np.nonzero(mask)
    assert rows.min() == y0 and rows.max() == y1 and cols.min() == x0 and cols.max() == x1
    assert mask[y0].any() and mask[y1].any() and mask[:, x0].any() and mask[:, x1].any()


def test_dice_and_iou_of_hand_masks_and_the_empty_cases():
    target = np.zeros((3, 4), bool)
    target[0, :3] = target[1, :3] = True                      # 6 pixels
    pred = np.zeros((3, 4), bool)
    pred[1, :3] = pred[2, 0] = True                           # 4 pixels, 3 of them right
    assert float(dice(pred, target)) == pytest.approx(2 * 3 / (4 + 6))
    assert float(iou(pred, target)) == pytest.approx(3 / 7)
    empty = np.zeros((3, 4), bool)
    np.testing.assert_allclose(dice(np.stack([empty, pred]), np.stack([empty, empty])), [1.0, 0.0])
    np.testing.assert_allclose(iou(np.stack([empty, pred]), np.stack([empty, empty])), [1.0, 0.0])


def test_group_gaps_skew_and_both_equity_scaled_forms_by_hand():
    report = segmentation_report({"dsc": [0.9, 0.8, 0.7], "iou": [0.8, 0.7, 0.5]}, ["F", "F", "M"], n_boot=0)
    assert report["groups"]["F"] == {"n": 2, "dsc": pytest.approx(0.85), "iou": pytest.approx(0.75)}
    assert report["dsc"] == pytest.approx(0.8)                            # over all cases, not over groups
    assert report["dsc_delta"] == pytest.approx(0.15)
    assert report["dsc_std"] == pytest.approx(0.075)                      # population std of (0.85, 0.7)
    assert report["dsc_skew"] == pytest.approx(0.3 / 0.15)
    assert report["dsc_es"] == pytest.approx(0.8 / 1.075)
    assert report["dsc_es_fairseg"] == pytest.approx(0.8 / (1 + 0.15 / math.sqrt(2)))   # sample std


# FairMedFM Table 2, segmentation rows (HAM10000): DSC, female, male, Δ, STD, Skew, ES, in percent
TABLE2 = {"SAM": (83.55, 84.47, 82.74, 1.73, 0.86, 1.11, 82.83),
          "SAMed": (90.92, 90.98, 90.87, 0.10, 0.05, 1.01, 90.87),
          "SAMed+FEBS": (91.63, 91.64, 91.62, 0.02, 0.01, 1.00, 91.62),
          "SAMed+Resampling": (91.51, 91.60, 91.43, 0.17, 0.09, 1.02, 91.43),
          "SAMed+InD": (88.85, 89.61, 88.19, 1.42, 0.71, 1.14, 88.22)}


@pytest.mark.parametrize("row", list(TABLE2))
def test_table2_segmentation_rows_follow_from_their_own_numbers(row):
    dsc, female, male, delta, std, skew, es = TABLE2[row]
    out = summarise(dsc / 100, np.array([female, male]) / 100)
    assert 100 * out["dsc_delta"] == pytest.approx(delta, abs=0.011)
    assert 100 * out["dsc_std"] == pytest.approx(std, abs=0.011)
    assert out["dsc_skew"] == pytest.approx(skew, abs=0.011)
    assert 100 * out["dsc_es"] == pytest.approx(es, abs=0.011)


def test_bootstrap_intervals_keep_group_sizes_and_contain_the_point():
    rng = np.random.default_rng(0)
    report = segmentation_report({"dsc": rng.uniform(0.6, 0.95, 90)}, ["a"] * 60 + ["b"] * 30, n_boot=300)
    for name in ("dsc", "dsc_es", "dsc_a", "dsc_b"):
        lo, hi = report["ci"][name]
        point = report[name] if name in report else report["groups"][name[-1]]["dsc"]
        assert lo < point < hi


# ---------------------------------------------------------------------------------------------------- FEBS
def test_febs_weights_by_hand_with_and_without_an_absent_group():
    both = losses.febs_weights(torch.tensor([0.4, 0.8]), torch.tensor([True, True]))
    np.testing.assert_allclose(both, [math.tanh(1.0), math.tanh(0.5)], rtol=1e-6)
    np.testing.assert_allclose(losses.febs_weights(torch.tensor([0.4, 0.8]), torch.tensor([True, True]), gamma=2),
                               [math.tanh(1.0), math.tanh(0.25)], rtol=1e-6)
    group_losses, present = torch.tensor([0.4, 0.0, 0.8]), torch.tensor([True, False, True])
    np.testing.assert_allclose(losses.febs_weights(group_losses, present),
                               [math.tanh(1.0), 0.0, math.tanh(0.5)], rtol=1e-6)
    np.testing.assert_allclose(losses.febs_weights(group_losses, present, faithful_to_code=True), [0.0, 0.0, 0.0])


def test_group_dice_losses_by_hand():
    # one 1 x 2 image per case, two classes; case 0 (group 0) predicts its target exactly, case 1 (group 1) half
    probabilities = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.5, 0.5]], [[0.5, 0.5]]]])
    target = torch.tensor([[[0, 1]], [[0, 1]]])
    onehot = F.one_hot(target, 2).movedim(-1, 1).float()
    out = losses.group_dice_losses(probabilities, onehot, torch.tensor([0, 1]), 3)
    eps = 1e-5
    half = 1 - (2 * 0.5 + eps) / (1.0 + 1.0 + eps)            # per class: overlap 0.5, sums 1 and 1
    np.testing.assert_allclose(out, [0.0, 2 * half, 0.0], atol=1e-6)


def test_as_released_an_absent_group_silences_the_dice_term():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 6, 6, requires_grad=True)
    target = (torch.rand(4, 6, 6) > 0.5).long()
    groups = torch.tensor([0, 0, 2, 2])                       # group 1 has no case in this batch
    grads = {}
    for faithful in (False, True):
        logits.grad = None
        losses.febs_loss(logits, target, groups, 3, faithful_to_code=faithful).backward()
        grads[faithful] = logits.grad.clone()
    logits.grad = None
    (0.2 * F.cross_entropy(logits, target)).backward()
    torch.testing.assert_close(grads[True], logits.grad)      # nothing but the cross-entropy is left
    assert not torch.allclose(grads[False], logits.grad)


# ---------------------------------------------------------------------------------------------------- SAM
def test_tiny_sam_prompts_saves_and_reloads_offline(tmp_path):
    from fairbook.models import ModelError, create_sam, save_sam

    torch.manual_seed(0)
    model = create_sam().eval()
    images, boxes = torch.randn(2, 3, 64, 64), torch.tensor([[[10.0, 15.0, 45.0, 50.0]]] * 2)
    with torch.no_grad():
        boxed = model(pixel_values=images, input_boxes=boxes, multimask_output=False).pred_masks
        clicked = model(pixel_values=images, input_points=torch.tensor([[[[30.0, 32.0]]]] * 2),
                        input_labels=torch.ones(2, 1, 1, dtype=torch.long), multimask_output=False).pred_masks
    assert boxed.shape == clicked.shape == (2, 1, 1, 32, 32)
    save_sam(model, tmp_path / "sam")
    again = create_sam(pretrained=tmp_path / "sam").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=images, input_boxes=boxes, multimask_output=False).pred_masks,
                                   boxed)
    with pytest.raises(ModelError, match="cannot load SAM weights"):
        create_sam(pretrained=tmp_path / "missing")


# ------------------------------------------------------------------------------------------ prompted training
@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from fairbook.data.fairseg import FairSeg, write_fairseg
    from fairbook.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("seg")
    generate(root / "synth", SynthConfig.preset("default", n_train=24, n_val=8, n_test=8), progress=False)
    return FairSeg(write_fairseg(root / "synth", root / "fairseg"), "Training", size=64)


def test_prompted_cases_point_inside_their_target_and_mix_prompt_kinds(cases):
    from fairbook.segmentation.training import PromptedCases

    kinds = set()
    for structure in ("disc", "cup", "rim"):
        data = PromptedCases(cases, structure, "mixed", seed=3)
        for i in range(8):
            item = data[i]
            target = item["target"] > 0
            if item["use_box"]:
                x0, y0, x1, y1 = item["box"].long().tolist()
                rows, cols = torch.nonzero(target, as_tuple=True)
                assert (rows.min(), rows.max(), cols.min(), cols.max()) == (y0, y1, x0, x1)
            else:
                clicks = item["points"][item["point_labels"] == 1].long()
                assert len(clicks) in (1, 5) and all(target[y, x] for x, y in clicks.tolist())
                assert set(item["point_labels"].tolist()) <= {1, -10}
            kinds.add((bool(item["use_box"]), int((item["point_labels"] == 1).sum())))
        again = PromptedCases(cases, structure, "mixed", seed=3)[5]
        assert torch.equal(again["points"], data[5]["points"]) and torch.equal(again["box"], data[5]["box"])
    assert len(kinds) >= 3                                      # boxes, single clicks and five clicks


def test_samed_lora_gives_every_adapter_a_gradient_and_ind_routes_each_group_to_its_decoder(cases):
    from torch.utils.data import DataLoader

    from fairbook.models import create_sam
    from fairbook.segmentation.training import PromptedCases, PromptedSAM

    torch.manual_seed(0)
    model = PromptedSAM(create_sam(), lora_rank=4, decoders=2)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():  # LoRA's B starts at zero, which leaves A without a gradient at the very first step
        for name, param in lora.items():
            param.normal_(0, 0.01) if "lora_B" in name else None
    batch = next(iter(DataLoader(PromptedCases(cases, "disc", "mixed"), batch_size=8)))
    batch["group"] = torch.tensor([0, 1] * 4)
    logits = model(batch)
    assert logits.shape == (8, 64, 64)
    logits.float().mean().backward()
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    frozen = [n for n, p in model.named_parameters() if "vision_encoder" in n and "lora_" not in n]
    assert frozen and not any(dict(model.named_parameters())[n].requires_grad for n in frozen)
    assert not any(p.requires_grad for p in model.sam.prompt_encoder.parameters())
    model.zero_grad(set_to_none=True)
    only_group_1 = {**batch, "group": torch.ones(8, dtype=torch.long)}
    model(only_group_1).mean().backward()
    assert all(p.grad is None for p in model.decoders[0].parameters())
    assert any(p.grad is not None for p in model.decoders[1].parameters())
    assert model.sam.mask_decoder is model.decoders[0]


def test_the_loop_keeps_the_epoch_with_the_best_validation_dice(cases, tmp_path):
    from fairbook.models import create_sam
    from fairbook.segmentation.training import PromptedCases, PromptedSAM, Segmentation
    from fairbook.train import TrainConfig, fit

    torch.manual_seed(0)
    model = PromptedSAM(create_sam())
    data = PromptedCases(cases, "disc", "box")
    objective = Segmentation()
    result = fit(model, data, data, TrainConfig(epochs=2, batch_size=12, lr=1e-3, trainable="as built"), tmp_path,
                 objective, progress=False)
    history = result["history"]
    kept = max(history, key=lambda h: h["val_auc"])
    assert result["best_epoch"] == kept["epoch"]
    dsc, jaccard, codes = objective.scores(model, torch.utils.data.DataLoader(data, batch_size=12))
    assert objective.criterion((dsc, jaccard, codes)) == pytest.approx(kept["val_auc"])
    assert codes.shape == (len(data), 5) and ((0 <= dsc) & (dsc <= 1)).all()
    np.testing.assert_allclose(jaccard, dsc / (2 - dsc), atol=1e-9)          # IoU = Dice / (2 - Dice), case by case


def test_two_structures_give_each_case_twice_with_its_own_target(cases):
    from fairbook.segmentation.training import PromptedCases, structure_mask

    both = PromptedCases(cases, "disc+cup", "box", seed=1)
    assert len(both) == 2 * len(cases) and len(both.metadata) == len(both)
    assert (both.metadata["race"].to_numpy()[::2] == cases.metadata["race"].to_numpy()).all()
    for i in (0, 3):
        mask = cases[i]["mask"]
        assert torch.equal(both[2 * i]["target"] > 0, structure_mask(mask, "disc"))
        assert torch.equal(both[2 * i + 1]["target"] > 0, structure_mask(mask, "cup"))
        assert both[2 * i + 1]["box"][2] - both[2 * i + 1]["box"][0] < both[2 * i]["box"][2] - both[2 * i]["box"][0]


def test_sam_declarations_train_what_they_say_and_refuse_what_they_cannot_do():
    from fairbook.methods import MethodError
    from fairbook.methods.sam import SAM, grid
    from fairbook.models import create_sam

    rows = grid("race")
    assert [m.name for m in rows] == ["SAMed", "SAMed+FEBS", "SAMed+Resampling", "SAMed+InD"]
    assert [m.decoders for m in rows] == [1, 1, 1, 4]                 # Asian, Black, White and unknown
    assert [m.uses_attribute for m in rows] == [False, True, True, True]
    torch.manual_seed(0)
    zero = SAM().adapt(create_sam())
    assert not any(p.requires_grad for p in zero.parameters()) and not SAM().trains
    full = SAM(usage="full").adapt(create_sam())
    assert all(p.requires_grad for p in full.parameters())
    samed = rows[0].adapt(create_sam())
    trainable = {n for n, p in samed.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "mask_decoder" in n or n.startswith("decoders.") for n in trainable)
    with pytest.raises(MethodError, match="mitigations apply to SAMed"):
        SAM(mitigation="febs")
    with pytest.raises(MethodError, match="InD needs one decoder per group"):
        SAM(usage="samed", mitigation="ind")
    with pytest.raises(MethodError, match="structure='lens'"):
        SAM(structure="lens")
    with pytest.raises(MethodError, match="groups .unknown included. but the model has 3 decoders"):
        SAM("InD", usage="samed", mitigation="ind", decoders=3).objective(None, None, "race", 0, None)


def test_the_protocol_trains_saves_and_reloads_segmentation_models(tmp_path):
    from torch.utils.data import DataLoader

    from fairbook.data.fairseg import FairSeg, as_fairseg
    from fairbook.data.synthetic import SynthConfig, generate
    from fairbook.methods.sam import SAM, grid
    from fairbook.protocol import Setup, load_segmentation_model, segmentation_grid
    from fairbook.results import SEGMENTATION, collect, read_predictions
    from fairbook.segmentation.training import PromptedCases, Segmentation
    from fairbook.train import TrainConfig

    generate(tmp_path / "synth", SynthConfig.preset("default", n_train=40, n_val=8, n_test=12), progress=False)
    setup = Setup(str(tmp_path / "synth"), TrainConfig.preset("samed", epochs=2, batch_size=8), "fairbook-tiny-sam",
                  n_train=24)
    run = tmp_path / "runs" / "15-segmentation-fairness" / "default"
    methods = [SAM("SAM cup, centre", prompt="centre"), *grid("race", mitigations=("erm", "febs"))]
    rows = segmentation_grid(run, methods, setup, seeds=[0, 1], attribute="race")
    assert list(zip(rows["method"], rows["attribute"], rows["seed"])) == [
        ("SAM cup, centre", "all", 0), ("SAM cup, centre", "all", 1), ("SAMed", "all", 0), ("SAMed", "all", 1),
        ("SAMed+FEBS", "race", 0), ("SAMed+FEBS", "race", 1)]
    assert len(collect(run, kind=SEGMENTATION)) == 6
    centre = [(folder / "test.csv").read_bytes() for folder in rows["folder"][:2]]
    assert centre[0] == centre[1]                     # the centre prompt involves no draw: seed 1 is seed 0's copy
    with pytest.raises(Exception, match="no saved predictions"):
        collect(run)                                                     # classification models only
    root = as_fairseg(tmp_path / "synth")
    info = json.loads((rows["folder"][3] / "info.json").read_text())
    assert info["n_train"] == 24 and [h["epoch"] for h in info["history"]] == [1, 2]
    assert json.loads((rows["folder"][0] / "info.json").read_text())["best_epoch"] == 0     # zero-shot: the start
    saved = read_predictions(rows["folder"][3], "test")
    assert len(saved) == 12 and set(saved.columns) >= {"dice", "iou", "race", "split"}
    net = load_segmentation_model(run, "SAMed", "all", 1)
    test = PromptedCases(FairSeg(root, "Test", 64), "cup", "box", seed=1)
    dsc, jaccard, codes = Segmentation().scores(net, DataLoader(test, batch_size=5))
    np.testing.assert_allclose(dsc, saved["dice"], atol=1e-12)
    np.testing.assert_allclose(jaccard, saved["iou"], atol=1e-12)


def test_evaluate_segmentation_scores_saved_dice_by_hand_and_feeds_the_paper_tables(tmp_path):
    from fairbook.results import SEGMENTATION, collect, save_segmentation
    from fairbook.tables import evaluate_segmentation, paired_table, table2

    codes = np.array([[0, 0, 0, 0, 60], [0, 1, 0, 0, 60], [2, 0, 0, 0, 60], [2, 1, 0, 0, 60]])   # Asian, White
    dice_by = {("A", 0): [0.8, 0.6, 0.9, 0.9], ("A", 1): [0.7, 0.7, 0.9, 0.9],
               ("B", 0): [0.9, 0.9, 0.9, 0.9], ("B", 1): [0.8, 0.8, 0.8, 1.0]}
    for (method, seed), values in dice_by.items():
        scores = {split: (np.array(values), np.array(values) / 2, codes) for split in ("validation", "test")}
        save_segmentation(tmp_path, method, seed, scores, "hand")
    evals = evaluate_segmentation(collect(tmp_path, kind=SEGMENTATION), ["race"], n_boot=200)
    a0 = evals[(evals["method"] == "A") & (evals["seed"] == 0)].iloc[0]
    assert a0["groups"] == ["Asian", "White"]
    assert a0["group_dsc"] == pytest.approx({"Asian": 0.7, "White": 0.9})
    assert a0["dsc"] == pytest.approx(0.8) and a0["dsc_delta"] == pytest.approx(0.2)
    assert a0["dsc_std"] == pytest.approx(0.1) and a0["dsc_skew"] == pytest.approx(0.3 / 0.1)
    assert a0["dsc_es"] == pytest.approx(0.8 / 1.1) and a0["iou"] == pytest.approx(0.4)
    table = table2(evals, "race", ["A", "B"])
    assert list(table.columns) == ["DSC ↑", "DSC_Asian", "DSC_White", "DSC_Δ ↓", "DSC_STD ↓", "DSC_Skew ↓",
                                   "DSC_ES ↑", "DSC_ES (FairSeg) ↑", "seeds"]
    assert table.loc["A", "DSC ↑"].startswith("80.00") and table.loc["A", "DSC_Skew ↓"].startswith("3.00")
    paired = paired_table(evals, "A", ["dsc", "dsc_delta"])
    delta = paired[paired["metric"] == "dsc_delta"].iloc[0]
    assert delta["diff"] == pytest.approx((0.0 + 0.1) / 2 - (0.2 + 0.2) / 2)      # B's gaps 0, 0.1; A's 0.2, 0.2


def test_as_fairseg_copies_once_and_again_when_the_source_changes(tmp_path):
    from fairbook.data import DataError
    from fairbook.data.fairseg import as_fairseg, describe
    from fairbook.data.synthetic import SynthConfig, generate

    generate(tmp_path / "synth", SynthConfig.preset("default", n_train=6, n_val=2, n_test=2), progress=False)
    copy = as_fairseg(tmp_path / "synth")
    assert copy == tmp_path / "synth-fairseg" and (copy / "train.txt").is_file() and as_fairseg(copy) == copy
    stamp = (copy / "train.txt").stat().st_mtime_ns
    assert as_fairseg(tmp_path / "synth") == copy and (copy / "train.txt").stat().st_mtime_ns == stamp
    shutil.rmtree(tmp_path / "synth")
    generate(tmp_path / "synth", SynthConfig.preset("default", seed=1, n_train=6, n_val=2, n_test=2), progress=False)
    as_fairseg(tmp_path / "synth")
    assert (copy / "train.txt").stat().st_mtime_ns != stamp            # the source changed: written again
    assert describe(copy).startswith("SynthFairVLMed (synthetic; seed 1") and describe(copy).endswith("FairSeg layout")
    with pytest.raises(DataError, match="neither a FairSeg folder"):
        as_fairseg(tmp_path)
