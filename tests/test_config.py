"""Settings: DESIGN's variable names and defaults, flags on top, clear errors, masked secrets."""

from __future__ import annotations

import dataclasses

import pytest

from indexer.config import ConfigError, Settings, load_settings, mask_url


def test_defaults_are_designs():
    s = load_settings({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.database_url == "postgresql://localhost:5432/postgres"
    assert s.streams == ("firehose_live", "firehose_backfill")
    assert s.live_stream == "firehose_live"
    assert s.group == "firehose_group"
    assert s.metrics_port == 9090
    assert s.consumer  # the host name


def test_environment_is_read_and_flags_override():
    env = {
        "REDIS_URL": "rediss://:pw@cache:6380/2",
        "DATABASE_URL": "postgresql://u:pw@db/app?sslmode=require",
        "INDEXER_STREAMS": "a_live, b_backfill",
        "INDEXER_GROUP": "g",
        "INDEXER_CONSUMER": "replica-7",
        "INDEXER_BATCH_SIZE": "250",
        "INDEXER_CONCURRENCY": "3",
        "DB_POOL_SIZE": "6",
        "METRICS_PORT": "0",
        "INGESTER_HIGH_WATER_MARK": "1000",
        "JETSTREAM_URL": "ws://127.0.0.1:1/a,ws://127.0.0.1:2/b",
        "RELAY_URL": "ws://127.0.0.1:3",
        "PLC_URL": "http://127.0.0.1:4",
    }
    s = load_settings(env)
    assert (s.streams, s.group, s.consumer) == (("a_live", "b_backfill"), "g", "replica-7")
    assert (s.batch_size, s.concurrency, s.db_pool_size, s.metrics_port) == (250, 3, 6, 0)
    assert s.jetstream_urls == ("ws://127.0.0.1:1/a", "ws://127.0.0.1:2/b")
    assert (s.high_water_mark, s.relay_url, s.plc_url) == (1000, env["RELAY_URL"], env["PLC_URL"])
    flagged = s.replace(consumer="other", batch_size=None)
    assert (flagged.consumer, flagged.batch_size) == ("other", 250)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.group = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INDEXER_BATCH_SIZE": "many"}, "INDEXER_BATCH_SIZE has an invalid value: 'many'"),
        ({"INDEXER_BATCH_SIZE": "0"}, "batch_size must be at least 1, got 0"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT must be 0..65535, got 70000"),
        ({"INDEXER_STREAMS": " , "}, "INDEXER_STREAMS must name at least one stream"),
        ({"REDIS_URL": "http://:pw@h/0"}, "REDIS_URL must be redis://, rediss:// or unix://: "
                                          "http://:***@h/0"),
        ({"DATABASE_URL": "mysql://u:pw@h/db"}, "DATABASE_URL must be postgresql://: "
                                                "mysql://u:***@h/db"),
    ],
)  # fmt: skip
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    assert str(raised.value) == message


def test_mask_url_hides_only_the_password():
    assert mask_url("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert mask_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert mask_url("redis://cache:6379/0") == "redis://cache:6379/0"
    shown = repr(
        Settings(redis_url="redis://:s3cret@h/0", database_url="postgresql://u:s3cret@d/x")
    )
    assert "s3cret" not in shown
    assert "redis_url='redis://:***@h/0'" in shown
