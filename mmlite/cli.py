"""The command line: `python -m mmlite data | train | bench | sweep | book` (each subcommand lives with its module)."""

from __future__ import annotations

import argparse
import sys


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmlite",
        description="mmlite: multimodal image-text models from scratch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("data", help="generate the shapes data world (splits, statistics, sample grid)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"],
                   help="size preset (default: tiny)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="generator seed (default: 0)")
    p.add_argument("--out", default=None,
                   help="output folder (default: $MMLITE_DATA, else <repository>/data/cache, then <preset>-seed<seed>[-size<N>])")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="image side in pixels (default: the preset's, 32)")

    p = sub.add_parser("train", help="train the complete image-text model, evaluate it, write a run folder")
    from mmlite.experiment.command import add_arguments

    add_arguments(p)

    p = sub.add_parser("bench", help="time the components against PyTorch's own, and the presets' training (MFU)")
    from mmlite.bench import add_arguments as bench_arguments

    bench_arguments(p)

    p = sub.add_parser("sweep", help="train the chapters' matching recipe over variants and seeds, store the results")
    p.add_argument("--out", default="data/sweeps/matching.json", help="JSON file to write (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to run with each of --steps (default: the chapters' plan)")
    p.add_argument("--steps", type=_positive_int, nargs="+", default=[300], help="steps per run, with --variants")
    p.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--workers", type=_positive_int, default=2, help="runs at a time, one thread each (default: 2)")

    p = sub.add_parser("book", help="re-sync chapter pairs (.py -> .ipynb) and re-execute them in place")
    p.add_argument("chapters", nargs="*",
                   help="chapter numbers or paths (default: every chapter)")
    p.add_argument("--no-execute", action="store_true", help="only sync the notebooks, keep no outputs")
    p.add_argument("--check", action="store_true",
                   help="only check that each pair holds the same cells; exit 1 if not")
    p.add_argument("--timeout", type=_positive_int, default=1200, help="per-cell timeout in seconds")
    p.add_argument("--offsets", type=_positive_int, nargs="+", default=None, metavar="K",
                   help="instead: execute each chapter once per MMLITE_SEED_OFFSET=K into --out, and print the "
                        "spread of the numbers its '# NBVAL_IGNORE_OUTPUT' cells print (for setting assert bounds)")
    p.add_argument("--out", default="runs/spread", help="where --offsets writes its notebooks (default: runs/spread)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "data":
            from mmlite.data.command import run
        elif args.command == "train":
            from mmlite.experiment.command import run
        elif args.command == "bench":
            from mmlite.bench import run
        elif args.command == "sweep":
            from mmlite.sweep import run
        else:  # book
            from mmlite.book import run
        return run(args) or 0
    except ValueError as err:  # bad values the parser could not see: one clear line, no traceback
        print(f"python -m mmlite {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused (full disk, permissions, ...): one line too
        print(f"python -m mmlite {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
