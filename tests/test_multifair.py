"""MultiFair on the harness: the fusion classifier, CGGM's modality balance and direction term, the group-level
factors, gate and gap term, each against a hand computation, and the whole method through the protocol."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from fairbook import protocol
from fairbook.data.fairvlmed import FairVLMed
from fairbook.data.synthetic import SynthConfig, generate
from fairbook.methods import MethodError
from fairbook.methods.multifair import (
    MultiFair,
    batch_auc,
    direction_term,
    fairness_gap,
    group_auc_gap,
    group_factors,
    modality_balance,
    surrogate_auc,
    variants,
)
from fairbook.models import ModelError
from fairbook.results import collect
from fairbook.train import Classification, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, clip):
    _, preprocess_train, preprocess_val, tokenizer = clip
    root = tmp_path_factory.mktemp("multifair") / "data"
    generate(root, SynthConfig.preset("default", n_train=96, n_val=32, n_test=32), progress=False)
    train = FairVLMed(root, "Training", preprocess_train, tokenizer)
    return {"root": str(root), "train": train, "batch": next(iter(DataLoader(train, batch_size=48)))}


def fusion(method: MultiFair, clip) -> torch.nn.Module:
    torch.manual_seed(0)
    return method.adapt(copy.deepcopy(clip[0])).eval()  # eval: no dropout, so two forwards agree


def open_gate(clip, data) -> float:
    """A tau just under the fused model's batch AUC gap on the test batch: the gate opens, and ``F_m`` stays
    moderate (a tiny tau would blow beta / tau up)."""
    method = MultiFair(modality_level=False)
    objective = method.objective(fusion(method, clip), data["train"], "gender", 0, TrainConfig(), None)
    objective.loss(fusion(method, clip), data["batch"])
    gap = objective.steps[-1]["gap"]
    assert gap > 0.02
    return 0.9 * gap


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------- modality level
def test_modality_balance_by_hand():
    # the image head's AUC rose by 0.03, the text head's by 0.01: S = 0.04, B = ((0.04 - 0.03), (0.04 - 0.01)) / S
    np.testing.assert_allclose(modality_balance(torch.tensor([0.03, 0.01])), [0.25, 0.75], rtol=1e-6)
    # signed (CGGM): text fell by 0.01, S = 0.02, B = (-0.5, 1.5) clipped to [0, 1]
    np.testing.assert_allclose(modality_balance(torch.tensor([0.03, -0.01])), [0.0, 1.0])
    # released code: absolute changes, S = 0.04 again
    np.testing.assert_allclose(modality_balance(torch.tensor([0.03, -0.01]), signed=False), [0.25, 0.75],
                               rtol=1e-6)
    np.testing.assert_allclose(modality_balance(torch.tensor([0.0, 0.0])), [0.5, 0.5])


def test_the_objective_builds_b_from_the_heads_batch_auc_change(clip, data):
    method = MultiFair(group_level=False)
    model, batch = fusion(method, clip), data["batch"]
    objective = method.objective(model, data["train"], "gender", 0, TrainConfig(), None)
    objective.loss(model, batch)                       # step 1: B = 1/M, remembers each head's AUC
    assert objective.steps[0]["B_image"] == objective.steps[0]["B_text"] == 0.5
    before = objective.previous.clone()
    with torch.no_grad():
        z = model.encode(batch["image"], batch["text"])
        heads = model.unimodal_logits(z)
    aucs = torch.tensor([roc_auc_score(batch["label"], heads[m]) for m in ("image", "text")])
    objective.loss(model, batch)                       # step 2: B from the change since step 1
    expected = modality_balance(aucs - before)
    np.testing.assert_allclose([objective.steps[1]["B_image"], objective.steps[1]["B_text"]], expected,
                               rtol=1e-5)


def test_encoder_gradients_are_scaled_by_rho_b_f_and_the_rest_is_not(clip, data):
    # lambdas 0: the only change to the gradient is the scaling of each encoder's; tau tiny: the gate is open
    method = MultiFair(lambda_gm=0.0, lambda_f=0.0, tau=open_gate(clip, data), rho=1.2)
    model, batch = fusion(method, clip), data["batch"]
    objective = method.objective(model, data["train"], "gender", 0, TrainConfig(), None)
    objective.loss(model, batch)[0].backward()         # step 1 sets the heads' metrics
    gradients(model)
    Classification().loss(model, batch)[0].backward()
    plain = gradients(model)
    objective.loss(model, batch)[0].backward()
    modulated = gradients(model)
    step = objective.steps[-1]
    assert step["gate"]
    for modality in ("image", "text"):
        factor = 1.2 * step[f"B_{modality}"] * step[f"F_{modality}"]
        names = [k for k in plain if k.startswith((f"encoders.{modality}.", f"project.{modality}."))]
        assert names and factor != pytest.approx(1.0)
        for name in names:  # float rounding of two different backward passes: 1e-5 of the largest entry
            atol = 1e-5 * float(plain[name].abs().max())
            torch.testing.assert_close(modulated[name], factor * plain[name], rtol=1e-4, atol=atol)
    for name in [k for k in plain if k.startswith(("head.", "fusion."))]:
        torch.testing.assert_close(modulated[name], plain[name])


def test_direction_term_and_its_gradient_by_hand():
    fusion_weight = torch.tensor([[1.0, 0.0]], requires_grad=True)
    heads = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]   # cosines 1 and 0
    term = direction_term(torch.tensor([0.25, 0.75]), fusion_weight, heads)
    assert float(term.detach()) == pytest.approx((0.25 + 0.75 - 0.25 * 1.0) / 2)
    term.backward()
    # d cos(a, b) / da = b / (|a||b|) - cos a / |a|^2: zero for the parallel head, (0, 1) for the other
    np.testing.assert_allclose(fusion_weight.grad.numpy(), [[0.0, -0.75 / 2]], atol=1e-7)


def test_the_direction_term_enters_the_loss_as_intended_and_is_zero_as_released(clip, data):
    for faithful in (False, True):
        method = MultiFair(group_level=False, faithful_to_code=faithful)
        model, batch = fusion(method, clip), data["batch"]
        objective = method.objective(model, data["train"], "gender", 0, TrainConfig(), None)
        objective.loss(model, batch)
        balance = objective.balance.clone()
        heads = [model.unimodal[m].weight.detach().clone() for m in ("image", "text")]
        loss, extra = objective.loss(model, batch)
        if faithful:
            assert extra is None                          # L_gm = 0: the released lookup finds nothing
            continue
        expected = 0.15 * direction_term(balance, model.output_layer.weight, heads)
        assert float(extra.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
        extra.backward()
        assert model.output_layer.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- group level
def test_surrogate_auc_orders_and_matches_a_hand_value():
    labels = torch.tensor([1, 0, 0])
    value = surrogate_auc(torch.tensor([2.0, 0.0, 1.0]), labels)
    assert float(value) == pytest.approx((1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(-1))) / 2)
    ordered = [float(surrogate_auc(torch.tensor(s), labels)) for s in ([3.0, 0.0, 1.0], [1.0, 0.0, 2.0],
                                                                        [0.0, 1.0, 3.0])]
    assert ordered[0] > ordered[1] > ordered[2]
    assert math.isnan(float(surrogate_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))))
    assert batch_auc(torch.tensor([1.0, 0.0, 1.0]), labels) == pytest.approx(0.75)   # one tie counts 1/2


def test_group_factors_and_gap_term_by_hand():
    ema = torch.tensor([[0.8, 0.6], [0.7, math.nan]])
    # modality 0: mean 0.7, terms 1 + 0.5 (0.7 - 0.8) / 0.1 = 0.5 and 1.5; modality 1: one group seen, term 1
    np.testing.assert_allclose(group_factors(ema, torch.tensor([0.5, 0.5]), 0.5, 0.1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(group_factors(ema, torch.tensor([0.75, 0.25]), 0.5, 0.1), [0.75, 1.0], rtol=1e-6)
    assert float(fairness_gap(ema)) == pytest.approx((0.1 + 0.0) / 2)
    scores = torch.tensor([0.9, 0.1, 0.3, 0.5, 0.4, 0.1])
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    assert group_auc_gap(scores, labels, groups) == pytest.approx(1.0 - 0.5)   # group 1: 2 of 4 pairs ordered


def test_the_gate_opens_above_tau_and_closes_at_or_below_it(clip, data):
    batch = data["batch"]
    gaps = []
    for tau in (None, "below", "above"):
        method = MultiFair(modality_level=False, tau=0.07 if tau is None else
                           gaps[0] - 1e-6 if tau == "below" else gaps[0] + 1e-6)
        model = fusion(method, clip)
        objective = method.objective(model, data["train"], "gender", 0, TrainConfig(), None)
        _, extra = objective.loss(model, batch)
        step = objective.steps[-1]
        gaps.append(step["gap"])
        if tau == "below":
            assert step["gate"] and extra is not None and extra.requires_grad
        if tau == "above":
            assert not step["gate"] and extra is None
    assert gaps[0] > 0 and gaps[0] == gaps[1] == gaps[2]


def test_the_gap_term_has_a_gradient_as_intended_and_is_a_constant_as_released(clip, data):
    values = {}
    for faithful in (False, True):
        method = MultiFair(modality_level=False, tau=open_gate(clip, data), lambda_f=1.0,
                           faithful_to_code=faithful)
        model = fusion(method, clip)
        objective = method.objective(model, data["train"], "gender", 0, TrainConfig(), None)
        _, extra = objective.loss(model, data["batch"])
        values[faithful] = float(extra.detach())
        assert extra.requires_grad is not faithful
        if not faithful:
            extra.backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0
                       for p in model.encoders["text"].parameters())
    assert values[False] == pytest.approx(values[True], rel=1e-6) and values[False] > 0


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(MethodError, match="modalities='image\\+notes'"):
        MultiFair(modalities="image+notes")
    with pytest.raises(MethodError, match="a unimodal model takes"):
        MultiFair(modalities="image")
    with pytest.raises(MethodError, match="mitigation='laftr'"):
        MultiFair(mitigation="laftr")
    names = [m.name for m in variants()]
    assert names[:3] == ["Image only", "Text only", "Fusion"] and len(set(names)) == len(names) == 9


# ------------------------------------------------------------------------------------------------ protocol
def test_multifair_trains_saves_its_trace_and_reloads_through_the_protocol(data, tmp_path):
    setup = protocol.Setup(data["root"], TrainConfig.preset("multifair", epochs=1, lr=1e-4), n_train=64)
    method = MultiFair(head_lr=1e-3)
    fit = protocol.train_one(tmp_path / "run", method, setup, seed=0, attribute="gender")
    assert fit["steps"] == 2                             # 64 pairs in batches of 32
    info = json.loads((fit["folder"] / "info.json").read_text())
    assert info["objective"]["groups"] == [0, 1]
    trace = protocol.step_records(collect(tmp_path / "run"))
    assert trace["step"].tolist() == [1, 2] and set(trace["method"]) == {"MultiFair"}
    assert {"B_image", "B_text", "F_image", "F_text", "gate", "E_text_1"} <= set(trace.columns)
    y, p, _ = fit["scores"]["test"]
    net, preprocess_val, tokenizer = protocol.load_model(tmp_path / "run", "MultiFair", "gender", 0)
    test = FairVLMed(data["root"], "Test", preprocess_val, tokenizer)
    _, p_again, _ = Classification().scores(net, DataLoader(test, batch_size=16))
    np.testing.assert_allclose(p_again, p, rtol=1e-5, atol=1e-6)


def test_paper_scale_encoders_load_with_from_pretrained_and_bert_reads_raw_notes(clip, data, tmp_path):
    """MultiFair's released encoders are transformers checkpoints (a ViT and BERT); tiny ones saved here load
    offline through the same from_pretrained path, the BERT encoder tokenises the raw notes itself, and the model
    trains, saves and reloads through the protocol."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

    vit, bert = tmp_path / "vit", tmp_path / "bert"
    ViTModel(ViTConfig(image_size=96, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(vit)
    words = sorted({w.strip(".,;:()").lower() for note in data["train"].metadata["note"] for w in note.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    method = MultiFair("MultiFair (transformers)", image_encoder=str(vit), text_encoder=str(bert), head_lr=1e-3)
    assert method.data_tokenizer(object()) is None                         # the notes reach the model raw
    setup = protocol.Setup(data["root"], TrainConfig.preset("multifair", epochs=1, lr=1e-4), n_train=32)
    fit = protocol.train_one(tmp_path / "run", method, setup, seed=0, attribute="gender")
    encoders = fit["model"].encoders
    assert isinstance(encoders["image"].model, ViTModel) and isinstance(encoders["text"].model, BertModel)
    net, preprocess_val, tokenizer = protocol.load_model(tmp_path / "run", method.name, "gender", 0)
    assert tokenizer is None
    test = FairVLMed(data["root"], "Test", preprocess_val, tokenizer)
    _, p_again, _ = Classification().scores(net, DataLoader(test, batch_size=16))
    np.testing.assert_allclose(p_again, fit["scores"]["test"][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="cannot load the image encoder"):
        MultiFair(image_encoder=str(tmp_path / "missing")).adapt(copy.deepcopy(clip[0]))
