"""docs/operations.md: every `indexer` command it shows parses with the real CLI and is
exercised by a test; most are run here as written, against real Redis and PostgreSQL, with the
outputs the runbook describes. Its redis-cli, psql and compose commands are checked too."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
from pathlib import Path

import asyncpg
import pytest

from indexer.constants import backfill_failed_key, dlq_stream
from indexer.devservers import throwaway_redis
from tests.deployment import (
    REPO,
    RUNBOOK,
    cli_problem,
    command_signature,
    load_compose,
    runbook_commands,
    shell_blocks,
)
from tests.helpers import LIKE, POST, create, like_record, post_record, push, uri
from tests.observe import indexer, indexer_env, until

pytestmark = pytest.mark.timeout(120)

HERE = "tests/test_runbook.py::test_the_runbook_commands_run_as_written"
# Each command of the runbook (its subcommands and options) -> the test that runs it. Commands
# that need the network (Jetstream, PDSes) run in the tests with fakes of it.
EXERCISED = {
    "lag": HERE,
    "lag --json": HERE,
    "lag --max-age --max-lag": HERE,
    "lag --watch": "tests/test_lag.py::test_table_and_watch",
    "dlq list": HERE,
    "dlq show": HERE,
    "dlq retry": HERE,
    "dlq retry --all": HERE,
    "dlq drop": HERE,
    "reconcile --sample": HERE,
    "reconcile --dirty": HERE,
    "reconcile --all": HERE,
    "backfill failed": HERE,
    "run --bulk-backfill": HERE,
    "migrate": HERE,
    "compare --duration --min-coverage": "tests/test_compare.py::test_cli_json_and_min_coverage",
    "compare --duration --repair":
        "tests/test_backfill.py::test_compare_repair_backfills_the_repos_with_missing_records",
    "backfill repo":
        "tests/test_backfill.py::test_repos_that_keep_failing_are_listed_with_the_reason",
    "backfill --from-file":
        "tests/test_backfill.py::test_repos_that_keep_failing_are_listed_with_the_reason",
    "backfill all":
        "tests/test_backfill.py::test_kill_9_mid_backfill_resumes_without_loss_or_double_counting",
}  # fmt: skip
DLQ_ID = re.compile(r"^\d{13}-\d+$")


def test_every_indexer_command_of_the_runbook_parses():
    commands = runbook_commands()
    assert len(commands) >= 20
    assert [cli_problem(c) for c in commands] == [None] * len(commands)


@pytest.mark.parametrize(
    ("line", "reported"),
    [
        ("indexer dlq purge", "no command 'purge' in dlq"),
        ("indexer lag --max-lag many", "'--max-lag'"),
        ("indexer reconcile --sample 0", "'--sample'"),
        ("indexer backfill --from-fil /data/dids.txt", "--from-fil"),
    ],
)
def test_a_wrong_command_in_the_runbook_is_caught(line, reported):
    [command] = runbook_commands(f"text\n\n```sh\n{line}\n```\n")
    problem = cli_problem(command)
    assert problem is not None and reported in problem, problem


def test_every_indexer_command_of_the_runbook_is_exercised_by_a_test():
    shown = {command_signature(c) for c in runbook_commands()}
    assert shown - set(EXERCISED) == set(), "runbook commands no test exercises"
    assert set(EXERCISED) - shown == set(), "stale entries"
    for where in set(EXERCISED.values()):
        path, _, name = where.partition("::")
        source = (REPO / path).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, flags=re.MULTILINE), where
    for signature, where in EXERCISED.items():
        if where != HERE:  # that test runs the command with these words and options
            body = _test_body(where)
            assert all(f'"{word}"' in body for word in signature.split()), (signature, where)


def _test_body(where: str) -> str:
    path, _, name = where.partition("::")
    source = (REPO / path).read_text()
    start = re.search(rf"^(async )?def {name}\(", source, flags=re.MULTILINE)
    assert start is not None
    end = re.search(r"^(async )?def |^@", source[start.end() :], flags=re.MULTILINE)
    return source[start.start() : start.end() + (end.start() if end else len(source))]


def _shown(signature: str, dlq_id: str = "") -> list[str]:
    """The runbook's own arguments for a command, with a real dead-letter id in place."""
    [args] = [c for c in runbook_commands() if command_signature(c) == signature][:1]
    return [dlq_id if DLQ_ID.match(a) else a for a in args]


async def test_the_runbook_commands_run_as_written(settings, redis, db):
    """A live stream with a poison entry and a backfill stream, indexed in bulk mode; then the
    runbook's reading, dead-letter, reconcile and backfill commands, as written."""
    env = indexer_env(settings, COLUMNS="200")  # rich's tables, wide enough for whole names
    live, backfill = settings.streams
    hot = uri(1, POST, "hot")
    await push(redis, live, [create(1, POST, "hot", post_record(), 1), b"{not json"])
    await push(redis, live, [create(10 + n, LIKE, "l", like_record(hot), 2) for n in range(5)])
    await push(redis, backfill, [create(100 + n, LIKE, "b", like_record(hot), 3) | {"seq": -1}
                                 for n in range(20)])  # fmt: skip
    ran = set()

    async def run(signature: str, *extra: str, dlq_id: str = "") -> tuple[int, str, str]:
        ran.add(signature)
        return await indexer(env, *_shown(signature, dlq_id), *extra)

    code, out, err = await run("migrate")
    assert (code, out.strip()) == (0, "schema is up to date"), err
    # bulk mode: live likes counted, backfilled ones not, until reconcile --all
    code, _, err = await run("run --bulk-backfill", "--drain", "--consumer", "r1")
    assert code == 0, err
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', hot) == 5
    assert await db.fetchval('SELECT count(*) FROM "like" WHERE subject = $1', hot) == 25

    code, out, err = await run("lag")
    assert code == 0, err
    assert live in out and backfill in out and "behind" in out and "dlq" in out
    code, out, err = await run("lag --json")
    groups = {g["stream"]: g for g in json.loads(out)["groups"] if g["group"] == settings.group}
    assert {s: (g["lag"], g["pending"], g["dlq_length"]) for s, g in groups.items()} == {
        live: (0, 0, 1),
        backfill: (0, 0, 0),
    }
    code, _, err = await run("lag --max-age --max-lag")
    assert code == 0, err

    code, out, err = await run("reconcile --sample")
    assert code == 0 and ", 1 drifted, 0 repaired" in out and "likeCount: 1 keys" in out, err
    code, out, err = await run("reconcile --dirty")
    assert code == 0 and out.startswith("reconcile --dirty: "), err
    code, out, err = await run("reconcile --all")
    assert code == 0 and "1 drifted, 1 repaired" in out and "likeCount: 1 keys drifted" in out
    assert await db.fetchval('SELECT "likeCount" FROM post_agg WHERE uri = $1', hot) == 25
    code, out, _ = await run("reconcile --sample")
    assert ", 0 drifted, " in out

    # dead letters: read, replay (it fails again), replay all, drop
    [(dead_id, _)] = await redis.xrange(dlq_stream(live))
    dead_id = dead_id.decode()
    code, out, err = await run("dlq list")
    assert code == 0 and dead_id in out and f"{dlq_stream(live)}: 1" in out, err
    code, out, _ = await run("dlq show", dlq_id=dead_id)
    assert json.loads(out)["event"] == "{not json"
    code, out, _ = await run("dlq retry", dlq_id=dead_id)
    assert code == 0 and out.startswith(f"retried {dead_id} as ")
    code, _, err = await indexer(env, "run", "--drain", "--consumer", "r2")
    assert code == 0, err
    [(again, _)] = await redis.xrange(dlq_stream(live))
    assert again.decode() != dead_id
    code, out, _ = await run("dlq retry --all")
    assert (code, out.strip()) == (0, "retried 1 entries")
    await indexer(env, "run", "--drain", "--consumer", "r2")
    [(last, _)] = await redis.xrange(dlq_stream(live))
    code, out, _ = await run("dlq drop", dlq_id=last.decode())
    assert (code, out.strip()) == (0, f"dropped {last.decode()}")
    assert await redis.xlen(dlq_stream(live)) == 0

    did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
    detail = {"reason": "HTTP 400 RepoTakendown", "time": "2024-12-06T00:00:00Z"}
    await redis.hset(backfill_failed_key(backfill), did, json.dumps(detail))
    code, out, err = await run("backfill failed")
    assert (code, out.strip()) == (0, f"{did}  HTTP 400 RepoTakendown"), err
    assert "1 failed repo(s) in" in err

    assert ran == {s for s, where in EXERCISED.items() if where == HERE}


async def test_the_runbook_psql_commands_run(db: asyncpg.Connection, database_url: str):
    """Each psql command, on the test's database (compose's `bsky` and role `indexer` as
    the test's own); the role change is rolled back."""
    lines = [line for line in shell_blocks(RUNBOOK.read_text()) if " psql " in line]
    sql = [shlex.split(line)[shlex.split(line).index("-c") + 1] for line in lines]
    assert len(sql) == 3
    [activity] = [q for q in sql if "pg_stat_activity" in q and "blocking" not in q]
    rows = await db.fetch(activity.replace("'bsky'", "current_database()"))
    assert any(r["state"] == "active" for r in rows)  # this very query
    assert {"pid", "wait_event_type", "wait_event", "xact_age"} <= set(rows[0].keys())
    [blocked] = [q for q in sql if "pg_blocking_pids" in q]
    blocked = blocked.replace("'bsky'", "current_database()")
    # a session waiting for a lock another one holds: the query names the holder
    holder = await asyncpg.connect(database_url)
    waiter = await asyncpg.connect(database_url)
    try:
        await holder.execute("BEGIN; LOCK TABLE record_state IN EXCLUSIVE MODE")
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
        wait_for_lock = waiter.execute("BEGIN; LOCK TABLE record_state IN SHARE MODE")
        waiting = asyncio.create_task(wait_for_lock)
        rows = await until(lambda: db.fetch(blocked))
        assert [r["blocked_by"] for r in rows] == [[holder_pid]]
        await holder.execute("ROLLBACK")
        await waiting
    finally:
        await holder.close()
        await waiter.close()
    [timeout] = [q for q in sql if "statement_timeout" in q]
    config = "SELECT array_to_string(rolconfig, ',') FROM pg_roles WHERE rolname = current_user"
    change = db.transaction()
    await change.start()
    try:
        await db.execute(timeout.replace("ROLE indexer", "ROLE CURRENT_USER"))
        assert await db.fetchval(config) == "statement_timeout=5min"
    finally:
        await change.rollback()
    assert await db.fetchval(config) is None


def test_the_runbook_redis_commands_show_what_it_says(tmp_path: Path):
    """The redis-cli commands of "Restarting Redis", against an AOF Redis like compose's."""
    text = RUNBOOK.read_text()
    lines = [line for line in shell_blocks(text) if "redis-cli" in line]
    assert len(lines) >= 2
    with throwaway_redis(tmp_path, options={"appendonly": "yes"}) as server:
        outputs = []
        for line in lines:
            args = shlex.split(line)[shlex.split(line).index("redis-cli") + 1 :]
            command = ["redis-cli", "-h", "127.0.0.1", "-p", str(server.port), *args]
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and "ERR" not in done.stdout, (line, done.stdout)
            outputs.append(done.stdout)
    info = "".join(outputs)
    for field in re.findall(r"`([a-z_]+):\w+`", text):  # aof_rewrite_in_progress:0, loading:0
        assert re.search(rf"^{field}:", info, flags=re.MULTILINE), field


def test_the_runbook_compose_commands_name_existing_services():
    services = set(load_compose()["services"])
    subcommands = {"ps", "up", "stop", "restart", "logs", "exec", "run"}
    with_value = {"--scale", "--since", "--tail", "--index", "-f"}
    seen = set()
    for line in shell_blocks(RUNBOOK.read_text()):
        words = shlex.split(line)
        if words[:2] != ["docker", "compose"] and not line.startswith("alias indexer="):
            continue
        if line.startswith("alias indexer="):
            words = shlex.split(words[1].partition("=")[2])
        assert words[2] in subcommands, line
        args, named = words[3:], []
        i = 0
        while i < len(args):
            if args[i] in with_value:
                if args[i] == "--scale":
                    named.append(args[i + 1].split("=")[0])
                i += 2
                continue
            if not args[i].startswith("-"):
                named.append(args[i])
                if words[2] in ("exec", "run"):
                    break  # the rest is the command run in the container
            i += 1
        assert set(named) <= services, line
        seen.update(named)
    assert {"cli", "indexer", "redis", "postgres", "ingester"} <= seen
