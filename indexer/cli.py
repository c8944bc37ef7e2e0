"""The `indexer` command line: settings from the environment, flags on top, one-line errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import typer

from indexer import constants, gcpolicy
from indexer.cli_backfill import backfill_app
from indexer.cli_support import fail as _fail
from indexer.cli_support import run as _run
from indexer.cli_support import state as _state
from indexer.cli_support import with_redis as _with_redis
from indexer.config import ConfigError, Settings, load_settings

T = TypeVar("T")
log = logging.getLogger("indexer")

app = typer.Typer(
    help="Index the Bluesky firehose from Redis streams into the AppView PostgreSQL schema.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ingest_app = typer.Typer(help="Append events to the live stream.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
dlq_app = typer.Typer(
    help="The dead-letter streams (<stream>:dlq): entries that could not be indexed.",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")
app.add_typer(backfill_app, name="backfill")

StreamOption = Annotated[
    str | None, typer.Option("--stream", help="Only this stream's dead letters (default: all).")
]


@app.callback()
def main_options(
    redis_url: Annotated[str | None, typer.Option(help="Overrides REDIS_URL.")] = None,
    database_url: Annotated[str | None, typer.Option(help="Overrides DATABASE_URL.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Settings come from the environment (see README); flags override them."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _state.settings = load_settings(os.environ).replace(
            redis_url=redis_url, database_url=database_url
        )
    except ConfigError as exc:
        _fail(str(exc), 2)


@app.command()
def migrate() -> None:
    """Apply the sql/ migrations to DATABASE_URL (idempotent)."""
    from indexer.migrate import migrate as apply

    applied = _run(apply(_state.settings.database_url))
    if applied:
        typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        typer.echo("schema is up to date")


@ingest_app.command("file")
def ingest_file(
    path: Annotated[str, typer.Argument(help="JSONL file, .zst, or - for stdin.")],
) -> None:
    """Append JSONL events (Jetstream events or envelopes, detected per line) to the live stream."""
    from indexer.ingest_file import ingest_file as ingest

    report = _run(ingest(_state.settings, path, show_progress=sys.stderr.isatty()))
    typer.echo(
        f"added {report.added} events to {_state.settings.live_stream}; "
        f"{report.bad} bad line(s) skipped"
    )


CollectionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--collection",
        help="Collection NSID or prefix.* to keep; repeat for more (INGESTER_COLLECTIONS, "
        "default app.bsky.*).",
    ),
]


@ingest_app.command("jetstream")
def ingest_jetstream(
    url: Annotated[
        list[str] | None,
        typer.Option(
            "--url", help="Jetstream subscribe URL; repeat for fallbacks (JETSTREAM_URL)."
        ),
    ] = None,
    collection: CollectionOption = None,
    cursor: Annotated[
        int | None, typer.Option(help="Start at this time_us instead of the saved cursor.")
    ] = None,
    compress: Annotated[
        bool | None,
        typer.Option("--compress/--no-compress", help="zstd messages (JETSTREAM_COMPRESS, on)."),
    ] = None,
) -> None:
    """Read Jetstream into the live stream, resuming from the saved cursor, until SIGINT/SIGTERM."""
    settings = _ingester_settings(
        jetstream_urls=tuple(url) if url else None,
        ingester_collections=tuple(collection) if collection else None,
        jetstream_compress=compress,
    )
    _run(_ingest(settings, "jetstream", cursor))


@ingest_app.command("relay")
def ingest_relay(
    url: Annotated[
        str | None, typer.Option(help="Relay URL, e.g. wss://bsky.network (RELAY_URL).")
    ] = None,
    collection: CollectionOption = None,
    cursor: Annotated[
        int | None, typer.Option(help="Start after this seq instead of the saved cursor.")
    ] = None,
) -> None:
    """Read the relay firehose (subscribeRepos) into the live stream, from the saved seq on."""
    settings = _ingester_settings(
        relay_url=url, ingester_collections=tuple(collection) if collection else None
    )
    _run(_ingest(settings, "relay", cursor))


def _ingester_settings(**changes: Any) -> Settings:
    try:
        return _state.settings.replace(**changes)
    except ConfigError as exc:
        _fail(str(exc), 2)


async def _ingest(settings: Settings, source_name: str, cursor: int | None) -> None:
    from indexer.ingester import Ingester, IngesterMetrics
    from indexer.jetstream import JetstreamSource
    from indexer.relay import RelaySource
    from indexer.source import Source

    source: Source = (
        JetstreamSource(settings) if source_name == "jetstream" else RelaySource(settings)
    )
    from indexer.health import serving

    metrics = IngesterMetrics(source.name)
    ingester = Ingester(settings, source, metrics, start_cursor=cursor)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ingester.stop)
    log.info("ingesting %s into %s", source.name, settings.live_stream)
    gcpolicy.tune()
    async with serving(metrics.registry, ingester.health, settings.metrics_port):
        await ingester.run()
    saved = ingester.saved.cursor if ingester.saved else None
    typer.echo(f"added {ingester.added} events to {settings.live_stream}; cursor {saved} saved")


@app.command()
def run(
    consumer: Annotated[str | None, typer.Option(help="Consumer name (INDEXER_CONSUMER).")] = None,
    drain: Annotated[
        bool, typer.Option(help="Exit 0 once the group has no lag and nothing pending.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help="INDEXER_BATCH_SIZE.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="INDEXER_CONCURRENCY.")] = None,
    bulk_backfill: Annotated[
        bool | None,
        typer.Option(
            "--bulk-backfill",
            help="INDEXER_BULK_BACKFILL: backfill entries move no counter (rebuild them with "
            "`indexer reconcile --all` once the backfill is drained); live ones stay exact.",
        ),
    ] = None,
) -> None:
    """Run one indexer replica of the consumer group."""
    try:
        settings = _state.settings.replace(
            consumer=consumer,
            batch_size=batch_size,
            concurrency=concurrency,
            bulk_backfill=bulk_backfill,
        )
    except ConfigError as exc:
        _fail(str(exc), 2)
    _run(_replica(settings, drain))


async def _replica(settings: Settings, drain: bool) -> None:
    from indexer.health import serving
    from indexer.metrics import Metrics
    from indexer.replica import Replica
    from plugins import registry

    metrics = Metrics()
    replica = Replica(settings, registry(), metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, replica.stop)
    log.info(
        "replica %s reading %s as group %s",
        settings.consumer,
        ",".join(settings.streams),
        settings.group,
    )
    gcpolicy.tune()
    async with serving(metrics.registry, replica.health, settings.metrics_port):
        await replica.run(drain=drain)
    log.info("replica %s stopped; %d events indexed", settings.consumer, replica.indexed)


@dlq_app.command("list")
def dlq_list(
    stream: StreamOption = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many per stream.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")] = False,
) -> None:
    """The oldest dead-letter entries: id, origin, deliveries, time and reason."""
    from indexer import dlq

    streams = _dlq_streams(stream)
    entries = _run(_with_redis(lambda r: dlq.list_dead(r, streams, limit)))
    counts = _run(_with_redis(lambda r: dlq.lengths(r, streams)))
    if json_out:
        for entry in entries:
            typer.echo(json.dumps(entry.summary()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "stream", "original id", "deliveries", "time", "reason")
    for e in entries:
        table.add_row(e.id, e.stream, e.original_id, str(e.deliveries), e.time, e.reason[:120])
    Console().print(table)
    total = ", ".join(f"{name}: {n}" for name, n in counts.items())
    typer.echo(f"dead-letter entries: {total}")


@dlq_app.command("show")
def dlq_show(entry_id: Annotated[str, typer.Argument(help="Dead-letter entry id.")],
             stream: StreamOption = None) -> None:  # fmt: skip
    """One dead-letter entry, with its event, as JSON."""
    from indexer import dlq

    streams = _dlq_streams(stream)
    entry = _run(_with_redis(lambda r: dlq.find(r, streams, entry_id)))
    typer.echo(json.dumps(entry.detail(), indent=2))


@dlq_app.command("retry")
def dlq_retry(
    entry_id: Annotated[str | None, typer.Argument(help="Dead-letter entry id.")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Every dead-letter entry.")] = False,
    stream: StreamOption = None,
) -> None:
    """Put entries back on their stream (and out of the dead-letter stream) to be indexed again."""
    from indexer import dlq

    if (entry_id is None) == (not all_entries):
        _fail("give either an entry id or --all", 2)
    streams = _dlq_streams(stream)
    if all_entries:
        moved, kept = _run(_with_redis(lambda r: dlq.retry_all(r, streams)))
        note = f"; {kept} without an event left in place" if kept else ""
        typer.echo(f"retried {moved} entries{note}")
        return

    async def one(client: Any) -> list[str]:
        return await dlq.retry(client, [await dlq.find(client, streams, entry_id or "")])

    new_ids = _run(_with_redis(one))
    typer.echo(f"retried {entry_id} as {new_ids[0]}")


@dlq_app.command("drop")
def dlq_drop(entry_id: Annotated[str, typer.Argument(help="Dead-letter entry id.")],
             stream: StreamOption = None) -> None:  # fmt: skip
    """Delete one dead-letter entry for good."""
    from indexer import dlq

    streams = _dlq_streams(stream)

    async def one(client: Any) -> None:
        await dlq.drop(client, await dlq.find(client, streams, entry_id))

    _run(_with_redis(one))
    typer.echo(f"dropped {entry_id}")


def _dlq_streams(stream: str | None) -> tuple[str, ...]:
    return (stream,) if stream else _state.settings.streams


@app.command()
def lag(
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    watch: Annotated[
        float | None, typer.Option(min=0.1, help="Redraw every SECONDS until Ctrl-C.")
    ] = None,
    max_lag: Annotated[
        int | None, typer.Option(min=0, help="Exit 1 when a group's lag is over N.")
    ] = None,
    max_age: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Exit 1 when a group's oldest pending entry, or the event time of its oldest "
            "unfinished entry, is older than SECONDS; checked only while the group has lag or "
            "pending entries (a group that has finished everything passes).",
        ),
    ] = None,
) -> None:
    """Stream and group figures: length, lag, pending, age, consumers; exit 1 over a limit.

    Per stream and group: length, lag, pending, oldest pending age, seconds behind the
    network, per-consumer pending and idle.
    """
    from indexer.lag import report

    def figures(client: Any) -> Awaitable[int]:
        return report(client, _state.settings, json_out=json_out, watch_s=watch,
                      max_lag=max_lag, max_age_s=max_age)  # fmt: skip

    raise typer.Exit(_run(_with_redis(figures)))


@app.command()
def compare(
    url: Annotated[str | None, typer.Option(help="Jetstream URL (first of JETSTREAM_URL).")] = None,
    collection: Annotated[
        list[str] | None, typer.Option(help="NSID to compare (repeat; default: all indexed).")
    ] = None,
    duration: Annotated[
        float, typer.Option(min=0.1, help="Sample window, seconds.")
    ] = constants.DEFAULT_COMPARE_DURATION_S,
    warmup: Annotated[
        float, typer.Option(min=0, help="Seconds ignored after connecting.")
    ] = constants.DEFAULT_COMPARE_WARMUP_S,
    grace: Annotated[
        float, typer.Option(min=0, help="Seconds left for late indexing.")
    ] = constants.DEFAULT_COMPARE_GRACE_S,
    min_coverage: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=100,
            help="Exit 1 below this coverage, percent (with --every: logged as an error each "
            "round; alert on indexer_coverage_ratio).",
        ),
    ] = None,
    every: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="Compare every SECONDS until stopped, exporting indexer_coverage_ratio on "
            "METRICS_PORT; a failed round is logged and the next one runs.",
        ),
    ] = None,
    examples: Annotated[int, typer.Option(min=0, help="Missing URIs shown per collection.")] = 3,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Backfill the repos whose creates are missing (each round)."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Jetstream rate comparison: network rate vs indexed rate per collection, coverage %."""
    from indexer import compare as cmp
    from plugins import registry

    settings = _state.settings
    opts = cmp.CompareOptions(
        url=url or settings.jetstream_urls[0],
        collections=tuple(collection or registry()),
        warmup_s=warmup,
        duration_s=duration,
        grace_s=grace,
        examples=examples,
    )
    from indexer.cli_backfill import repair_missing

    fix = repair_missing if repair else None
    if every is not None:
        every_round = cmp.continuously(
            opts, settings, every, json_out=json_out, min_coverage_pct=min_coverage, repair=fix
        )
        raise typer.Exit(_run(every_round))
    result = _run(cmp.compare(opts, settings.database_url))
    cmp.show(result, json_out)
    code = cmp.verdict(result, min_coverage)
    if fix is not None and result.missing_repos:
        _run(fix(result.missing_repos))
    raise typer.Exit(code)


@app.command()
def check(
    url: Annotated[
        str | None, typer.Option(help="Probe this URL, not 127.0.0.1:METRICS_PORT/health.")
    ] = None,
    ready: Annotated[
        bool, typer.Option("--ready", help="Probe /ready (Redis, PostgreSQL, schema) instead.")
    ] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for an answer.")] = 5.0,
) -> None:
    """Health probe for containers: exit 0 when the local process is healthy, 1 when not.

    /health fails when the loop is stuck or a backlog has not moved for INDEXER_STALL_AFTER_S;
    a brief Redis or PostgreSQL outage does not fail it (restarting would not help), it fails
    /ready, which `--ready` probes (for load balancers and start-up ordering).
    """
    from indexer.health import probe

    if url is None:
        if not _state.settings.metrics_port:
            _fail("METRICS_PORT is 0, so there is nothing to probe (give --url)", 2)
        path = "ready" if ready else "health"
        url = f"http://127.0.0.1:{_state.settings.metrics_port}/{path}"
    ok, line = probe(url, timeout)
    if not ok:
        _fail(line, 1)
    typer.echo(line)


@app.command()
def reconcile(
    dirty: Annotated[
        bool, typer.Option("--dirty", help="Repair the keys marked dirty (deletions, promotions).")
    ] = False,
    all_keys: Annotated[bool, typer.Option("--all", help="Check and repair every key.")] = False,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Check N random keys per table; write nothing.")
    ] = None,
    chunk: Annotated[
        int, typer.Option(min=1, help="Keys per transaction.")
    ] = constants.DEFAULT_RECONCILE_CHUNK,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Recompute counters from the tables; report drift and (but for --sample) repair it."""
    from indexer import reconcile as rec

    if dirty + all_keys + (sample is not None) != 1:
        _fail("give exactly one of --dirty, --all, --sample N", 2)
    mode: rec.Mode = "dirty" if dirty else "all" if all_keys else "sample"
    report = _run(rec.reconcile(_state.settings.database_url, mode, sample or 0, chunk))
    if json_out:
        typer.echo(json.dumps(report.summary()))
        return
    typer.echo(
        f"reconcile --{mode}: {report.checked} keys checked, {report.drifted} drifted, "
        f"{report.repaired} repaired"
    )
    for counter, n in sorted(report.by_counter.items()):
        typer.echo(f"  {counter}: {n} keys drifted")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
