"""Benchmark: fairbook's vectorised bootstrap report vs fairlearn's MetricFrame bootstrap.

Ours: ``fairbook.metrics.fairness_report`` on N test samples x 4 attributes x B resamples (every metric of
METRICS and GROUP_METRICS, with percentile CIs for all of them, ECE included).
fairlearn: for each attribute one ``MetricFrame(..., n_boot=B, ci_quantiles=[0.025, 0.975])`` with AUC, ACC,
TPR, FPR, selection rate and count (one frame on the scores, thresholded inside the wrapped metrics: the
cheapest way to get the same per-group quantities from fairlearn), which also yields CIs of the overall,
per-group and difference values (DPD, TPR/FPR gaps).

fairlearn's bootstrap costs tens of milliseconds per resample; ``--fairlearn-boot`` can time fewer resamples and
extrapolate linearly to B (the output says so). Usage::

    python bench/bench_metrics.py                         # 2,000 x 4 x 1,000, full fairlearn run
    python bench/bench_metrics.py --fairlearn-boot 100 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from fairlearn.metrics import MetricFrame, count, false_positive_rate, selection_rate, true_positive_rate
from sklearn.metrics import accuracy_score, roc_auc_score

import fairbook
from fairbook.metrics import fairness_report

THRESHOLD = 0.5


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, scores and four imbalanced attributes shaped like FairVLMed's (race, gender, ethnicity, language)."""
    rng = np.random.default_rng(seed)
    groups = {
        "race": rng.choice(3, n, p=[0.08, 0.15, 0.77]),
        "gender": rng.choice(2, n, p=[0.57, 0.43]),
        "ethnicity": rng.choice(2, n, p=[0.95, 0.05]),
        "language": rng.choice(3, n, p=[0.92, 0.03, 0.05]),
    }
    y = (rng.random(n) < 0.3 + 0.1 * (groups["race"] == 1)).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(n) - 0.05 * groups["gender"], 0, 1)
    return y, p, groups


def _thresholded(metric):
    def wrapped(y_true, y_score):
        return metric(y_true, (np.asarray(y_score) >= THRESHOLD).astype(int))
    wrapped.__name__ = metric.__name__
    return wrapped


FAIRLEARN_METRICS = {
    "auc": roc_auc_score, "acc": _thresholded(accuracy_score), "tpr": _thresholded(true_positive_rate),
    "fpr": _thresholded(false_positive_rate), "selection_rate": _thresholded(selection_rate), "count": count,
}


def run_fairlearn(y, p, groups, n_boot: int | None, seed: int = 0) -> None:
    """One MetricFrame per attribute; ``n_boot=None``: point estimates only."""
    boot = {} if n_boot is None else {"n_boot": n_boot, "ci_quantiles": [0.025, 0.975], "random_state": seed}
    for values in groups.values():
        frame = MetricFrame(metrics=FAIRLEARN_METRICS, y_true=y, y_pred=p, sensitive_features=values, **boot)
        frame.difference_ci() if boot else frame.difference()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="test samples")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--fairlearn-boot", type=int, default=None,
                        help="resamples actually run for fairlearn (default: --n-boot); fewer are extrapolated")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of ours (best is reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    fl_boot = args.fairlearn_boot or args.n_boot

    y, p, groups = synthetic(args.n)
    fairness_report(y, p, groups, n_boot=10)  # warm-up (imports, caches)
    ours = best_of(lambda: fairness_report(y, p, groups, n_boot=args.n_boot, seed=0), args.repeats)
    ours_point = best_of(lambda: fairness_report(y, p, groups, n_boot=0), args.repeats)
    fl_measured = best_of(lambda: run_fairlearn(y, p, groups, fl_boot), 1)
    fl_point = best_of(lambda: run_fairlearn(y, p, groups, None), args.repeats)
    # extrapolate only the bootstrap part: point-estimate cost + per-resample cost x B
    fl = fl_measured if fl_boot == args.n_boot else fl_point + (fl_measured - fl_point) * args.n_boot / fl_boot

    result = {
        "n": args.n, "attributes": len(groups), "n_boot": args.n_boot, "fairlearn_boot_run": fl_boot,
        "fairlearn_extrapolated": fl_boot != args.n_boot,
        "ours_s": ours, "ours_point_only_s": ours_point, "fairlearn_s": fl, "fairlearn_point_only_s": fl_point,
        "speedup": fl / ours, "goal_speedup_10x": fl / ours >= 10, "goal_ours_under_5s": ours <= 5,
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "fairbook": fairbook.__version__,
    }
    note = f" (extrapolated from {fl_boot} resamples)" if result["fairlearn_extrapolated"] else ""
    print(f"{args.n} samples x {len(groups)} attributes x {args.n_boot} bootstrap resamples")
    print(f"{'':34s}{'seconds':>10s}")
    print(f"{'fairbook fairness_report':34s}{ours:10.2f}")
    print(f"{'  (point estimates only)':34s}{ours_point:10.2f}")
    print(f"{'fairlearn MetricFrame n_boot':34s}{fl:10.2f}{note}")
    print(f"{'  (point estimates only)':34s}{fl_point:10.2f}")
    print(f"{'speed-up':34s}{fl / ours:9.1f}x   goals: >= 10x {'met' if result['goal_speedup_10x'] else 'MISSED'}, "
          f"<= 5 s {'met' if result['goal_ours_under_5s'] else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.json.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(result, tmp, indent=2)
        os.replace(tmp.name, args.json)
    return result


if __name__ == "__main__":
    main()
