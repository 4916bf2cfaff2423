"""fairbook.train: CLIP loss, trainable parts, fine-tuning with validation selection, zero-shot, probe, files."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Subset

from fairbook import train
from fairbook.data.fairvlmed import FairVLMed
from fairbook.data.synthetic import SynthConfig, generate
from fairbook.models import ImageClassifier, create_clip
from fairbook.train import (
    FAIRCLIP_PROMPTS,
    FAIRMEDFM_PROMPTS,
    PROMPT_SETS,
    CheckpointError,
    Classification,
    Contrastive,
    TrainConfig,
    TrainError,
    class_embeddings,
    clip_loss,
    extract_features,
    fit,
    linear_probe,
    load_checkpoint,
    lr_factor,
    set_trainable,
    zero_shot_scores,
)

UPSTREAM_FROZEN = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                   "text_projection", "logit_scale"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, clip):
    _, preprocess_train, preprocess_val, tokenizer = clip
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthConfig.preset("default", n_train=64, n_val=32, n_test=32), progress=False)
    return {
        "train": Subset(FairVLMed(root, "Training", preprocess_train, tokenizer), range(32)),
        "val": FairVLMed(root, "Validation", preprocess_val, tokenizer),
        "test": FairVLMed(root, "Test", preprocess_val, tokenizer),
    }


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 16, "warmup_steps": 1, **overrides})


# ------------------------------------------------------------------------------------------------------------ loss
def test_clip_loss_matches_hand_computation_on_2x2():
    image = torch.tensor([[3.0, 0.0], [0.0, 0.5]])      # normalises to e1, e2
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0]])       # normalises to e1, (e1 + e2) / sqrt(2)
    c = 1 / math.sqrt(2)
    s = 2.0
    # logits = s * [[1, c], [0, c]]; rows are images, columns texts, matched pairs on the diagonal
    ce_img = (-math.log(math.exp(s) / (math.exp(s) + math.exp(s * c)))
              - math.log(math.exp(s * c) / (math.exp(0.0) + math.exp(s * c)))) / 2
    ce_txt = (-math.log(math.exp(s) / (math.exp(s) + math.exp(0.0))) + math.log(2.0)) / 2
    expected = (ce_img + ce_txt) / 2
    assert clip_loss(image, text, s).item() == pytest.approx(expected, rel=1e-6)
    assert clip_loss(text, image, s).item() == pytest.approx(expected, rel=1e-6)   # symmetric in the towers


def test_clip_loss_equals_open_clip_on_random_features():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    scale = torch.tensor(14.3)
    reference = ClipLoss()(nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1), scale)
    assert clip_loss(image, text, scale).item() == pytest.approx(reference.item(), rel=1e-6)
    assert clip_loss(image, text, scale).item() == pytest.approx(clip_loss(text, image, scale).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- trainability
def test_set_trainable_transformers_freezes_exactly_the_upstream_parts(model):
    n = set_trainable(model, "transformers")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == UPSTREAM_FROZEN
    assert n == sum(p.numel() for name, p in model.named_parameters() if name not in UPSTREAM_FROZEN)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual", "transformer"}


def test_set_trainable_parts_partition_the_model(model):
    total = set_trainable(model, "all")
    assert total == sum(p.numel() for p in model.parameters())
    visual, text = set_trainable(model, "visual"), set_trainable(model, "text")
    assert visual == sum(p.numel() for p in model.visual.parameters())
    assert visual + text + 1 == total                                  # + the logit scale
    assert not model.logit_scale.requires_grad and not model.visual.conv1.weight.requires_grad
    with pytest.raises(TrainError, match="choose one of as built, all, visual, text, transformers"):
        set_trainable(model, "lora")
    model.visual.conv1.weight.requires_grad_(True)                     # a method froze all but this
    assert set_trainable(model, "as built") == model.visual.conv1.weight.numel() + text
    assert model.visual.conv1.weight.requires_grad and not model.visual.proj.requires_grad


# ---------------------------------------------------------------------------------------------------------- config
def test_fairclip_preset_and_config_checks():
    cfg = TrainConfig.preset("fairclip")
    assert (cfg.optimizer, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == ("adam", 1e-5, (0.1, 0.1), 1e-6, 6e-5)
    assert (cfg.batch_size, cfg.epochs, cfg.schedule, cfg.grad_clip, cfg.trainable) == (
        32, 10, "none", None, "transformers")
    assert TrainConfig.preset("fairclip", epochs=2, betas=[0.9, 0.99]).betas == (0.9, 0.99)   # YAML gives lists
    with pytest.raises(TrainError, match="unknown TrainConfig field"):
        TrainConfig.preset("fairclip", epoch=2)
    with pytest.raises(TrainError, match="optimizer='lbfgs'"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(TrainError, match="epochs >= 0 and batch_size >= 1 .got -1 and 32"):
        TrainConfig(epochs=-1)


def test_cosine_schedule_factor():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]                 # linear warmup
    assert lr_factor(2, 10, 2) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)                             # halfway through the decay
    assert lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------------- fine-tuning
def contrastive(tokenizer, config: TrainConfig, regulariser=None) -> Contrastive:
    """The objective the protocol gives plain CLIP: contrastive loss, zero-shot scores with the recipe's prompts."""
    return Contrastive(tokenizer, PROMPT_SETS[config.prompts], regulariser)


def skip_scoring(monkeypatch, auc: float = 0.5) -> None:
    """Validation scoring replaced by a constant AUC, for tests about the training steps only."""
    monkeypatch.setattr(Contrastive, "scores", lambda self, model, loader: (None, None, None))
    monkeypatch.setattr(train, "validation_criterion", lambda y, p: auc)


def test_fit_picks_the_best_validation_epoch_and_reloads_it(model, clip, data, tmp_path, monkeypatch):
    scripted = iter([0.6, 0.8, 0.7])
    snapshots = []

    class Scripted(Contrastive):
        def scores(self, m, loader):
            assert loader.dataset is data["val"]                                 # selection on VALIDATION
            snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
            return None, None, None

    monkeypatch.setattr(train, "validation_criterion", lambda y, p: next(scripted))
    config = quick(epochs=3)
    result = fit(model, data["train"], data["val"], config, tmp_path, Scripted(clip[3], FAIRCLIP_PROMPTS),
                 progress=False)
    assert result["best_epoch"] == 2 and result["best_val_auc"] == 0.8
    assert [h["val_auc"] for h in result["history"]] == [0.6, 0.8, 0.7]
    assert all(h["train_loss"] > 0 and h["seconds"] > 0 for h in result["history"])
    assert result["steps"] == 3 * 2
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (saved["epoch"], saved["val_auc"], saved["config"]["epochs"]) == (2, 0.8, 3)
    state = model.state_dict()
    assert all(torch.equal(state[k], snapshots[1][k]) for k in state)            # epoch 2's weights, loaded back
    assert not torch.equal(snapshots[1]["visual.conv1.weight"], snapshots[2]["visual.conv1.weight"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_fit_real_validation_auc_and_upstream_freezing(model, clip, data, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = quick(trainable="transformers", lr=1e-3)
    result = fit(model, data["train"], data["val"], cfg, tmp_path, contrastive(clip[3], cfg), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in UPSTREAM_FROZEN)      # frozen parts untouched
    assert not torch.equal(before["transformer.resblocks.0.mlp.c_fc.weight"],
                           after["transformer.resblocks.0.mlp.c_fc.weight"])
    y, p, _ = zero_shot_scores(model, clip[3], DataLoader(data["val"], batch_size=16), FAIRCLIP_PROMPTS)
    assert result["best_val_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def _constant(value: float, calls: list):
    def regulariser(image_features, text_features, logit_scale, batch):
        calls.append({k: batch[k].shape for k in ("image", "label", "attributes")})
        return 0.0 * image_features.sum() + value                             # adds `value`, no gradient
    return regulariser


def test_regulariser_value_enters_the_loss(clip, data, tmp_path, monkeypatch):
    skip_scoring(monkeypatch)
    runs = {}
    calls: list = []
    for name, reg in (("plain", None), ("constant", _constant(3.0, calls))):
        runs[name] = fit(copy.deepcopy(clip[0]), data["train"], data["val"], quick(), tmp_path / name,
                         contrastive(clip[3], quick(), reg), progress=False)["history"][0]
    assert len(calls) == 2 and calls[0]["attributes"] == (16, 5) and calls[0]["label"] == (16,)
    assert runs["constant"]["reg_loss"] == pytest.approx(3.0) and runs["plain"]["reg_loss"] == 0.0
    assert runs["constant"]["train_loss"] == pytest.approx(runs["plain"]["train_loss"] + 3.0, abs=1e-5)


def test_regulariser_gradient_changes_the_update(clip, data, tmp_path, monkeypatch):
    skip_scoring(monkeypatch)

    def pull_apart(image_features, text_features, logit_scale, batch):
        return 10.0 * (image_features * text_features).sum(-1).mean()

    models = {}
    for name, reg in (("plain", _constant(0.0, [])), ("pull", pull_apart)):
        models[name] = copy.deepcopy(clip[0])
        fit(models[name], data["train"], data["val"], quick(), tmp_path / name, contrastive(clip[3], quick(), reg),
            progress=False)
    w = "visual.conv1.weight"
    assert not torch.allclose(models["plain"].state_dict()[w], models["pull"].state_dict()[w])


# --------------------------------------------------------------------------------------------------------- zero-shot
class _Table(nn.Module):
    """Stub CLIP: prompt i -> row i of a table; an image is its own feature vector; logit scale 10."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table), requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)), requires_grad=False)

    def encode_text(self, tokens):
        return self.table[tokens]

    def encode_image(self, images):
        return images


def test_prompt_ensemble_is_the_renormalised_mean_and_scores_use_the_logit_scale():
    words = {"a": 0, "b": 1, "c": 2}
    tokenizer = lambda texts: torch.tensor([words[t] for t in texts])                   # noqa: E731
    model = _Table([[3.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    prompts = {"negative": ["a", "b"], "positive": ["c"]}
    c = 1 / math.sqrt(2)
    classes = class_embeddings(model, tokenizer, prompts)
    assert torch.allclose(classes, torch.tensor([[c, c], [1.0, 0.0]]))               # mean of (1,0), (0,1) -> dir.
    batch = {"image": torch.tensor([[0.0, 1.0], [4.0, 0.0]]), "label": torch.tensor([0, 1]),
             "attributes": torch.tensor([[2, 0, 0, 0], [1, 1, 0, 0]])}
    y, p, attrs = zero_shot_scores(model, tokenizer, [batch], prompts)
    # image 1: cos = (c, 0) -> p = 1 / (1 + e^{10c}); image 2: cos = (c, 1) -> p = 1 / (1 + e^{-10(1-c)})
    assert p == pytest.approx([1 / (1 + math.exp(10 * c)), 1 / (1 + math.exp(-10 * (1 - c)))], rel=1e-6)
    _, p_raw, _ = zero_shot_scores(model, tokenizer, [batch], prompts, use_logit_scale=False)
    assert p_raw == pytest.approx([1 / (1 + math.exp(c)), 1 / (1 + math.exp(-(1 - c)))], rel=1e-6)
    assert list(y) == [0, 1] and attrs.tolist() == batch["attributes"].tolist()
    with pytest.raises(TrainError, match="negative and positive"):
        class_embeddings(model, tokenizer, {"positive": ["c"]})


@pytest.mark.parametrize("prompts", [FAIRCLIP_PROMPTS, FAIRMEDFM_PROMPTS], ids=["fairclip", "fairmedfm"])
def test_zero_shot_scores_on_tiny_clip(model, clip, data, prompts):
    model.train()
    loader = DataLoader(data["test"], batch_size=16)
    y, p, attrs = zero_shot_scores(model, clip[3], loader, prompts)
    _, p_raw, _ = zero_shot_scores(model, clip[3], loader, prompts, use_logit_scale=False)
    assert model.training                                                        # mode restored
    assert len(y) == len(p) == len(data["test"]) and attrs.shape == (len(data["test"]), 5)
    assert ((p > 0) & (p < 1)).all() and ((p_raw > 0) & (p_raw < 1)).all()
    assert np.abs(p_raw - 0.5).max() < 0.5 - 1 / (1 + math.e ** 2) + 1e-9     # softmax of cosines stays in sig(+-2)
    assert p.std() > 3 * p_raw.std()                                           # exp(logit scale) = 1 / 0.07
    assert roc_auc_score(y, p) == pytest.approx(roc_auc_score(y, p_raw), abs=1e-9)   # same ranking
    assert np.array_equal(y, data["test"].metadata["glaucoma"].to_numpy())


# --------------------------------------------------------------------------------------------------- linear probe
def test_linear_probe_chooses_c_on_validation(model, data):
    loaders = [DataLoader(data[s], batch_size=32) for s in ("train", "val", "test")]
    X, _, _ = extract_features(model, loaders[2])
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    result = linear_probe(model, *loaders, Cs=(0.1, 10.0))
    assert result["C"] == max(result["val_auc_by_C"], key=result["val_auc_by_C"].get)
    test = result["test"]
    assert len(test["y_score"]) == len(data["test"]) and ((test["y_score"] > 0) & (test["y_score"] < 1)).all()
    assert test["y_score"] == pytest.approx(result["classifier"].predict_proba(X)[:, 1])
    assert result["val_auc_by_C"][result["C"]] == pytest.approx(
        roc_auc_score(result["val"]["y_true"], result["val"]["y_score"]))


def test_corrupt_or_incompatible_checkpoint_gives_one_line_error(model, tmp_path):
    corrupt = tmp_path / "best.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(corrupt, model)
    message = str(err.value)
    assert "\n" not in message and str(corrupt) in message and "train again" in message
    assert isinstance(err.value, ValueError)

    other = tmp_path / "other.pt"
    state = dict(model.state_dict())
    state["text_projection"] = torch.zeros(3, 3)
    torch.save({"state_dict": state, "epoch": 1}, other)
    with pytest.raises(CheckpointError, match=r"shape-mismatched 1 \(e\.g\. text_projection\)") as err:
        load_checkpoint(other, model)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt", model)


def test_fit_and_score_scores_validation_and_test_with_the_kept_epoch(model, clip, data, tmp_path):
    tokenizer = clip[3]
    config = quick(epochs=1, prompts="fairmedfm")
    fit = train.fit_and_score(model, data["train"], data["val"], data["test"], config, tmp_path,
                              contrastive(tokenizer, config))
    assert set(fit["scores"]) == {"validation", "test"} and fit["best_epoch"] == 1
    y, p, codes = fit["scores"]["test"]
    assert len(y) == len(p) == len(codes) == len(data["test"])
    _, p_again, _ = zero_shot_scores(model, tokenizer, DataLoader(data["test"], batch_size=8), FAIRMEDFM_PROMPTS)
    np.testing.assert_allclose(p, p_again, atol=1e-6)
    y_val, p_val, _ = fit["scores"]["validation"]
    assert roc_auc_score(y_val, p_val) == pytest.approx(fit["best_val_auc"])


def test_config_replace_changes_only_the_named_fields():
    config = TrainConfig.preset("fairclip", epochs=2)
    other = config.replace(seed=5)
    assert (other.seed, other.epochs, other.lr, config.seed) == (5, 2, 1e-5, 0)
    with pytest.raises(TypeError):
        config.replace(nonsense=1)


def test_missing_pretrained_file_names_the_chapter_that_makes_it(tmp_path):
    from fairbook.models import ModelError

    with pytest.raises(ModelError, match="run chapter 10 with that configuration first") as info:
        create_clip("fairbook-tiny", pretrained="runs/10-pretrain-synthetic-clip/nowhere/clip.pt")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="no such tag or file"):
        create_clip("fairbook-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_a_checkpoint_file_is_a_valid_pretrained_argument(model, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    reloaded, *_ = create_clip("fairbook-tiny", pretrained=str(path), device="cpu")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_random_start_asked_for_is_not_warned_about_but_other_warnings_still_show(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        create_clip("fairbook-tiny", device="cpu")
        logging.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
    assert logging.getLogger().filters == []  # the filter is removed again


# ------------------------------------------------------------------------------------------------- classification
class _Logits(nn.Module):
    """Stub classifier: the logit of an image is its first pixel; one trainable offset."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return images.flatten(1)[:, 0] + self.offset


def test_classification_loss_is_the_mean_bce_or_the_reduction_over_the_batch_groups():
    images = torch.zeros(3, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([2.0, -1.0, 0.5])
    batch = {"image": images, "label": torch.tensor([1, 0, 0]),
             "attributes": torch.tensor([[0, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]])}
    by_hand = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    loss, extra = Classification().loss(_Logits(), batch)
    assert extra is None and float(loss.detach()) == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    seen = {}

    def weighted(losses, groups):
        seen["groups"] = groups.tolist()
        return (losses * (groups + 1)).sum()

    loss, _ = Classification(weighted, column=0).loss(_Logits(), batch)
    assert seen["groups"] == [0, 1, 1]
    assert float(loss.detach()) == pytest.approx(by_hand[0] + 2 * by_hand[1] + 2 * by_hand[2], rel=1e-6)
    with pytest.raises(TrainError, match="needs column="):
        Classification(weighted)


def probe_on(clip_model: nn.Module) -> ImageClassifier:
    """A linear head on a frozen copy of the image tower."""
    net = ImageClassifier(copy.deepcopy(clip_model.visual))
    net.visual.requires_grad_(False)
    return net


def test_fit_trains_a_head_on_a_frozen_encoder_and_scores_with_its_sigmoid(clip, data, tmp_path):
    net = probe_on(clip[0])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    config = quick(epochs=2, lr=1e-2, trainable="as built")
    result = fit(net, data["train"], data["val"], config, tmp_path, Classification(), progress=False)
    after = net.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"head.weight", "head.bias"}
    assert result["trainable_params"] == net.head.weight.numel() + 1
    y, p, _ = result["val_scores"]
    with torch.no_grad():
        logits = torch.cat([net.eval()(b["image"]) for b in DataLoader(data["val"], batch_size=7)])
    np.testing.assert_allclose(p, torch.sigmoid(logits).double().numpy(), rtol=1e-5, atol=1e-7)
    assert result["best_val_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_fit_draws_its_batches_from_the_sampler_when_given(clip, data, tmp_path, monkeypatch):
    from fairbook.mitigations import balanced_sampler

    skip_classification_scoring(monkeypatch)
    drawn = []

    class Recording(Classification):
        def loss(self, model, batch):
            drawn.extend(batch["label"].tolist())
            return super().loss(model, batch)

    race = [int(data["train"][i]["attributes"][0]) for i in range(len(data["train"]))]
    config = quick(epochs=1, trainable="as built")
    fit(probe_on(clip[0]), data["train"], data["val"], config, tmp_path, Recording(),
        sampler=balanced_sampler(race, seed=3), progress=False)
    expected = [int(data["train"][i]["label"]) for i in balanced_sampler(race, seed=3)]
    assert drawn == expected and len(drawn) == len(data["train"])


def test_group_dro_reduces_the_loss_inside_the_loop_as_computed_by_hand(clip, data, tmp_path, monkeypatch):
    from fairbook.mitigations import GroupDRO

    skip_classification_scoring(monkeypatch)
    calls = []

    class Logged(GroupDRO):
        def forward(self, losses, groups):
            q_before = self.q.clone()
            out = super().forward(losses, groups)
            calls.append((losses.detach().clone(), groups.clone(), q_before, float(out.detach())))
            return out

    dro = Logged(4, eta=0.5)
    config = quick(epochs=1, trainable="as built")
    fit(probe_on(clip[0]), data["train"], data["val"], config, tmp_path, Classification(dro, column=0),
        progress=False)
    assert len(calls) == 2                                                    # 32 samples, batches of 16
    for losses, groups, q_before, out in calls:
        group_loss = np.array([losses[groups == g].mean().item() if (groups == g).any() else 0.0
                               for g in range(4)])
        q = q_before.numpy() * np.exp(0.5 * group_loss)
        q /= q.sum()
        assert out == pytest.approx(float(q @ group_loss), rel=1e-5)
    assert not torch.allclose(dro.q, torch.full((4,), 0.25))


def skip_classification_scoring(monkeypatch, auc: float = 0.5) -> None:
    monkeypatch.setattr(Classification, "scores", lambda self, model, loader: (None, None, None))
    monkeypatch.setattr(train, "validation_criterion", lambda y, p: auc)
