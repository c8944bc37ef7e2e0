"""The metrics a replica sets while it runs, read back from its registry with their values."""

from __future__ import annotations

import asyncio

from indexer.metrics import Metrics
from indexer.replica import Replica
from plugins import registry
from tests.helpers import LIKE, POST, create, delete, like_record, post_record, push, uri


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_events_are_counted_by_collection_operation_and_outcome(settings, redis):
    p1 = uri(1, POST, "p1")
    events = [
        create(1, POST, "p1", post_record(), 10),
        create(2, LIKE, "l1", like_record(p1), 11),  # stays: indexed
        create(3, LIKE, "l2", like_record(p1), 11),  # superseded in its batch: unchanged
        create(3, LIKE, "l2", like_record(p1), 11),  # redelivered: unchanged
        delete(3, LIKE, "l2", 12),  # of a record never seen live: a tombstone, unchanged
        create(3, "com.example.unknown", "x", {"a": 1}, 13),
        {"type": "identity", "did": "did:plc:x", "handle": "x.test"},
        b"{broken",
    ]
    await push(redis, settings.live_stream, events)
    metrics = Metrics()
    replica = Replica(settings.replace(consumer="m"), registry(), metrics)
    await asyncio.wait_for(replica.run(drain=True), 60)

    total = "indexer_events_total"
    assert _value(metrics, total, collection=POST, operation="create", outcome="indexed") == 1
    assert _value(metrics, total, collection=LIKE, operation="create", outcome="indexed") == 1
    assert _value(metrics, total, collection=LIKE, operation="create", outcome="unchanged") == 2
    assert _value(metrics, total, collection=LIKE, operation="delete", outcome="unchanged") == 1
    assert _value(metrics, total, collection="other", operation="create", outcome="skipped") == 1
    assert _value(metrics, total, collection="-", operation="identity", outcome="skipped") == 1
    assert _value(metrics, total, collection="unknown", operation="unknown",
                  outcome="dead_letter") == 1  # fmt: skip
    assert _value(metrics, "indexer_batch_size_sum") == len(events)
    assert _value(metrics, "indexer_batch_duration_seconds_count") >= 1
    assert _value(metrics, "indexer_db_pool_size") == settings.db_pool_size
    # the sample's event time is in 2024: the newest indexed event is that far behind
    assert _value(metrics, "indexer_event_lag_seconds") > 3600 * 24 * 300
    assert replica.indexed == 2
