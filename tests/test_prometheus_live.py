"""The alert rules in a real Prometheus (Debian's binary, on loopback), scraping a real ingester,
replica and coverage check fed by a fake Jetstream: every rule evaluates without error, none
fires on a healthy system, the series the rules and dashboard use exist, and the rules react
when the ingester and then the replica stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from indexer.workload import generate
from tests.deployment import (
    PROMETHEUS,
    alert_rules,
    dashboard_exprs,
    dashboards,
    exported_metrics,
    promql_names,
    tool,
)
from tests.fake_jetstream import FakeJetstream
from tests.observe import free_port, indexer_env, start_indexer, until

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(tool("prometheus") is None, reason="prometheus is not installed"),
]

# Labelled counters that have no series until their first event, which a healthy run has not
# had: a batch retried, an event skipped, a connection lost. Their names are checked against
# the code by tests/test_deploy.py.
NOT_YET = {"indexer_batch_retries_total", "ingester_skipped_total"}


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, targets: dict[str, int]) -> AsyncIterator[httpx.AsyncClient]:
    """A Prometheus scraping `targets` (job -> port on 127.0.0.1) every second, with the
    rules of docker/prometheus/alerts.yml evaluated every second; yields a client of its API."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in targets.items()
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            "prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False,
                                     timeout=10) as client:  # fmt: skip

            async def ready() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/-/ready")).status_code == 200
                return False

            await until(ready, within_s=30, step_s=0.1)
            yield client
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _api(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    answer = await client.get(f"/api/v1/{path}", params=params)
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


async def _rules(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    data = await _api(client, "rules", type="alert")
    return {r["name"]: r for g in data["groups"] for r in g["rules"]}


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)


def _recent_events(n: int) -> list[dict[str, Any]]:
    """Jetstream events of the last few seconds, so the event lag is small."""
    start = int((time.time() - 5) * 1_000_000)
    return [msgspec.json.decode(e) for e in generate(n, seed=11, start_time_us=start)]


async def test_rules_in_a_real_prometheus_are_quiet_on_a_healthy_system_and_react(
    settings, tmp_path
):
    ports = {"indexer": free_port(), "ingester": free_port(), "compare": free_port()}
    base = indexer_env(settings, INDEXER_STATS_INTERVAL_S="1")
    procs: dict[str, asyncio.subprocess.Process] = {}
    async with FakeJetstream(_recent_events(600)) as fake:
        try:
            procs["ingester"] = await start_indexer(
                base | {"METRICS_PORT": str(ports["ingester"])}, "--log-level", "WARNING",
                "ingest", "jetstream", "--url", fake.url, "--no-compress",
            )  # fmt: skip
            procs["indexer"] = await start_indexer(
                base | {"METRICS_PORT": str(ports["indexer"])}, "--log-level", "WARNING",
                "run", "--consumer", "live-1",
            )  # fmt: skip
            procs["compare"] = await start_indexer(
                base | {"METRICS_PORT": str(ports["compare"])}, "--log-level", "WARNING",
                "compare", "--url", fake.url, "--every", "1", "--duration", "1",
                "--warmup", "0", "--grace", "1",
            )  # fmt: skip
            async with prometheus(tmp_path, ports) as client:
                await _healthy_and_quiet(client)
                await _series_exist(client)
                # the ingester stops: its rule goes pending (it fires after 5 minutes)
                await _stop(procs["ingester"])
                await _until_state(client, "IngesterDisconnected", "pending")
                await _stop(procs["indexer"])
                await _until_state(client, "IndexerNoReplicaUp", "pending")
                rules = await _rules(client)
                assert all(r["health"] == "ok" for r in rules.values()), rules
        finally:
            for proc in procs.values():
                await _stop(proc)
    for name, proc in procs.items():
        assert proc.returncode == 0, name


async def _healthy_and_quiet(client: httpx.AsyncClient) -> None:
    """All three targets up, coverage measured; then every rule evaluated, healthy, inactive."""

    async def targets_up() -> bool:
        data = await _api(client, "targets", state="active")
        up = sorted(t["labels"]["job"] for t in data["activeTargets"] if t["health"] == "up")
        return up == ["compare", "indexer", "ingester"]

    await until(targets_up, within_s=30, step_s=0.2)

    async def measured() -> bool:
        data = await _api(client, "query", query="indexer_coverage_ratio == 1")
        return bool(data["result"])

    await until(measured, within_s=30, step_s=0.2)
    started = time.time()

    async def evaluated() -> dict[str, dict[str, Any]] | None:
        rules = await _rules(client)
        done = all(
            r["lastEvaluation"] and _epoch(r["lastEvaluation"]) > started for r in rules.values()
        )
        return rules if done else None

    rules = await until(evaluated, within_s=20, step_s=0.2)
    assert set(rules) == {r["alert"] for r in alert_rules()}
    health = {name: (r["health"], r.get("lastError", "")) for name, r in rules.items()}
    assert health == dict.fromkeys(rules, ("ok", ""))
    assert {name: r["state"] for name, r in rules.items()} == dict.fromkeys(rules, "inactive")


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 time in UTC, as Prometheus writes them."""
    return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()


async def _series_exist(client: httpx.AsyncClient) -> None:
    """Every metric the rules and the dashboard use has series from the live processes."""
    exprs = [r["expr"] for r in alert_rules()]
    for dashboard in dashboards().values():
        exprs += dashboard_exprs(dashboard)
    names = {name for expr in exprs for name in promql_names(expr)[0]}
    assert names <= set(exported_metrics().samples)
    missing = set()
    for name in sorted(names):
        data = await _api(client, "series", **{"match[]": name})
        if not data:
            missing.add(name)
    assert missing == NOT_YET, json.dumps(sorted(missing))


async def _until_state(client: httpx.AsyncClient, alert: str, state: str) -> None:
    async def reached() -> bool:
        return (await _rules(client))[alert]["state"] == state

    await until(reached, within_s=30, step_s=0.2)
