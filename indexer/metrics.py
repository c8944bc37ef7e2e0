"""Prometheus metrics of a replica (namespace `indexer_`), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


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
        self.retries = Counter(
            "indexer_batch_retries_total", "Batches retried, by reason", ["reason"], registry=r
        )
        self.pool_size = Gauge("indexer_db_pool_size", "Connections the pool may open", registry=r)
        self.pool_in_use = Gauge("indexer_db_pool_in_use", "Connections checked out", registry=r)
        self.pool_waiting = Gauge(
            "indexer_db_pool_waiting", "Tasks waiting to acquire a connection", registry=r
        )

    def serve(self, port: int) -> None:
        """Expose /metrics on a port (0 means off)."""
        if port:
            start_http_server(port, registry=self.registry)
