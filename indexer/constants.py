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

DEFAULT_BATCH_SIZE = 2000
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

# Ingesters (issue 4). The socket is read again once the backlog falls below this share of the
# high-water mark; a source silent for the stall timeout is treated as failed; Jetstream resumes
# this far before its saved cursor (its time_us differ between instances); reconnects back off
# exponentially from the base to the cap, with jitter.
LOW_WATER_SHARE = 0.8
DEFAULT_INGESTER_STALL_TIMEOUT_S = 30.0
DEFAULT_JETSTREAM_REWIND_S = 5.0
DEFAULT_INGESTER_COLLECTIONS = ("app.bsky.*",)
DEFAULT_INGESTER_QUEUE_SIZE = 5_000
DEFAULT_INGESTER_QUEUE_BYTES = 64 * 2**20  # envelope bytes between socket and Redis
DEFAULT_INGESTER_BACKOFF_S = 0.5
INGESTER_BACKOFF_MAX_S = 30.0
INGESTER_BACKPRESSURE_POLL_S = 0.2
JETSTREAM_MAX_MESSAGE_BYTES = 2**20  # after decompression
RELAY_MAX_FRAME_BYTES = 5 * 2**20  # a commit carries 2 MiB of blocks at most
# A message over its source's limit is still read whole (up to this), then skipped and counted:
# closing the socket instead would resume before it and read it again after every reconnect.
INGESTER_SOCKET_MAX_BYTES = 16 * 2**20
# A Jetstream time_us further ahead of our clock than this is bad (its clock and ours cannot be
# an hour apart): saved as the cursor, it would resume the stream in the future.
JETSTREAM_MAX_AHEAD_S = 3600.0
RELAY_PATH = "/xrpc/com.atproto.sync.subscribeRepos"

# Reliability: reclaiming, dead-lettering, trimming, consumers, start-up.
DEFAULT_CLAIM_IDLE_S = 60.0
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_TRIM_INTERVAL_S = 10.0
DEFAULT_CONSUMER_IDLE_S = 3600.0
DEFAULT_STARTUP_TIMEOUT_S = 300.0

# Health and observation: a backlog that has not moved (or a loop silent) for this long is
# unhealthy; stream figures are read this often.
DEFAULT_STALL_AFTER_S = 120.0
DEFAULT_STATS_INTERVAL_S = 5.0
# `indexer compare`: connection warm-up, sample window, grace for late indexing.
DEFAULT_COMPARE_WARMUP_S = 5.0
DEFAULT_COMPARE_DURATION_S = 60.0
DEFAULT_COMPARE_GRACE_S = 10.0

# Accounts and counters: a deleted account's records are removed this many per transaction,
# pending deletions are looked for this often; `indexer reconcile` keys per transaction.
ACCOUNT_DELETION_CHUNK = 500
ACCOUNT_DELETION_POLL_S = 1.0
DEFAULT_RECONCILE_CHUNK = 1000

# Backfill: repos fetched at once in all and per host, attempts per request, first retry delay
# (doubling, with jitter) and the longest wait, even when a server asks for more; per-request
# timeout; the backfill stream's backlog (lag + pending) at which adding pauses; a repo larger
# than this is refused; listRepos page size; envelopes per MULTI.
DEFAULT_BACKFILL_CONCURRENCY = 8
DEFAULT_BACKFILL_PER_HOST = 2
DEFAULT_BACKFILL_ATTEMPTS = 6
DEFAULT_BACKFILL_BACKOFF_S = 1.0
BACKFILL_BACKOFF_MAX_S = 300.0
DEFAULT_BACKFILL_TIMEOUT_S = 300.0
DEFAULT_BACKFILL_HIGH_WATER_MARK = 200_000
BACKFILL_MAX_REPO_BYTES = 2**30
BACKFILL_PAGE = 1000
BACKFILL_CHUNK = 1000
BACKFILL_PROGRESS_S = 10.0

# Bounds applied before anything reaches PostgreSQL.
MAX_TEXT_CHARS = 30_000
MAX_SHORT_CHARS = 3_000
MAX_CID_CHARS = 200
MAX_RECORD_JSON_BYTES = 1_000_000
UNPARSEABLE_DATE = "1970-01-01T00:00:00.000Z"


def dlq_stream(stream: str) -> str:
    """The dead-letter stream of a stream."""
    return f"{stream}:dlq"


def backfill_done_key(stream: str) -> str:
    """The hash of repos backfilled to a stream: did -> the rev it was backfilled at."""
    return f"{stream}:done"


def backfill_failed_key(stream: str) -> str:
    """The hash of repos whose backfill failed: did -> JSON with the reason and the time."""
    return f"{stream}:failed"


def cursor_key(stream: str, host: str) -> str:
    """Where an ingester saves its cursor for a stream."""
    return f"{stream}:cursor:{host}"
