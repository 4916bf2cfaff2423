"""The ``fairbook`` command: data, runs, sweeps, metrics and the book.

Every error a user can cause (a missing dataset, an unknown parameter, a broken file, a bad option) is printed as
one line ``fairbook: error: ...`` with exit status 2. An unexpected error (a bug) is also one line, with exit status
1. Set ``FAIRBOOK_DEBUG=1`` to see the traceback instead. ``python -m fairbook`` is the same command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


class UsageError(Exception):
    """A command line that argparse cannot parse (an unknown option, a value of the wrong type)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (and printed as one line by :func:`main`) instead of the usage text."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int_at_least(minimum: int, label: str):
    """An argparse type for whole numbers >= ``minimum``; ``label`` names it in the error ("invalid <label> value")."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value

    parse.__name__ = label  # argparse names the expected type after the function
    return parse


_positive_int = _int_at_least(1, "positive integer")
_nonnegative_int = _int_at_least(0, "non-negative integer")


def _data_synth(args) -> None:
    import shutil

    from fairbook.data.fairseg import write_fairseg
    from fairbook.data.synthetic import SynthConfig, generate
    from fairbook.files import resolve, temporary_sibling

    config = SynthConfig.preset(args.bias, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    if args.format == "fairvlmed":
        manifest = generate(args.out, config, workers=args.workers)
        print(f"SynthFairVLMed at {args.out}: {manifest['counts']}")
        return
    staging = temporary_sibling(resolve(args.out).with_name(resolve(args.out).name + "-fairvlmed"))
    try:
        manifest = generate(staging, config, workers=args.workers, progress=False)
        write_fairseg(staging, args.out, args.keys)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"SynthFairVLMed in the FairSeg layout ({args.keys} keys) at {args.out}: {manifest['counts']} "
          "(train.txt holds Training and Validation)")


def _data_check(args) -> None:
    from pathlib import Path

    from fairbook.data.fairseg import check_fairseg
    from fairbook.data.fairvlmed import check, format_check

    if (Path(args.path) / "train.txt").is_file():  # FairSeg's split lists
        report = check_fairseg(args.path)
        print(f"Harvard-FairSeg layout at {report['root']} ({', '.join(report['key_sets'])} keys): "
              f"{report['splits']}")
        for attribute, groups in report["groups"].items():
            print(f"  {attribute}: {groups}")
        return
    print(format_check(check(args.path, decode=args.decode)))


def _run(args) -> None:
    from fairbook.runs import parse_set, run_notebook

    out = run_notebook(args.notebook, args.params, parse_set(args.set), name=args.name, force=args.force)
    print(out)


def _sweep(args) -> None:
    from fairbook.runs import sweep

    for out in sweep(args.grid, force=args.force):
        print(out)


def _book(args) -> None:
    from fairbook.book import build_book
    from fairbook.runs import check_config_name

    print(build_book(config=check_config_name(args.config, "--config")))


def _metrics(args) -> None:
    from fairbook.metrics import report_from_csv

    attributes = [a for a in args.attributes.split(",") if a]
    report = report_from_csv(args.predictions, attributes, val_path=args.val, n_boot=args.n_boot,
                             threshold=args.threshold)
    text = json.dumps(report, indent=2)
    if args.json:
        from fairbook.files import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fairbook", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make or check a Harvard-FairVLMed folder")
    data = data.add_subparsers(dest="data", required=True)
    s = data.add_parser("synth", help="write SynthFairVLMed, a synthetic dataset in the FairVLMed layout")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--bias", default="default", help="bias preset: default or none (the exchangeable control)")
    s.add_argument("--n-train", type=_positive_int, default=7000)
    s.add_argument("--n-val", type=_positive_int, default=1000)
    s.add_argument("--n-test", type=_positive_int, default=2000)
    s.add_argument("--workers", type=_positive_int, default=2)
    s.add_argument("--format", choices=("fairvlmed", "fairseg"), default="fairvlmed",
                   help="on-disk layout: FairVLMed's split folders, or Harvard-FairSeg's flat npz files and lists")
    s.add_argument("--keys", choices=("released", "readme"), default="released",
                   help="FairSeg key set: the released files' (fundus_slo, disc_cup) or the README's")
    s.set_defaults(func=_data_synth)
    c = data.add_parser("check", help="count samples, groups and prevalence (FairVLMed or FairSeg layout); fail "
                                      "on a broken folder")
    c.add_argument("path")
    c.add_argument("--decode", action="store_true",
                   help="also decode every image and check its pixels (slower; catches what would fail mid-run)")
    c.set_defaults(func=_data_check)

    r = sub.add_parser("run", help="execute a notebook with papermill into runs/<stem>/<config>/")
    r.add_argument("notebook")
    r.add_argument("-p", "--params", action="append", default=[], metavar="FILE.yaml",
                   help="parameter file; repeat to merge left to right")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    r.add_argument("--name", help="configuration name (default: the parameter files' stems)")
    r.add_argument("--force", action="store_true", help="execute even if an identical run is complete")
    r.set_defaults(func=_run)

    w = sub.add_parser("sweep", help="expand a grid file into runs; completed runs are skipped")
    w.add_argument("grid")
    w.add_argument("--force", action="store_true")
    w.set_defaults(func=_sweep)

    b = sub.add_parser("book", help="build the Jupyter Book from executed runs")
    b.add_argument("--config", default="default", help="which run configuration goes into the book")
    b.set_defaults(func=_book)

    m = sub.add_parser("metrics", help="fairness report from a predictions CSV")
    m.add_argument("predictions")
    m.add_argument("--attributes", required=True, help="comma-separated attribute columns, e.g. race,gender")
    m.add_argument("--val", help="validation predictions CSV: the threshold is chosen there, never on test")
    m.add_argument("--threshold", default="youden", help="0.5, youden, f1 or prevalence")
    m.add_argument("--n-boot", type=_nonnegative_int, default=1000, help="bootstrap resamples (0: no intervals)")
    m.add_argument("--json", help="write the report here instead of printing it")
    m.set_defaults(func=_metrics)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (UsageError, *USER_ERRORS) as err:
        if os.environ.get("FAIRBOOK_DEBUG"):
            raise
        print(f"fairbook: error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, with the way to the traceback
        if os.environ.get("FAIRBOOK_DEBUG"):
            raise
        print(f"fairbook: error: unexpected {type(err).__name__}: {_message(err)} (a bug in fairbook; rerun with "
              "FAIRBOOK_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1
    return 0


def _message(err: BaseException) -> str:
    """One line for an exception: KeyError without its quotes, OSError as 'reason: path', newlines folded."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
