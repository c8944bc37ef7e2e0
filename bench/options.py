"""Command line: the options of one benchmark run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from indexer import constants
from indexer.devservers import PG_TEST_LOCALE

DEFAULT_CELEBRITY = 0.5
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True, slots=True)
class Options:
    events: int
    batch_size: int
    concurrency: int
    pool_size: int
    grow_rows: int
    seed: int
    celebrity: float
    write: bool
    results: Path
    pg_settings: dict[str, str]
    pg_locale: str
    copy_loads: int = 3


def positive_count(text: str) -> int:
    """An argparse type: a count of at least 1, written with or without separators."""
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 1, got {value}")
    return value


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key.strip(), value.strip()


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """--pg-setting and --pg-locale: the throwaway PostgreSQL cluster's settings and locale."""
    parser.add_argument(
        "--pg-setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL server setting over the throwaway defaults (repeatable), "
        "e.g. shared_buffers=4GB",
    )
    parser.add_argument(
        "--pg-locale",
        default=PG_TEST_LOCALE,
        metavar="LOCALE",
        help=f"the throwaway cluster's locale, so its collation (initdb --locale; default "
        f"{PG_TEST_LOCALE}); e.g. en_US.UTF-8, the postgres image's, if the machine has it",
    )


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The options from the command line (`python -m bench.run --help`)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="End-to-end indexer throughput beside the raw COPY rate of the same rows.",
    )
    parser.add_argument("--events", type=positive_count, default=200_000, help="events per phase")
    parser.add_argument("--batch-size", type=positive_count, default=constants.DEFAULT_BATCH_SIZE)
    parser.add_argument("--concurrency", type=positive_count, default=constants.DEFAULT_CONCURRENCY)
    parser.add_argument("--pool-size", type=positive_count, default=constants.DEFAULT_DB_POOL_SIZE)
    parser.add_argument(
        "--grow-rows",
        type=positive_count,
        default=2_000_000,
        help="rows in the grown tables (at least)",
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (grown: seed + 1)")
    parser.add_argument(
        "--celebrity",
        type=_share,
        default=DEFAULT_CELEBRITY,
        metavar="SHARE",
        help="celebrity phases: this share of likes, reposts and follows to one post and its "
        f"author (default {DEFAULT_CELEBRITY}; 0 skips them)",
    )
    parser.add_argument(
        "--no-celebrity",
        dest="celebrity",
        action="store_const",
        const=0.0,
        help="skip the celebrity phases (--celebrity 0)",
    )
    parser.add_argument(
        "--copy-loads",
        type=positive_count,
        default=3,
        metavar="N",
        help="COPY loads of each phase's rows, each into a fresh copy; the median is the "
        "baseline (default 3)",
    )
    add_server_options(parser)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return Options(
        events=args.events,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        pool_size=args.pool_size,
        grow_rows=args.grow_rows,
        seed=args.seed,
        celebrity=args.celebrity,
        write=not args.no_write,
        results=args.results,
        pg_settings=dict(args.pg_setting),
        pg_locale=args.pg_locale,
        copy_loads=args.copy_loads,
    )
