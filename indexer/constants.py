"""Every Redis key, stream name and default, defined once."""

from __future__ import annotations

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_DATABASE_URL = "postgresql://localhost:5432/postgres"
LIVE_STREAM = "firehose_live"
BACKFILL_STREAM = "firehose_backfill"
LABEL_STREAM = "label_live"
DEFAULT_STREAMS = (LIVE_STREAM, BACKFILL_STREAM)
DEFAULT_GROUP = "firehose_group"
EVENT_FIELD = b"event"

DEFAULT_BATCH_SIZE = 500
DEFAULT_CONCURRENCY = 2
DEFAULT_DB_POOL_SIZE = 4
DEFAULT_METRICS_PORT = 9090
DEFAULT_HIGH_WATER_MARK = 1_000_000
DEFAULT_JETSTREAM_URLS = ("wss://jetstream2.us-east.bsky.network/subscribe",)
DEFAULT_RELAY_URL = "wss://bsky.network"
DEFAULT_PLC_URL = "https://plc.directory"

DEFAULT_BLOCK_MS = 1000
DEFAULT_ACQUIRE_TIMEOUT_S = 30.0
DEFAULT_SHUTDOWN_GRACE_S = 20.0
DEFAULT_INGEST_BATCH = 1000

# Bounds applied before anything reaches PostgreSQL.
MAX_TEXT_CHARS = 30_000
MAX_SHORT_CHARS = 3_000
MAX_CID_CHARS = 200
MAX_RECORD_JSON_BYTES = 1_000_000
UNPARSEABLE_DATE = "1970-01-01T00:00:00.000Z"


def dlq_stream(stream: str) -> str:
    """The dead-letter stream of a stream."""
    return f"{stream}:dlq"


def cursor_key(stream: str, host: str) -> str:
    """Where an ingester saves its cursor for a stream."""
    return f"{stream}:cursor:{host}"
