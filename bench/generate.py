"""Write a deterministic Jetstream workload as JSONL (zstd-compressed when OUT ends in .zst).

    python bench/generate.py OUT.jsonl[.zst] --events N --seed S [--accounts A] [--celebrity X]

The file feeds `indexer ingest file OUT` and the throughput benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate a deterministic Jetstream (v1 JSON) workload as JSONL.",
    )
    parser.add_argument("out", type=Path, help="output file (.jsonl, or .zst for zstd)")
    parser.add_argument("--events", "-n", type=_positive, default=100_000, help="event count")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--accounts", type=_positive, default=None, help="accounts (default max(1000, N/20))"
    )
    parser.add_argument(
        "--celebrity",
        type=float,
        default=0.0,
        help="share of likes, reposts and follows going to one post and its author (default 0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from indexer.workload import write_jsonl
    except ImportError:  # run from a checkout without the package installed
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from indexer.workload import write_jsonl

    started = time.perf_counter()
    try:
        count = write_jsonl(
            args.out, args.events, args.seed, accounts=args.accounts, celebrity=args.celebrity
        )
    except (OSError, ValueError) as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    rate = count / elapsed if elapsed > 0 else 0.0
    print(f"{count} events written to {args.out} in {elapsed:.2f} s ({rate:,.0f} events/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
