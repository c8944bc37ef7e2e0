"""The `indexer` command as users run it: real processes against the throwaway servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zstandard

from indexer.migrate import load_migrations
from indexer.workload import write_jsonl
from tests.helpers import assert_no_drift, snapshot
from tests.observe import indexer_env

BAD_LINES = [
    b"{broken",
    b'{"kind":"commit","did":"did:plc:x"}',
    b'{"neither":1}',
    b'{"type":"identity","did":"did:plc:x","deep":' + b"[" * 1500 + b"]" * 1500 + b"}",
]


def _env(settings) -> dict[str, str]:
    return indexer_env(settings, INDEXER_BATCH_SIZE="200", INDEXER_STARTUP_TIMEOUT_S="2")


def _indexer(*args: str) -> list[str]:
    return [sys.executable, "-m", "indexer.cli", *args]


async def _reference_state(settings, path: Path, env: dict[str, str]) -> dict[str, object]:
    """The state the events in `path` give when indexed without incident, in a fresh database."""
    import asyncpg

    admin = await asyncpg.connect(settings.database_url)
    name = f"ref_{os.getpid()}_{int(time.time() * 1000)}"
    template = settings.database_url.rsplit("/", 1)[0] + "/" + name
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE indexer_template')
        ref_env = env | {
            "DATABASE_URL": template,
            "INDEXER_STREAMS": settings.live_stream,
            "INDEXER_GROUP": settings.group,
        }
        for args in (("ingest", "file", str(path)), ("run", "--drain", "--consumer", "ref")):
            subprocess.run(_indexer(*args), env=ref_env, check=True, capture_output=True)
        conn = await asyncpg.connect(template)
        try:
            return await snapshot(conn)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _replica_under_way(
    db, env: dict[str, str], path: Path, consumer: str, *, rows: int
) -> tuple[Path, subprocess.Popen[bytes]]:
    """Ingest a file, start `indexer run`, and return once it has written `rows` records."""
    subprocess.run(_indexer("ingest", "file", str(path)), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_indexer("run", "--consumer", consumer), env=env,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while await db.fetchval("SELECT count(*) FROM record") < rows:
        assert time.monotonic() < deadline and proc.poll() is None
        await asyncio.sleep(0.02)
    return path, proc


def _sample(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "events.jsonl"
    write_jsonl(path, n, seed=7)
    with path.open("ab") as out:
        for line in BAD_LINES:
            out.write(line + b"\n")
    return path


async def test_ingest_file_plain_zst_and_stdin(settings, redis, tmp_path):
    plain = _sample(tmp_path, 500)
    packed = tmp_path / "events.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    env = _env(settings)
    for args, stdin in (([str(plain)], None), ([str(packed)], None), (["-"], plain.read_bytes())):
        done = subprocess.run(
            _indexer("ingest", "file", *args), env=env, input=stdin, capture_output=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert b"added 500 events" in done.stdout
        assert f"{len(BAD_LINES)} bad line(s) skipped".encode() in done.stdout
        assert b"line 501 skipped" in done.stderr  # the line number of the first bad line
    assert await redis.xlen(settings.live_stream) == 1500
    missing = subprocess.run(
        _indexer("ingest", "file", str(tmp_path / "nope.jsonl")), env=env, capture_output=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: no such file: {tmp_path / 'nope.jsonl'}".encode()


async def test_two_replica_processes_drain_the_stream(settings, redis, db, tmp_path):
    path = _sample(tmp_path, 3000)
    env = _env(settings)
    subprocess.run(_indexer("ingest", "file", str(path)), env=env, check=True, capture_output=True)
    procs = [
        subprocess.Popen(_indexer("run", "--drain", "--consumer", f"r{n}"), env=env,
                         stderr=subprocess.PIPE)
        for n in range(2)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    groups = await redis.xinfo_groups(settings.live_stream)
    assert (groups[0]["pending"], groups[0]["lag"]) == (0, 0)
    assert await db.fetchval("SELECT count(*) FROM record") > 2000
    assert await db.fetchval('SELECT count(*) FROM "like"') > 1000
    assert await db.fetchval("SELECT count(*) FROM post") > 200
    await assert_no_drift(db)


async def test_sigterm_finishes_the_batch_in_hand_and_exits_0(settings, redis, db, tmp_path):
    env = _env(settings) | {"INDEXER_BATCH_SIZE": "100"}
    _, proc = await _replica_under_way(db, env, _sample(tmp_path, 6000), "term", rows=500)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    pending = await redis.xpending(settings.live_stream, settings.group)
    assert pending["pending"] == 0  # the batch in hand was committed and ACKed, none left over
    groups = await redis.xinfo_groups(settings.live_stream)
    assert groups[0]["lag"] > 0  # it stopped reading: the rest waits for the next replica
    await assert_no_drift(db)


def test_help_and_bad_configuration():
    done = subprocess.run(_indexer("--help"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for command in ("migrate", "ingest", "run"):
        assert command in done.stdout
    bad = subprocess.run(
        _indexer("run"), env={"PATH": "", "INDEXER_BATCH_SIZE": "lots"}, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: INDEXER_BATCH_SIZE has an invalid value: 'lots'"


def test_unreachable_redis_is_one_masked_line(settings):
    env = _env(settings) | {"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    done = subprocess.run(
        _indexer("run", "--drain"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("error: redis at redis://:***@127.0.0.1:1/0")
    assert "hunter2" not in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_runs_end_to_end():
    """`make demo`'s program: its own servers, two replicas, exact counters reported."""
    done = subprocess.run(
        [sys.executable, "-m", "indexer.demo", "--events", "800"], capture_output=True, text=True,
        timeout=180, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lag: 0 entries not yet delivered, 0 pending, 0 dead-lettered" in done.stdout
    assert "800 events in" in done.stdout
    assert "counters: exact (drift 0)" in done.stdout


def test_run_against_an_unmigrated_database_says_so(settings, postgres_server):
    postgres_server.create_database("not_migrated")
    try:
        env = _env(settings) | {"DATABASE_URL": postgres_server.dsn("not_migrated")}
        done = subprocess.run(
            _indexer("run", "--drain"), env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        postgres_server.drop_database("not_migrated")
    assert done.returncode == 1
    names = ", ".join(m.name for m in load_migrations())
    assert done.stderr.splitlines()[-1] == (
        f"error: database is not migrated ({names} pending): run `indexer migrate`"
    )


async def test_kill_9_mid_run_then_restart_loses_and_doubles_nothing(settings, redis, db, tmp_path):
    """ACK only after COMMIT: a replica killed mid-batch leaves its batch pending, and the same
    consumer, restarted, indexes it; replayed entries are absorbed by the rev guard."""
    env = _env(settings) | {"INDEXER_BATCH_SIZE": "100"}
    path, proc = await _replica_under_way(db, env, _sample(tmp_path, 6000), "k", rows=1500)
    proc.kill()
    proc.communicate(timeout=10)
    pending = (await redis.xpending(settings.live_stream, settings.group))["pending"]
    assert pending > 0  # killed with batches read but not ACKed
    again = subprocess.run(
        _indexer("run", "--drain", "--consumer", "k"), env=env, capture_output=True, timeout=120
    )
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert (await redis.xpending(settings.live_stream, settings.group))["pending"] == 0

    # the same events, indexed in one go on a database that saw no crash, give the same state
    clean = settings.replace(streams=(settings.live_stream + "_ref",), group="ref")
    reference = await _reference_state(clean, path, env)
    assert await snapshot(db) == reference
    await assert_no_drift(db)
