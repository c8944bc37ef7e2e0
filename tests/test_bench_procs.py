"""The benchmarks' `indexer` subprocesses get only the settings the benchmark gives them."""

from __future__ import annotations

import pytest

from bench.procs import indexer_env


def test_no_indexer_setting_leaks_in_from_our_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "redis://a-developers-redis:6379/0")
    monkeypatch.setenv("INDEXER_BATCH_SIZE", "7")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = indexer_env({"INDEXER_STREAMS": "bench_live", "METRICS_PORT": "0"})
    assert "REDIS_URL" not in env and "INDEXER_BATCH_SIZE" not in env
    assert env["PATH"] == "/usr/bin"  # the rest of the environment stays
    assert (env["INDEXER_STREAMS"], env["METRICS_PORT"]) == ("bench_live", "0")
    assert indexer_env({"REDIS_URL": "redis://ours"})["REDIS_URL"] == "redis://ours"
