"""Settings: one typed, frozen object built once from the environment and passed down."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from indexer import constants as c

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = c.DEFAULT_REDIS_URL
    database_url: str = c.DEFAULT_DATABASE_URL
    streams: tuple[str, ...] = c.DEFAULT_STREAMS
    group: str = c.DEFAULT_GROUP
    consumer: str = dataclasses.field(default_factory=socket.gethostname)
    batch_size: int = c.DEFAULT_BATCH_SIZE
    concurrency: int = c.DEFAULT_CONCURRENCY
    db_pool_size: int = c.DEFAULT_DB_POOL_SIZE
    metrics_port: int = c.DEFAULT_METRICS_PORT
    high_water_mark: int = c.DEFAULT_HIGH_WATER_MARK
    jetstream_urls: tuple[str, ...] = c.DEFAULT_JETSTREAM_URLS
    relay_url: str = c.DEFAULT_RELAY_URL
    plc_url: str = c.DEFAULT_PLC_URL
    block_ms: int = c.DEFAULT_BLOCK_MS
    acquire_timeout_s: float = c.DEFAULT_ACQUIRE_TIMEOUT_S
    shutdown_grace_s: float = c.DEFAULT_SHUTDOWN_GRACE_S
    claim_idle_s: float = c.DEFAULT_CLAIM_IDLE_S
    max_deliveries: int = c.DEFAULT_MAX_DELIVERIES
    trim_interval_s: float = c.DEFAULT_TRIM_INTERVAL_S
    consumer_idle_s: float = c.DEFAULT_CONSUMER_IDLE_S
    startup_timeout_s: float = c.DEFAULT_STARTUP_TIMEOUT_S
    # Health and observation (issue 5).
    stall_after_s: float = c.DEFAULT_STALL_AFTER_S
    stats_interval_s: float = c.DEFAULT_STATS_INTERVAL_S
    # Ingesters (issue 4).
    low_water_mark: int | None = None  # None: LOW_WATER_SHARE of the high-water mark
    ingester_stall_timeout_s: float = c.DEFAULT_INGESTER_STALL_TIMEOUT_S
    jetstream_rewind_s: float = c.DEFAULT_JETSTREAM_REWIND_S
    ingester_collections: tuple[str, ...] = c.DEFAULT_INGESTER_COLLECTIONS
    ingester_queue_size: int = c.DEFAULT_INGESTER_QUEUE_SIZE
    ingester_queue_bytes: int = c.DEFAULT_INGESTER_QUEUE_BYTES
    ingester_backoff_s: float = c.DEFAULT_INGESTER_BACKOFF_S
    jetstream_compress: bool = True
    # Backfill (issue 9).
    backfill_concurrency: int = c.DEFAULT_BACKFILL_CONCURRENCY
    backfill_per_host: int = c.DEFAULT_BACKFILL_PER_HOST
    backfill_attempts: int = c.DEFAULT_BACKFILL_ATTEMPTS
    backfill_backoff_s: float = c.DEFAULT_BACKFILL_BACKOFF_S
    backfill_timeout_s: float = c.DEFAULT_BACKFILL_TIMEOUT_S
    backfill_high_water_mark: int = c.DEFAULT_BACKFILL_HIGH_WATER_MARK
    bulk_backfill: bool = False  # replicas skip counter deltas of backfill entries

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "db_pool_size", "max_deliveries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"METRICS_PORT must be 0..65535, got {self.metrics_port}")
        if self.claim_idle_s <= 0:
            raise ConfigError(f"INDEXER_CLAIM_IDLE_S must be positive, got {self.claim_idle_s}")
        for var, value in (("INDEXER_STALL_AFTER_S", self.stall_after_s),
                           ("INDEXER_STATS_INTERVAL_S", self.stats_interval_s)):  # fmt: skip
            if value <= 0:
                raise ConfigError(f"{var} must be positive, got {value}")
        if not self.streams:
            raise ConfigError("INDEXER_STREAMS must name at least one stream")
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"REDIS_URL must be redis://, rediss:// or unix://: {mask_url(self.redis_url)}"
            )
        if urlsplit(self.database_url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"DATABASE_URL must be postgresql://: {mask_url(self.database_url)}")
        self._check_ingester()
        backfill = {
            "BACKFILL_CONCURRENCY": self.backfill_concurrency,
            "BACKFILL_PER_HOST": self.backfill_per_host,
            "BACKFILL_ATTEMPTS": self.backfill_attempts,
            "BACKFILL_HIGH_WATER_MARK": self.backfill_high_water_mark,
        }
        for var, count in backfill.items():
            if count < 1:
                raise ConfigError(f"{var} must be at least 1, got {count}")

    def _check_ingester(self) -> None:
        for var, count in (("INGESTER_QUEUE_SIZE", self.ingester_queue_size),
                           ("INGESTER_QUEUE_BYTES", self.ingester_queue_bytes)):  # fmt: skip
            if count < 1:
                raise ConfigError(f"{var} must be at least 1, got {count}")
        if not 0 < self.low_water_mark_resolved <= self.high_water_mark:
            raise ConfigError(
                "INGESTER_LOW_WATER_MARK must be between 1 and INGESTER_HIGH_WATER_MARK, "
                f"got {self.low_water_mark}"
            )

    def __repr__(self) -> str:
        """Every field, with passwords in URLs masked (settings may end up in a log line)."""
        fields = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_url"):
                value = mask_url(value)
            fields.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(fields)})"

    @property
    def live_stream(self) -> str:
        return self.streams[0]

    @property
    def low_water_mark_resolved(self) -> int:
        """The backlog below which a paused ingester reads its socket again."""
        if self.low_water_mark is not None:
            return self.low_water_mark
        return max(1, int(self.high_water_mark * c.LOW_WATER_SHARE))

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (flags override the environment)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# environment variable -> (field, parser)
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "REDIS_URL": ("redis_url", str),
    "DATABASE_URL": ("database_url", str),
    "INDEXER_STREAMS": ("streams", lambda v: _split(v)),
    "INDEXER_GROUP": ("group", str),
    "INDEXER_CONSUMER": ("consumer", str),
    "INDEXER_BATCH_SIZE": ("batch_size", int),
    "INDEXER_CONCURRENCY": ("concurrency", int),
    "DB_POOL_SIZE": ("db_pool_size", int),
    "METRICS_PORT": ("metrics_port", int),
    "INGESTER_HIGH_WATER_MARK": ("high_water_mark", int),
    "JETSTREAM_URL": ("jetstream_urls", lambda v: _split(v)),
    "RELAY_URL": ("relay_url", str),
    "PLC_URL": ("plc_url", str),
    "INDEXER_BLOCK_MS": ("block_ms", int),
    "DB_ACQUIRE_TIMEOUT_S": ("acquire_timeout_s", float),
    "INDEXER_SHUTDOWN_GRACE_S": ("shutdown_grace_s", float),
    "INDEXER_CLAIM_IDLE_S": ("claim_idle_s", float),
    "INDEXER_MAX_DELIVERIES": ("max_deliveries", int),
    "INDEXER_TRIM_INTERVAL_S": ("trim_interval_s", float),
    "INDEXER_CONSUMER_IDLE_S": ("consumer_idle_s", float),
    "INDEXER_STARTUP_TIMEOUT_S": ("startup_timeout_s", float),
    "INDEXER_STALL_AFTER_S": ("stall_after_s", float),
    "INDEXER_STATS_INTERVAL_S": ("stats_interval_s", float),
    "INGESTER_LOW_WATER_MARK": ("low_water_mark", int),
    "INGESTER_STALL_TIMEOUT_S": ("ingester_stall_timeout_s", float),
    "JETSTREAM_REWIND_S": ("jetstream_rewind_s", float),
    "INGESTER_COLLECTIONS": ("ingester_collections", lambda v: _split(v)),
    "INGESTER_QUEUE_SIZE": ("ingester_queue_size", int),
    "INGESTER_QUEUE_BYTES": ("ingester_queue_bytes", int),
    "INGESTER_BACKOFF_S": ("ingester_backoff_s", float),
    "JETSTREAM_COMPRESS": ("jetstream_compress", lambda v: _flag(v)),
    "BACKFILL_CONCURRENCY": ("backfill_concurrency", int),
    "BACKFILL_PER_HOST": ("backfill_per_host", int),
    "BACKFILL_ATTEMPTS": ("backfill_attempts", int),
    "BACKFILL_BACKOFF_S": ("backfill_backoff_s", float),
    "BACKFILL_TIMEOUT_S": ("backfill_timeout_s", float),
    "BACKFILL_HIGH_WATER_MARK": ("backfill_high_water_mark", int),
    "INDEXER_BULK_BACKFILL": ("bulk_backfill", lambda v: _flag(v)),
}

ENVIRONMENT_VARIABLES = tuple(_ENV)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build the settings from an environment mapping; raise ConfigError naming a bad variable."""
    values: dict[str, Any] = {}
    for var, (field, parse) in _ENV.items():
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[field] = parse(raw.strip())
        except ValueError:
            raise ConfigError(f"{var} has an invalid value: {mask_url(raw)!r}") from None
    return Settings(**values)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, safe for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
