"""Prometheus metrics of a replica (namespace `indexer_`), on a registry of its own."""

from __future__ import annotations

import math
import time
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_ACQUIRE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30)


class PoolFigures(Protocol):
    """What the pool gauges read at scrape time (`indexer.db.Database` has these)."""

    @property
    def size(self) -> int: ...

    in_use: int
    waiting: int


class Metrics:
    """The metrics one replica sets; a fresh registry each, so tests can run several at once."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "indexer_events_total",
            "Stream entries handled, by collection, operation, outcome",
            ["collection", "operation", "outcome"],
            registry=r,
        )
        self.batch_duration = Histogram(
            "indexer_batch_duration_seconds",
            "Time from read to ACK of one batch",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "indexer_batch_size", "Entries per batch", buckets=_SIZE_BUCKETS, registry=r
        )
        self.event_lag = Gauge(
            "indexer_event_lag_seconds",
            "Now minus the event time of the newest indexed event",
            registry=r,
        )
        self._newest_event_s = math.nan
        self.event_lag.set_function(lambda: time.time() - self._newest_event_s)
        self.retries = Counter(
            "indexer_batch_retries_total", "Batches retried, by reason", ["reason"], registry=r
        )
        self.claimed = Counter(
            "indexer_entries_claimed_total",
            "Pending entries taken over after claim_idle_s (each a delivery beyond the first)",
            registry=r,
        )
        self.pool_size = Gauge("indexer_db_pool_size", "Connections the pool may open", registry=r)
        self.pool_in_use = Gauge("indexer_db_pool_in_use", "Connections checked out", registry=r)
        self.pool_waiting = Gauge(
            "indexer_db_pool_waiting", "Tasks waiting to acquire a connection", registry=r
        )
        self.pool_acquire = Histogram(
            "indexer_db_pool_acquire_seconds",
            "Time spent waiting for a pooled connection",
            buckets=_ACQUIRE_BUCKETS,
            registry=r,
        )
        self._stream_metrics(r)

    def _stream_metrics(self, r: CollectorRegistry) -> None:
        self.stream_length = Gauge(
            "indexer_stream_length", "Entries in the stream (XLEN)", ["stream"], registry=r
        )
        self.stream_lag = Gauge(
            "indexer_stream_lag",
            "Entries not yet delivered to the consumer group",
            ["stream"],
            registry=r,
        )
        self.stream_pending = Gauge(
            "indexer_stream_pending",
            "Entries delivered to the group and not yet ACKed",
            ["stream"],
            registry=r,
        )
        self.stream_oldest_pending = Gauge(
            "indexer_stream_oldest_pending_seconds",
            "Age of the oldest pending entry (from its id), 0 when none is pending",
            ["stream"],
            registry=r,
        )
        self.stream_consumers = Gauge(
            "indexer_stream_consumers", "Consumers of the group", ["stream"], registry=r
        )
        self.dlq_length = Gauge(
            "indexer_dlq_length",
            "Entries in the stream's dead-letter stream (<stream>:dlq)",
            ["stream"],
            registry=r,
        )

    def indexed_event_time(self, epoch_s: float) -> None:
        """An event of this time was indexed; the event lag counts from the newest such time
        (never from the future: one event stamped ahead of our clock would hide the lag)."""
        epoch_s = min(epoch_s, time.time())
        if math.isnan(self._newest_event_s) or epoch_s > self._newest_event_s:
            self._newest_event_s = epoch_s

    def track_pool(self, pool: PoolFigures) -> None:
        """Read the pool's figures at every scrape, so they are current, not last-batch values."""
        self.pool_size.set(pool.size)
        self.pool_in_use.set_function(lambda: pool.in_use)
        self.pool_waiting.set_function(lambda: pool.waiting)


class CoverageMetrics:
    """What `indexer compare --every` exports: our indexed rate against the network's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.coverage = Gauge(
            "indexer_coverage_ratio",
            "Share of the network's creates in the last window found in the database",
            ["collection"],
            registry=self.registry,
        )
        self.network_rate = Gauge(
            "indexer_compare_network_events_per_second",
            "Creates per second seen on Jetstream in the last window",
            ["collection"],
            registry=self.registry,
        )
        self.indexed_rate = Gauge(
            "indexer_compare_indexed_events_per_second",
            "Of those, creates per second found in the database",
            ["collection"],
            registry=self.registry,
        )


class BackfillMetrics:
    """What `indexer backfill` exports while it runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.repos = Counter(
            "indexer_backfill_repos_total",
            "Repos finished, by outcome (done, skipped: already at that rev, failed)",
            ["outcome"],
            registry=r,
        )
        self.records = Counter(
            "indexer_backfill_records_total",
            "Envelopes added to the backfill stream by operation, and records not readable",
            ["operation"],
            registry=r,
        )
        self.retries = Counter(
            "indexer_backfill_retries_total",
            "HTTP requests retried, by reason (rate_limited, server_error, network)",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "indexer_backfill_repos_in_flight", "Repos being fetched or added now", registry=r
        )
        self.backpressure = Gauge(
            "indexer_backfill_backpressure",
            "1 while the backfill stream's backlog holds adding back",
            registry=r,
        )
