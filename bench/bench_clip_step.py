"""Benchmark: time of one fine-tuning step of the tiny CLIP on CPU, plain CLIP against FairCLIP.

    python bench/bench_clip_step.py [--batch 32] [--steps 20] [--warmup 3] [--threads N] [--json OUT]

One step is what :func:`fairbook.train.fit` does per batch: forward of both towers, the loss, backward,
gradient clipping (norm 1) and an AdamW update (the fused kernel, as :func:`fairbook.train.fit` runs it) with the
default :class:`fairbook.train.TrainConfig` settings.
Variants, all with the same batch size and the same sequence of batches, each from the same initial weights:

* ``clip``: :func:`fairbook.train.clip_loss` alone;
* ``clip-unfused``: the same with AdamW's default (unfused) kernel, i.e. before :func:`fairbook.train.fusable`;
* ``fairclip-paper``: plus :class:`fairbook.methods.fairclip.FairCLIPRegulariser` (attribute race, form "paper": one
  Sinkhorn divergence per race group between the batch's matched-pair cosines and the group's);
* ``fairclip-code``: plus the regulariser in the official code's form: each step also draws one batch per race
  group from :class:`fairbook.methods.fairclip.GroupBatches` and encodes it without gradient
  (:func:`fairbook.methods.fairclip.encode_groups`); those extra forward passes are part of its cost.

Batches are held in memory, so disk reading and image preprocessing are not timed: images are random tensors of
the model's input size (the cost of a forward pass does not depend on pixel values), texts are real
SynthFairVLMed note summaries (truncated as the FairVLMed loader does, then tokenised), attributes are the
generator's race, gender, ethnicity and language codes. The median over ``--steps`` timed steps after
``--warmup`` untimed ones is reported, with the ratio to the plain CLIP step. The variants take turns step by
step, so that other work on the machine slows them alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fairbook.data.attributes import FILTER_ATTRIBUTES
from fairbook.data.fairvlmed import truncate_note
from fairbook.data.synthetic import SynthConfig, sample_records
from fairbook.methods.fairclip import FairCLIPRegulariser, GroupBatches, encode_groups
from fairbook.models import create_clip
from fairbook.train import TrainConfig, clip_loss, fusable

VARIANTS = ("clip", "clip-unfused", "fairclip-paper", "fairclip-code")


def endless(loader):
    """Batches of ``loader`` for ever, reshuffled at each pass."""
    while True:
        yield from loader


class MemoryPairs(Dataset):
    """In-memory (image, note tokens, label, attributes) items shaped like :class:`fairbook.data.FairVLMed`'s,
    with its ``groups(attribute)`` method (what :class:`GroupBatches` needs)."""

    def __init__(self, n: int, image_size: int, tokenizer, seed: int = 0) -> None:
        records = sample_records(SynthConfig.preset("default", seed=seed, n_train=n, n_val=1, n_test=1))[:n]
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, image_size, image_size, generator=generator)
        self.tokens = tokenizer([truncate_note(r["summary"]) for r in records])
        self.labels = torch.tensor([r["glaucoma"] for r in records])
        self.attributes = torch.tensor([[r[a] for a in FILTER_ATTRIBUTES] for r in records])

    def __len__(self) -> int:
        return len(self.labels)

    def groups(self, attribute: str) -> np.ndarray:
        return self.attributes[:, FILTER_ATTRIBUTES.index(attribute)].numpy()

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "text": self.tokens[i], "label": self.labels[i],
                "attributes": self.attributes[i], "index": i}


class Stepper:
    """One variant's model, optimizer and batch stream; calling it runs one step and returns its seconds."""

    def __init__(self, model, data: MemoryPairs, variant: str, batch: int, seed: int) -> None:
        config = TrainConfig(batch_size=batch, seed=seed)
        self.model, self.grad_clip = model.train(), config.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        fused = None if variant == "clip-unfused" else fusable(self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay, fused=fused)
        self.variant = variant = "clip" if variant == "clip-unfused" else variant
        self.regulariser = None if variant == "clip" else FairCLIPRegulariser("race", form=variant.split("-")[1])
        self.groups = GroupBatches(data, "race", batch_size=batch, seed=seed) if variant == "fairclip-code" else None
        self.loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.batches = endless(self.loader)
        self.reg_values: list[float] = []

    def __call__(self) -> float:
        b = next(self.batches)
        start = time.perf_counter()
        out = self.model(b["image"], b["text"])
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        loss = clip_loss(image, text, scale)
        if self.variant != "clip":
            group_features = encode_groups(self.model, next(self.groups)) if self.groups is not None else None
            reg = self.regulariser(image, text, scale, b, group_features=group_features)
            loss = loss + reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        seconds = time.perf_counter() - start
        if self.variant != "clip":
            self.reg_values.append(float(reg.detach()))
        return seconds


def time_variants(model, data: MemoryPairs, variants, batch: int, steps: int, warmup: int, seed: int
                  ) -> tuple[dict[str, list[float]], dict[str, Stepper]]:
    """``(seconds of each timed step, stepper)`` per variant. The variants take turns step by step (round robin), so
    that a change
    of machine load during the run affects all of them alike; each starts from its own copy of ``model``."""
    steppers = {v: Stepper(copy.deepcopy(model), data, v, batch, seed) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for step in range(warmup + steps):
        for variant, stepper in steppers.items():
            seconds = stepper()
            if step >= warmup:
                times[variant].append(seconds)
    return times, steppers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--samples", type=int, default=512,
                        help="in-memory samples (enough for a full batch of the smallest race group)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model, _, _, tokenizer = create_clip("fairbook-tiny", device="cpu")
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    data = MemoryPairs(args.samples, int(size), tokenizer, args.seed)
    print(f"fairbook-tiny on CPU, batch {args.batch}, {args.steps} timed steps after {args.warmup}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    timed, steppers = time_variants(model, data, args.variants, args.batch, args.steps, args.warmup, args.seed)
    results = {}
    for variant, times in timed.items():
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        reg = steppers[variant].reg_values
        results[variant] = {"median_s": float(median), "q1_s": float(q1), "q3_s": float(q3),
                            "mean_s": statistics.fmean(times), "steps": len(times),
                            "mean_regulariser": statistics.fmean(reg) if reg else None}
    base = results.get("clip", {}).get("median_s")
    print(f"{'variant':<16}{'median ms':>11}{'IQR ms':>17}{'ratio':>8}")
    for variant, r in results.items():
        r["ratio_to_clip"] = r["median_s"] / base if base else None
        ratio = f"{r['ratio_to_clip']:.2f}" if base else "-"
        iqr = f"{1e3 * r['q1_s']:.1f}-{1e3 * r['q3_s']:.1f}"
        print(f"{variant:<16}{1e3 * r['median_s']:>11.1f}{iqr:>17}{ratio:>8}")

    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "model": "fairbook-tiny",
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(), "results": results}
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
