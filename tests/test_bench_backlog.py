"""`python -m bench.backlog` at a small scale: it fills, indexes, stops the replica and reports."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.backlog import markdown, measure


async def test_a_replica_is_measured_against_a_backlog(tmp_path: Path):
    opts = argparse.Namespace(deep=3000, shallow=1500, index=1000, accounts=200, seed=3)
    shallow = await measure(opts.shallow, opts, tmp_path)
    deep = await measure(opts.deep, opts, tmp_path)
    for result in (shallow, deep):
        assert result.indexed >= 1000
        assert result.indexed <= result.backlog
        assert result.exit_code == 0
        assert result.warnings == 0
        assert 10 < result.peak_rss_mb < 1000
    assert deep.redis_mb > shallow.redis_mb
    table = markdown(opts, [shallow, deep])
    assert "| 3,000 |" in table
    assert "peak RSS, deep ÷ shallow:" in table
