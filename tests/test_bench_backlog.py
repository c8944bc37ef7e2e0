"""`python -m bench.backlog` at a small scale: it fills, indexes, stops the replica and reports."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bench.backlog import markdown, measure, parse
from indexer.workload import generate


def test_the_deep_stream_begins_with_the_shallow_one():
    """The premise of the comparison: the same first events whatever the stream's length."""
    shallow = list(generate(300, 5, accounts=40))
    assert list(itertools.islice(generate(5000, 5, accounts=40), 300)) == shallow
    assert list(itertools.islice(generate(5000, 5), 300)) != shallow  # accounts must be fixed


@pytest.mark.parametrize(
    "argv",
    [
        ["--accounts", "1"],
        ["--shallow", "100", "--index", "200"],
        ["--shallow", "5000", "--deep", "5000"],
        ["--deep", "0"],
    ],
)
def test_arguments_that_cannot_make_a_comparison_are_refused(argv: list[str]):
    with pytest.raises(SystemExit) as refused:
        parse(argv)
    assert refused.value.code == 2


async def test_a_replica_is_measured_against_a_backlog(tmp_path: Path):
    opts = parse(["--deep", "9000", "--shallow", "6000", "--index", "4000", "--accounts", "300"])
    shallow = await measure(opts.shallow, opts, tmp_path)
    deep = await measure(opts.deep, opts, tmp_path)
    for result in (shallow, deep):
        assert 4000 <= result.indexed <= result.backlog
        assert 0 < result.timed <= result.indexed
        assert result.seconds > 0
        assert result.warnings == 0
        assert 20 < result.peak_rss_mb < 300
    assert deep.backlog == 9000
    assert deep.redis_mib > shallow.redis_mib
    table = markdown(opts, [shallow, deep])
    assert f"| 9,000 | {deep.fill_s:.0f} | {deep.redis_mib:,.0f} | {deep.indexed:,} |" in table
    ratio = deep.peak_rss_mb / shallow.peak_rss_mb
    assert f"peak RSS, deep ÷ shallow: {ratio:.2f};" in table


def test_defaults_are_the_issue_s_backlog():
    opts = parse([])
    assert (opts.deep, opts.shallow, opts.index) == (10_000_000, 500_000, 200_000)
