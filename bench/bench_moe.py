"""Benchmark: cost of Fair-MoE against plain CLIP at equal batch (parameters, step time, forward time).

    python bench/bench_moe.py [--batch 32] [--steps 12] [--warmup 2] [--threads 2] [--vit-batch 8]
                              [--vit-reps 3] [--expert-rank 64] [--skip-vit] [--json bench/results/moe.json]

Fair-MoE is :func:`fairbook.methods.fair_moe.add_fo_moe` with the paper's defaults (M1 = 10 experts, K1 = 3,
C = 0.8, patch
MoE in the last block of both towers, feature MoE after both encoders with fairbook's M2 = 4, k2 = 2).

* ``fairbook-tiny`` on CPU: parameter counts and the training step (forward of both towers, loss, backward,
  gradient clipping at norm 1, AdamW with :class:`fairbook.train.TrainConfig` defaults). Plain CLIP minimises
  :func:`fairbook.train.clip_loss`; Fair-MoE minimises it plus FOL
  (:class:`fairbook.methods.fair_moe.FairnessOrientedLoss`, attribute race, the four F terms with weight 1 and the
  paper-form
  Sinkhorn distance :class:`fairbook.methods.fairclip.FairCLIPRegulariser`). Batches come from the in-memory
  ``MemoryPairs`` of ``bench_clip_step.py`` (random images, real SynthFairVLMed notes). The two variants take
  turns step by step. Reported: wall-clock median (with IQR) and minimum over the timed steps, and the median
  process CPU time (all threads), which other jobs on a shared machine disturb less than wall time.
* ``ViT-B-16`` (open_clip, random init, no download): parameter counts and a forward pass of both towers
  (no gradient, eval mode) at a small batch, since a CPU training step of ViT-B/16 does not fit the time budget.
  Two Fair-MoE variants: the paper's (each patch expert a full copy of the MLP) and fairbook's low-rank experts
  (``expert_rank``, :class:`fairbook.methods.fair_moe.LowRankExperts`: the experts share the MLP and differ by rank-r
  updates).

Goals stated for ViT-B/16: step time <= 1.3x and parameters <= 1.15x of plain CLIP. The forward-time ratio is
the proxy measured here for the step-time goal (the backward pass adds work in about the same proportion).
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
from bench_clip_step import MemoryPairs, endless
from torch.utils.data import DataLoader

from fairbook.methods.fair_moe import FairnessOrientedLoss, add_fo_moe, moe_parameter_names, routers
from fairbook.methods.fairclip import FairCLIPRegulariser
from fairbook.models import create_clip
from fairbook.train import TrainConfig, clip_loss

RESULTS = Path(__file__).parent / "results" / "moe.json"
GOALS = {"step_ratio": 1.3, "param_ratio": 1.15}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_breakdown(plain: torch.nn.Module, fair_moe: torch.nn.Module) -> dict:
    """Total parameters of both models and where Fair-MoE's extra ones sit (per router: experts beyond the one
    MLP copy it replaces, plus the gate)."""
    extra = {}
    mlp = {"EI": plain.visual.transformer.resblocks[-1].mlp, "ET": plain.transformer.resblocks[-1].mlp}
    for name, layer in routers(fair_moe).items():
        added = n_params(layer) - (n_params(mlp[name]) if name in mlp else 0)
        extra[name] = {"added": added, "gate": n_params(layer.gate)}
    base, total = n_params(plain), n_params(fair_moe)
    return {"plain": base, "fair_moe": total, "ratio": total / base, "moe_params": sum(
        fair_moe.get_parameter(n).numel() for n in moe_parameter_names(fair_moe)), "added_by_router": extra}


class Stepper:
    """One variant's model, optimizer and batch stream; calling it runs one training step and returns seconds."""

    def __init__(self, model, data: MemoryPairs, fol: FairnessOrientedLoss | None, batch: int, seed: int) -> None:
        config = TrainConfig(batch_size=batch, seed=seed)
        self.model, self.fol, self.grad_clip = model.train(), fol, config.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay)
        self.loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.batches = endless(self.loader)
        self.fol_values: list[float] = []

    def __call__(self) -> float:
        b = next(self.batches)
        start, cpu = time.perf_counter(), time.process_time()
        out = self.model(b["image"], b["text"])
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        loss = clip_loss(image, text, scale)
        if self.fol is not None:
            reg = self.fol(image, text, scale, b)
            loss = loss + reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if self.fol is not None:
            self.fol_values.append(float(reg.detach()))
        return seconds, cpu


def summary(times: list[tuple[float, float]]) -> dict:
    """Wall-clock quartiles and minimum, and the median process CPU time (all threads), of (wall, cpu) pairs.
    On a shared machine the CPU time and the minimum are less disturbed by other jobs than the wall median."""
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    q1, median, q3 = np.percentile(wall, [25, 50, 75])
    return {"median_s": float(median), "q1_s": float(q1), "q3_s": float(q3), "min_s": min(wall),
            "mean_s": statistics.fmean(wall), "cpu_median_s": float(np.median(cpu)), "n": len(wall)}


def ratios(stats: dict, variant: str = "fair-moe") -> dict:
    """``variant`` / CLIP for the wall median, the wall minimum and the CPU-time median."""
    a, b = stats[variant], stats["clip"]
    return {key: a[key] / b[key] for key in ("median_s", "min_s", "cpu_median_s")}


def bench_tiny(args) -> dict:
    torch.manual_seed(args.seed)
    plain, _, _, tokenizer = create_clip("fairbook-tiny", device="cpu")
    fair_moe = add_fo_moe(copy.deepcopy(plain))
    size = plain.visual.image_size
    data = MemoryPairs(args.samples, int(size[0] if isinstance(size, tuple) else size), tokenizer, args.seed)
    fol = FairnessOrientedLoss(fair_moe, "race", distance=FairCLIPRegulariser("race"))
    steppers = {"clip": Stepper(plain, data, None, args.batch, args.seed),
                "fair-moe": Stepper(fair_moe, data, fol, args.batch, args.seed)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for step in range(args.warmup + args.steps):
        for name, stepper in steppers.items():
            seconds = stepper()
            if step >= args.warmup:
                times[name].append(seconds)
    result = {"params": param_breakdown(plain, fair_moe), "step": {k: summary(v) for k, v in times.items()},
              "mean_fol": statistics.fmean(steppers["fair-moe"].fol_values), "last_fol_terms": fol.last_terms}
    result["step_ratio"] = ratios(result["step"])
    return result


@torch.no_grad()
def bench_vit(args) -> dict:
    torch.manual_seed(args.seed)
    plain, _, _, tokenizer = create_clip("ViT-B-16", pretrained=None, device="cpu")
    models = {"clip": plain, "fair-moe": add_fo_moe(copy.deepcopy(plain)),
              f"fair-moe-r{args.expert_rank}": add_fo_moe(copy.deepcopy(plain), expert_rank=args.expert_rank)}
    images = torch.randn(args.vit_batch, 3, 224, 224)
    notes = ["the patient has glaucoma with a cup to disc ratio of 0.8 and inferior rim thinning"] * args.vit_batch
    tokens = tokenizer(notes)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for rep in range(1 + args.vit_reps):
        for name, model in models.items():
            start, cpu = time.perf_counter(), time.process_time()
            model.eval()(images, tokens)
            if rep:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    forward = {k: summary(v) for k, v in times.items()}
    result = {"forward": forward, "variants": {}}
    for name in list(models)[1:]:
        params, ratio = param_breakdown(plain, models[name]), ratios(forward, name)
        result["variants"][name] = {"params": params, "forward_ratio": ratio, "goals_met": {
            "params": params["ratio"] <= GOALS["param_ratio"],
            "forward_as_step_proxy": ratio["median_s"] <= GOALS["step_ratio"]}}
    return result


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed tiny training steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed tiny steps before timing")
    parser.add_argument("--samples", type=int, default=256, help="in-memory tiny samples")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--vit-reps", type=int, default=3, help="timed ViT-B-16 forwards per variant (+1 untimed)")
    parser.add_argument("--expert-rank", type=int, default=64, help="rank of the low-rank ViT-B-16 variant")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()

    tiny = bench_tiny(args)
    print(f"fairbook-tiny, CPU, {torch.get_num_threads()} threads, batch {args.batch}, median of {args.steps} steps")
    print(f"{'variant':<10}{'params':>12}{'step ms':>10}{'IQR ms':>15}{'min ms':>9}{'CPU ms':>9}")
    for name, key in (("clip", "plain"), ("fair-moe", "fair_moe")):
        s = tiny["step"][name]
        iqr = f"{1e3 * s['q1_s']:.0f}-{1e3 * s['q3_s']:.0f}"
        print(f"{name:<10}{tiny['params'][key]:>12,}{1e3 * s['median_s']:>10.1f}{iqr:>15}"
              f"{1e3 * s['min_s']:>9.0f}{1e3 * s['cpu_median_s']:>9.0f}")
    r = tiny["step_ratio"]
    print(f"ratios: params {tiny['params']['ratio']:.3f}x; step {r['median_s']:.2f}x (wall median), "
          f"{r['min_s']:.2f}x (wall min), {r['cpu_median_s']:.2f}x (CPU time); mean FOL {tiny['mean_fol']:.3g}")

    vit = None
    if not args.skip_vit:
        vit = bench_vit(args)
        print(f"\nViT-B-16 (random init), CPU, forward of both towers, batch {args.vit_batch}, "
              f"median of {args.vit_reps}")
        print(f"{'variant':<16}{'params':>14}{'forward s':>11}{'min s':>8}{'CPU s':>8}")
        first = next(iter(vit["variants"].values()))["params"]["plain"]
        for name, f in vit["forward"].items():
            count = vit["variants"][name]["params"]["fair_moe"] if name in vit["variants"] else first
            print(f"{name:<16}{count:>14,}{f['median_s']:>11.2f}{f['min_s']:>8.2f}{f['cpu_median_s']:>8.2f}")
        for name, v in vit["variants"].items():
            met, r = v["goals_met"], v["forward_ratio"]
            print(f"{name}: params {v['params']['ratio']:.3f}x (goal <= {GOALS['param_ratio']}: "
                  f"{'met' if met['params'] else 'NOT met'}); forward {r['median_s']:.2f}x wall median, "
                  f"{r['min_s']:.2f}x wall min, {r['cpu_median_s']:.2f}x CPU time "
                  f"(goal <= {GOALS['step_ratio']}: {'met' if met['forward_as_step_proxy'] else 'NOT met'})")
            for router, extra in v["params"]["added_by_router"].items():
                print(f"  {router}: +{extra['added']:,} parameters (gate {extra['gate']:,})")

    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "goals_vit_b16": GOALS, "tiny": tiny, "vit_b16": vit, "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
              "seconds": time.perf_counter() - started}
    write_json(args.json, result)
    print(f"\nwrote {args.json} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
