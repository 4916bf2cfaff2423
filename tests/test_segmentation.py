"""Segmentation fairness: prompts from the mask, Dice and IoU, the group gaps and both equity-scaled forms, FEBS's
weights, each against hand-worked masks and FairMedFM's own Table 2 numbers."""
from __future__ import annotations

import math

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
    from fairbook.models import ModelError, create_sam

    torch.manual_seed(0)
    model = create_sam().eval()
    images, boxes = torch.randn(2, 3, 128, 128), torch.tensor([[[20.0, 30.0, 90.0, 100.0]]] * 2)
    with torch.no_grad():
        boxed = model(pixel_values=images, input_boxes=boxes, multimask_output=False).pred_masks
        clicked = model(pixel_values=images, input_points=torch.tensor([[[[60.0, 64.0]]]] * 2),
                        input_labels=torch.ones(2, 1, 1, dtype=torch.long), multimask_output=False).pred_masks
    assert boxed.shape == clicked.shape == (2, 1, 1, 64, 64)
    model.save_pretrained(tmp_path / "sam")
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
    return FairSeg(write_fairseg(root / "synth", root / "fairseg"), "Training", size=128)


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
    assert logits.shape == (8, 128, 128)
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
