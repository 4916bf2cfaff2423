"""Benchmark: training throughput of the protocol's grid, in optimizer steps per second of wall time, for CLIP,
FairCLIP and Fair-MoE.

    python bench/bench_grid.py [DATA_ROOT] [--seeds 0 1] [--n-train 1000] [--epochs 2] [--json OUT]

Each method is trained for race on every seed through :func:`fairbook.protocol.train_grid`, exactly as a chapter
trains it (chapter 11's recipe with ``epochs`` and ``n_train`` pairs, the tiny CLIP from random weights, FairCLIP
lambda 100, Fair-MoE with chapter 13's layers). The wall time of the whole grid counts: model building, reading
and preprocessing, the optimizer steps, the validation scoring after each epoch and the final test scoring, so
the figure is what a chapter sees. ``steps/s`` = optimizer steps of all runs / wall seconds.

The numbers describe this machine at this moment: compare before and after a change in one sitting.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import torch

from fairbook import protocol
from fairbook.files import atomic_write_text
from fairbook.methods import CLIP, FairCLIP, FairMoE
from fairbook.train import TrainConfig

LAYERS = {"n_experts": 10, "top_k": 3, "capacity": 0.8, "feature_experts": 4, "feature_top_k": 2}
METHODS = {"CLIP": CLIP(), "FairCLIP": FairCLIP(lam=100.0), "Fair-MoE": FairMoE(layers=LAYERS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", nargs="?", default="data/synth-fairvlmed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    config = TrainConfig.preset("fairclip", epochs=args.epochs, lr=1e-4, prompts="fairmedfm")
    setup = protocol.Setup(args.data_root, config, n_train=args.n_train)
    steps_per_run = args.epochs * math.ceil(args.n_train / config.batch_size)
    results = {}
    print(f"{len(args.seeds)} seeds x race, {args.n_train} pairs, {args.epochs} epoch(s), batch {config.batch_size}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)
    for name in args.methods:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            protocol.train_grid(out, [METHODS[name]], setup, args.seeds, ["race"])
            seconds = time.perf_counter() - start
        steps = steps_per_run * len(args.seeds)
        results[name] = {"seconds": seconds, "steps": steps, "steps_per_s": steps / seconds}
        print(f"{name:<10}{seconds:>8.1f} s{steps:>6} steps{steps / seconds:>8.2f} steps/s", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"settings": vars(args), "torch": torch.__version__,
                                                 "machine": platform.machine(), "cpus": os.cpu_count(),
                                                 "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
