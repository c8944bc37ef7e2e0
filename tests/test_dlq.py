"""`indexer dlq`: list, show, retry and drop what the replicas dead-lettered."""

from __future__ import annotations

import json

from tests.helpers import LIKE, POST, create, like_record, push, uri
from tests.observe import indexer, indexer_env


async def _dead_lettered(settings, redis, drain) -> list[str]:
    """Two entries a replica cannot index (one fixable later), dead-lettered; returns their ids."""
    good = create(2, LIKE, "l1", like_record(uri(1, POST, "p1")), 10)
    ids = await push(redis, settings.live_stream, [b"{not json", b'{"type":"nope"}', good])
    await drain()
    return ids[:2]


async def test_list_show_retry_drop(settings, redis, db, drain):
    originals = await _dead_lettered(settings, redis, drain)
    env = indexer_env(settings)
    code, out, err = await indexer(env, "dlq", "list", "--json")
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [e["original_id"] for e in listed] == originals
    assert listed[0]["stream"] == settings.live_stream
    assert listed[0]["deliveries"] == 1
    assert listed[0]["reason"].startswith("undecodable event")
    first, second = (e["id"] for e in listed)

    code, out, _ = await indexer(env, "dlq", "show", first)
    assert code == 0
    assert json.loads(out)["event"] == "{not json"

    code, out, _ = await indexer(env, "dlq", "list")
    assert code == 0
    assert f"{settings.live_stream}:dlq: 2" in out  # the table ends with the count per stream

    # retry puts the event back on its stream and takes it out of the dead-letter stream
    length = await redis.xlen(settings.live_stream)
    code, out, _ = await indexer(env, "dlq", "retry", first)
    assert code == 0 and out.startswith(f"retried {first} as ")
    new_id = out.split()[-1]
    assert await redis.xlen(settings.live_stream) == length + 1
    [(_, fields)] = await redis.xrange(settings.live_stream, new_id, new_id)
    assert fields == {b"event": b"{not json"}
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 1

    code, out, _ = await indexer(env, "dlq", "drop", second)
    assert (code, out.strip()) == (0, f"dropped {second}")
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0

    code, _, err = await indexer(env, "dlq", "show", second)
    assert code == 1
    assert err.strip().startswith(f"error: no dead-letter entry {second} in ")


async def test_retry_all_and_bad_arguments(settings, redis, drain):
    await _dead_lettered(settings, redis, drain)
    env = indexer_env(settings)
    code, _, err = await indexer(env, "dlq", "retry")
    assert (code, err.strip()) == (2, "error: give either an entry id or --all")
    code, out, _ = await indexer(env, "dlq", "retry", "--all")
    assert (code, out.strip()) == (0, "retried 2 entries")
    assert await redis.xlen(f"{settings.live_stream}:dlq") == 0
    code, _, err = await indexer(env, "dlq", "show", "not-an-id")
    assert code == 1 and "not-an-id" in err and "Traceback" not in err
