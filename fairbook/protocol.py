"""The protocol: how every method is trained, selected and saved, the same way for all.

One seed of one method (:func:`train_one`):

1. the model: ``torch.manual_seed(seed)``, the shared start (:class:`Setup` ``model`` and ``pretrained``), then the
   method's own change (:meth:`fairbook.methods.Method.adapt`);
2. the data: ``n_train`` training pairs drawn with ``seed`` (:meth:`fairbook.data.FairVLMed.subset`; the same draw
   for every method at the same seed, so methods are paired on seed), the whole validation and test splits;
3. training: the one loop, :func:`fairbook.train.fit`, with the shared recipe and ``seed``, the method's objective
   (:meth:`fairbook.methods.Method.objective`: the contrastive loss plus the method's term for the training
   attribute, or a classifier's cross-entropy with a mitigation) and its sampler; the epoch is chosen on
   validation AUC;
4. scoring: validation and test predictions of the kept epoch, saved in the results store
   (:func:`fairbook.results.save`) with a record that rebuilds the model (:func:`load_model`). The test split is
   read once, after training.

:func:`train_grid` runs methods x attributes x seeds with one call; a method that uses no attribute (CLIP) is
trained once per seed under the attribute ``all``.

The runs of a grid train one after another in this process. Within a grid, the validation and test splits are read
and preprocessed once and kept (the evaluation preprocess is deterministic), so a run gives the same predictions
in a grid as alone. (Runs side by side in one-thread worker processes were measured and rejected: no faster on 2
cores, and the predictions depend on the thread count; see bench/README.md.)

Segmentation (:func:`train_segmentation`, :func:`segmentation_grid`) follows the same four steps on a
FairSeg-layout folder: a SAM built with the setup's model and start, changed by the method
(:class:`fairbook.methods.sam.SAM`), trained by the same loop with the epoch chosen on validation Dice, and the
per-case Dice of validation and test saved in the results store.

A method's own weight (FairCLIP's lambda, Fair-MoE's FOL weight) is chosen among candidates by
:func:`choose_on_validation`: the candidates are trained and scored on validation only, a declared criterion
picks one, and only the chosen setting is then trained and scored on test.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from fairbook.data.attributes import FILTER_ATTRIBUTES
from fairbook.data.fairseg import FairSeg, as_fairseg
from fairbook.data.fairseg import describe as describe_fairseg
from fairbook.data.fairvlmed import FairVLMed, describe
from fairbook.files import replace_dir, resolve, temporary_sibling
from fairbook.methods.base import Method, method_from_record
from fairbook.metrics import fairness_report
from fairbook.models import create_clip, create_sam, sam_input_size
from fairbook.results import (
    ALL,
    SEGMENTATION,
    ResultsError,
    collect,
    model_folder,
    read_predictions,
    save,
    save_segmentation,
)
from fairbook.segmentation.training import PromptedCases
from fairbook.train import TrainConfig, fit_and_score, load_checkpoint

__all__ = ["Setup", "build_model", "choose_on_validation", "histories", "load_model", "load_segmentation_model",
           "reuse", "saved_method", "segmentation_grid", "step_records", "train_grid", "train_one",
           "train_segmentation", "validation_scores"]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every method of a chapter shares: the data, the pretrained start, the recipe and the training draw.

    ``data_root``: a FairVLMed-layout folder. ``model``/``pretrained``: :func:`fairbook.models.create_clip`'s
    arguments (an open_clip architecture and a weight tag or checkpoint file). ``config``: the training recipe
    (its ``seed`` is replaced by each run's seed). ``n_train``: training pairs drawn per seed (None: all).
    """

    data_root: str
    config: TrainConfig
    model: str = "fairbook-tiny"
    pretrained: str | None = None
    n_train: int | None = None

    def replace(self, **changes) -> Setup:
        """A copy with some fields changed, e.g. ``setup.replace(data_root=control_root)``."""
        return dataclasses.replace(self, **changes)


def build_model(method: Method, setup: Setup, seed: int):
    """The network ``method`` starts from at ``seed``: ``torch.manual_seed(seed)``, then
    :func:`fairbook.models.create_clip` with the setup's model and weights, then ``method.adapt`` (e.g. Fair-MoE's
    layers, whose gates are initialised from the seeded generator). Returns ``create_clip``'s 4-tuple, with the
    tokenizer the method reads notes with (:meth:`fairbook.methods.Method.data_tokenizer`)."""
    torch.manual_seed(seed)
    net, preprocess_train, preprocess_val, tokenizer = create_clip(setup.model, setup.pretrained)
    return method.adapt(net, tokenizer), preprocess_train, preprocess_val, method.data_tokenizer(tokenizer)


def train_one(run_dir: str | os.PathLike, method: Method, setup: Setup, seed: int, attribute: str = ALL,
              progress: bool = False, test: bool = True, eval_splits: dict | None = None) -> dict:
    """One seed of one method trained for ``attribute`` (``all`` for a method that uses none), as described in the
    module docstring; returns :func:`fairbook.train.fit_and_score`'s dict plus ``model`` (the trained network, kept
    epoch loaded) and ``folder`` (its folder in the results store).

    The checkpoint goes to ``run_dir/checkpoints/<method>/<attribute>/seed-<k>/best.pt``; ``info.json`` records the
    setup's ``model`` and ``pretrained``, the method (:meth:`fairbook.methods.Method.record`) and the checkpoint
    path relative to ``run_dir``. ``test=False`` never reads the test split (a model trained to choose a setting,
    :func:`choose_on_validation`).

    ``eval_splits``: a dict in which the validation and test splits, preprocessed once, are kept for the next runs
    of the same setup (what :func:`train_grid` passes); the evaluation preprocess is deterministic, so the kept
    images are the ones a fresh read would give.
    """
    _check_attribute(method, attribute)
    run_dir = resolve(run_dir)
    net, preprocess_train, preprocess_val, tokenizer = build_model(method, setup, seed)
    train = FairVLMed(setup.data_root, "Training", preprocess_train, tokenizer).subset(setup.n_train, seed)
    val, test_ds = (_evaluation_split(setup, split, preprocess_val, tokenizer, eval_splits)
                    for split in ("Validation", "Test" if test else None))
    config = setup.config.replace(seed=seed, **({} if method.trains else {"epochs": 0}))
    objective = method.objective(net, train, attribute, seed, config, tokenizer)
    sampler = method.sampler(train, attribute, seed)
    folder = model_folder(run_dir, method.name, attribute, seed, kind="checkpoints")
    fit = fit_and_score(net, train, val, test_ds, config, folder, objective, sampler, progress)
    record = {**_record(run_dir, method, setup, config, folder), "n_train": len(train)}
    saved = save(run_dir, method.name, seed, fit["scores"], describe(setup.data_root), {**fit, **record}, attribute)
    return {**fit, "model": net, "folder": saved}


def train_grid(run_dir: str | os.PathLike, methods: Sequence[Method], setup: Setup, seeds: Sequence[int],
               attributes: Sequence[str] = FILTER_ATTRIBUTES, progress: bool = False, test: bool = True
               ) -> pd.DataFrame:
    """Train every method for every attribute it uses and every seed (:func:`train_one`) and return the results-store
    rows of the models trained (as :func:`fairbook.results.collect` gives them), in training order. ``test=False``
    never scores the test split (:func:`choose_on_validation`). The validation and test splits are preprocessed
    once for the whole grid."""
    _unique_names(methods)
    eval_splits: dict = {}
    folders = []
    for method in methods:
        for attribute in attributes if method.uses_attribute else [ALL]:
            for seed in seeds:
                fit = train_one(run_dir, method, setup, seed, attribute, progress, test, eval_splits)
                folders.append(fit["folder"])
    rows = collect(run_dir).set_index("folder").loc[folders].reset_index()
    return rows[["chapter", "method", "attribute", "seed", "data", "folder"]]


#: Largest input size (pixels) at which :func:`train_segmentation` keeps decoded cases in memory.
KEEP_SEGMENTATION_ITEMS = 256


def train_segmentation(run_dir: str | os.PathLike, method: Method, setup: Setup, seed: int, attribute: str = ALL,
                       progress: bool = False, test: bool = True, eval_splits: dict | None = None) -> dict:
    """One seed of one segmentation method (:class:`fairbook.methods.sam.SAM`), the steps of :func:`train_one` on
    a FairSeg-layout folder (:func:`fairbook.data.fairseg.as_fairseg` of ``setup.data_root``):

    1. the model: ``torch.manual_seed(seed)``, :func:`fairbook.models.create_sam` with the setup's ``model`` and
       ``pretrained`` (a ``save_pretrained`` folder), then ``method.adapt``;
    2. the data at the model's input size: ``n_train`` training cases drawn with ``seed``, prompted with the
       method's ``train_prompt``; the whole validation and test splits prompted with its ``prompt``, the prompts
       drawn with ``seed`` (so two methods at one seed answer the same prompts);
    3. the one loop, :func:`fairbook.train.fit_and_score`, with the method's objective and sampler; the epoch is
       chosen on the mean validation Dice;
    4. the per-case Dice and IoU of validation and test saved by :func:`fairbook.results.save_segmentation`,
       with the same record as :func:`train_one`.

    Returns :func:`fairbook.train.fit_and_score`'s dict plus ``model`` and ``folder``. ``eval_splits``: a dict in
    which the decoded validation and test cases are kept for the next runs (what :func:`segmentation_grid`
    passes); cases are kept decoded in memory for inputs up to :data:`KEEP_SEGMENTATION_ITEMS` pixels."""
    _check_attribute(method, attribute)
    run_dir = resolve(run_dir)
    torch.manual_seed(seed)
    net = method.adapt(create_sam(setup.model, setup.pretrained))
    size = sam_input_size(net.sam)
    root = as_fairseg(setup.data_root)
    keep = size <= KEEP_SEGMENTATION_ITEMS   # a 1024-pixel SAM's decoded splits would not fit in memory
    cases = FairSeg(root, "Training", size, keep_items=keep).subset(setup.n_train, seed)
    train = PromptedCases(cases, method.structure, method.train_prompt, seed)
    cache = {} if eval_splits is None else eval_splits
    for split in ("Validation", "Test"):
        if (root, split, size) not in cache:
            cache[root, split, size] = FairSeg(root, split, size, keep_items=keep)
    val, test_ds = (PromptedCases(cache[root, split, size], method.structure, method.prompt, seed)
                    for split in ("Validation", "Test"))
    config = setup.config.replace(seed=seed, **({} if method.trains else {"epochs": 0}))
    objective = method.objective(net, train, attribute, seed, config, None)
    folder = model_folder(run_dir, method.name, attribute, seed, kind="checkpoints")
    fit = fit_and_score(net, train, val, test_ds if test else None, config, folder, objective,
                        method.sampler(train, attribute, seed), progress)
    record = {**_record(run_dir, method, setup, config, folder), "n_train": len(cases)}
    saved = save_segmentation(run_dir, method.name, seed, fit["scores"], describe_fairseg(root),
                              {**fit, **record}, attribute)
    return {**fit, "model": net, "folder": saved}


def segmentation_grid(run_dir: str | os.PathLike, methods: Sequence[Method], setup: Setup, seeds: Sequence[int],
                      attribute: str = "race", progress: bool = False) -> pd.DataFrame:
    """:func:`train_segmentation` for every method and seed (a method that uses an attribute trains for
    ``attribute``); returns the rows of ``collect(run_dir, kind=SEGMENTATION)`` of the models trained, in order.
    The validation and test cases are decoded once for the whole grid. A method whose result cannot depend on the
    seed (``seed_free``: the start answering the centre or the box) is scored at the first seed, and that saved
    model is copied to the other seeds."""
    _unique_names(methods)
    eval_splits: dict = {}
    folders = []
    for method in methods:
        first = None
        for seed in seeds:
            if first is not None and getattr(method, "seed_free", False):
                folders.append(_copy_saved(first, seed))
                continue
            folders.append(train_segmentation(run_dir, method, setup, seed,
                                              attribute if method.uses_attribute else ALL, progress,
                                              eval_splits=eval_splits)["folder"])
            first = first or folders[-1]
    rows = collect(run_dir, kind=SEGMENTATION).set_index("folder").loc[folders].reset_index()
    return rows[["chapter", "method", "attribute", "seed", "data", "folder"]]


def _copy_saved(folder, seed: int):
    """A saved model's folder copied to ``seed`` beside it (written to a temporary folder and renamed)."""
    target = folder.parent / f"seed-{int(seed)}"
    tmp = temporary_sibling(target)
    shutil.copytree(folder, tmp)
    replace_dir(tmp, target)
    return target


def _check_attribute(method: Method, attribute: str) -> None:
    if attribute != ALL and attribute not in FILTER_ATTRIBUTES:
        raise ResultsError(f"unknown training attribute {attribute!r}: use one of {', '.join(FILTER_ATTRIBUTES)} "
                           "(a binarised attribute trains for the one it is made from, "
                           "fairbook.data.source_attribute)")
    if method.uses_attribute == (attribute == ALL):
        need = f"one of {', '.join(FILTER_ATTRIBUTES)}" if method.uses_attribute else repr(ALL)
        use = "trains for an attribute" if method.uses_attribute else "uses no attribute"
        raise ResultsError(f"{method.name} {use}: pass attribute={need}")


def _unique_names(methods: Sequence[Method]) -> None:
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ResultsError(f"two methods share a name in {names}: give each its own name (it names its folder)")


def _record(run_dir, method: Method, setup: Setup, config: TrainConfig, folder) -> dict:
    """What a saved model's ``info.json`` records of its training: the setup's model and start, the method, the
    recipe and the checkpoint path relative to ``run_dir``."""
    return {"model": setup.model, "pretrained": setup.pretrained, "method": method.record(),
            "config": _recipe(config), "checkpoint": str((folder / "best.pt").relative_to(run_dir))}


def _evaluation_split(setup: Setup, split: str | None, preprocess, tokenizer, cache: dict | None):
    """The validation or test split (None for ``split=None``), taken from ``cache`` when an earlier run of the same
    grid already preprocessed it."""
    if split is None:
        return None
    if cache is None:
        return FairVLMed(setup.data_root, split, preprocess, tokenizer)
    key = (split, tokenizer is None)  # notes as CLIP tokens, or raw for a model that tokenises them itself
    if key not in cache:
        cache[key] = FairVLMed(setup.data_root, split, preprocess, tokenizer, keep_items=True)
    return cache[key]


def _recipe(config: TrainConfig) -> dict:
    """The recipe as a model's record keeps it: every :class:`TrainConfig` field but the run's seed."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "seed"}


def reuse(run_dir: str | os.PathLike, methods: Sequence[str], setup: Setup, seeds: Sequence[int]) -> pd.DataFrame:
    """The saved models of ``methods`` x ``seeds`` in another chapter's ``run_dir`` (rows as :func:`train_grid`
    returns them), after checking that they were trained the way ``setup`` would train them: same data, model,
    start, recipe and training-draw size. A chapter that compares against models another chapter trained (e.g.
    the mitigations of chapter 23 against chapter 14's plain usages) reads them this way instead of training them
    again under the same names. A mismatch or a missing model is a one-line :class:`ResultsError`."""
    rows = collect(run_dir)
    rows = rows[rows["method"].isin(methods) & rows["seed"].isin(seeds)]
    missing = sorted({(m, s) for m in methods for s in seeds} - set(zip(rows["method"], rows["seed"])))
    if missing:
        raise ResultsError(f"{run_dir} has no saved {missing[0][0]!r} at seed {missing[0][1]}: run the chapter "
                           "that trains it with the same configuration first")
    want = {"data": describe(setup.data_root), "model": setup.model, "pretrained": setup.pretrained,
            "config": _recipe(setup.config)}
    for row in rows.to_dict("records"):
        info = json.loads((row["folder"] / "info.json").read_text())
        for key, value in want.items():
            saved = json.loads(json.dumps(info.get(key)))
            if saved != json.loads(json.dumps(value)):
                raise ResultsError(f"{row['method']} (seed {row['seed']}) in {run_dir} was trained with {key} "
                                   f"{saved!r}, not {value!r}: run both chapters with the same parameters")
        if setup.n_train is not None and info.get("n_train") != setup.n_train:
            raise ResultsError(f"{row['method']} (seed {row['seed']}) in {run_dir} was trained on "
                               f"{info.get('n_train')} pairs, not {setup.n_train}: run both chapters with the same "
                               "n_train")
    return rows.reset_index(drop=True)


def histories(rows: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch training record of each model of ``rows`` (from :func:`train_grid` or
    :func:`fairbook.results.collect`): method, attribute, seed, then epoch, train_loss, reg_loss, val_auc, seconds,
    and ``kept`` (True for the epoch chosen on validation, whose weights the model keeps)."""
    out = []
    for row in rows.to_dict("records"):
        info = json.loads((row["folder"] / "info.json").read_text())
        out += [{"method": row["method"], "attribute": row["attribute"], "seed": row["seed"], **epoch,
                 "kept": epoch["epoch"] == info.get("best_epoch")} for epoch in info.get("history", [])]
    return pd.DataFrame(out)


def step_records(rows: pd.DataFrame) -> pd.DataFrame:
    """The per-step record an objective kept while training each model of ``rows`` (MultiFair's modulation
    factors, :meth:`fairbook.methods.multifair.DualModulation.record`): method, attribute, seed, then the record's
    columns (``step``, ``B_image`` ...); models whose objective kept none contribute no rows."""
    out = []
    for row in rows.to_dict("records"):
        info = json.loads((row["folder"] / "info.json").read_text())
        steps = (info.get("objective") or {}).get("steps", [])
        out += [{"method": row["method"], "attribute": row["attribute"], "seed": row["seed"], **step}
                for step in steps]
    return pd.DataFrame(out)


def saved_method(run_dir: str | os.PathLike, name: str) -> Method:
    """The method ``name`` as a run folder trained it (its settings as recorded, e.g. a weight chosen on
    validation), so that another chapter can build on exactly that method, e.g. ablate one of its components."""
    rows = collect(run_dir)
    records = {json.dumps(json.loads((folder / "info.json").read_text()).get("method"), sort_keys=True)
               for folder in rows.loc[rows["method"] == name, "folder"]}
    records.discard("null")
    if len(records) != 1:
        problem = "no saved model" if not records else "models with different settings"
        raise ResultsError(f"{run_dir} holds {problem} of {name!r}: run the chapter that trains it with this "
                           "configuration first")
    return method_from_record(json.loads(records.pop()))


def load_model(run_dir: str | os.PathLike, method: str, attribute: str, seed: int):
    """Rebuild a model that :func:`train_one` trained and load its kept epoch; returns
    ``(model, preprocess_val, tokenizer)``, the model in eval mode.

    The architecture comes from the model's ``info.json`` (``model``, ``pretrained`` and the method record, whose
    ``adapt`` is replayed), the weights from its ``best.pt``."""
    run_dir = resolve(run_dir)
    info_path = model_folder(run_dir, method, attribute, seed) / "info.json"
    if not info_path.is_file():
        raise ResultsError(f"no saved model {method!r} ({attribute}, seed {seed}) in {run_dir}: run the chapter "
                           "that trains it first, or pick a method, attribute and seed from fb.results.collect")
    info = json.loads(info_path.read_text())
    if "method" not in info:
        raise ResultsError(f"{info_path} does not record its method (saved by an older fairbook): run that "
                           "chapter again")
    net, _, preprocess_val, tokenizer = create_clip(info["model"], info["pretrained"])
    saved = method_from_record(info["method"])
    net = saved.adapt(net, tokenizer)
    load_checkpoint(model_folder(run_dir, method, attribute, seed, kind="checkpoints") / "best.pt", net)
    return net.eval(), preprocess_val, saved.data_tokenizer(tokenizer)


def load_segmentation_model(run_dir: str | os.PathLike, method: str, attribute: str, seed: int):
    """Rebuild a segmentation model that :func:`train_segmentation` trained (its SAM architecture and method from
    ``info.json``) with its kept epoch loaded; returns the :class:`~fairbook.segmentation.training.PromptedSAM`
    in eval mode. The checkpoint holds every weight, frozen ones included, so the start it was trained from
    (``pretrained``, possibly a folder of a run that has since been renamed) is not read."""
    run_dir = resolve(run_dir)
    info_path = model_folder(run_dir, method, attribute, seed, kind=SEGMENTATION) / "info.json"
    if not info_path.is_file():
        raise ResultsError(f"no saved segmentation model {method!r} ({attribute}, seed {seed}) in {run_dir}: run "
                           "the chapter that trains it first, or pick one from collect(run_dir, kind=SEGMENTATION)")
    info = json.loads(info_path.read_text())
    net = method_from_record(info["method"]).adapt(create_sam(info["model"]))
    load_checkpoint(run_dir / info["checkpoint"], net)
    return net.eval()


def validation_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """Validation AUC and ES-AUC of each model of ``rows`` (from :func:`train_grid` or
    :func:`fairbook.results.collect`), for the attribute it trained on (every attribute, averaged, for a model
    that used none). Both are threshold-free, so nothing is fitted on the validation split for them."""
    out = []
    for row in rows.to_dict("records"):
        val = read_predictions(row["folder"], "validation")
        attributes = FILTER_ATTRIBUTES if row["attribute"] == ALL else [row["attribute"]]
        report = fairness_report(val["y_true"], val["y_score"], {a: val[a] for a in attributes})
        entries = list(report["attributes"].values())  # each holds the overall AUC and its attribute's ES-AUC
        out.append({"method": row["method"], "attribute": row["attribute"], "seed": row["seed"],
                    "val_auc": entries[0]["auc"], "val_es_auc": float(np.mean([e["es_auc"] for e in entries]))})
    return pd.DataFrame(out)


def choose_on_validation(run_dir: str | os.PathLike, candidates: Sequence[Method], setup: Setup,
                         seeds: Sequence[int], attributes: Sequence[str] = FILTER_ATTRIBUTES,
                         auc_slack: float = 0.01, name: str | None = None, progress: bool = False
                         ) -> tuple[Method, pd.DataFrame]:
    """Choose one of ``candidates`` (the same method with different settings, each with its own name) on
    validation; returns ``(chosen method, table)``, the chosen method renamed ``name`` when given (the name it
    then trains under, e.g. "FairCLIP").

    Every candidate is trained for ``attributes`` x ``seeds`` (often fewer than the chapter's, to stay in budget)
    into ``run_dir`` without ever scoring the test split. The criterion: the highest mean validation ES-AUC among
    the candidates whose mean validation AUC is within ``auc_slack`` (one point by default) of the best one, so
    that fairness is not bought with a collapse of accuracy. ``table`` has one row per candidate: ``method``,
    ``val_auc``, ``val_es_auc`` (means over attributes and seeds), ``eligible`` and ``chosen``.
    """
    if len(candidates) < 1:
        raise ResultsError("choose_on_validation needs at least one candidate setting")
    rows = train_grid(run_dir, candidates, setup, seeds, attributes, progress, test=False)
    scores = validation_scores(rows).groupby("method", sort=False)[["val_auc", "val_es_auc"]].mean()
    table = scores.reindex([m.name for m in candidates]).reset_index()
    table["eligible"] = table["val_auc"] >= table["val_auc"].max() - auc_slack
    best = table.loc[table["eligible"], "val_es_auc"].idxmax()
    table["chosen"] = table.index == best
    chosen = candidates[int(best)]
    return (chosen if name is None else chosen.replace(name=name)), table
