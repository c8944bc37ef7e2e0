"""The `indexer` command line: settings from the environment, flags on top, one-line errors."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from redis.exceptions import RedisError

from indexer.config import ConfigError, Settings, load_settings, mask_url
from indexer.migrate import SchemaNotReady

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


class State:
    settings: Settings


_state = State()


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


@app.command()
def run(
    consumer: Annotated[str | None, typer.Option(help="Consumer name (INDEXER_CONSUMER).")] = None,
    drain: Annotated[
        bool, typer.Option(help="Exit 0 once the group has no lag and nothing pending.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help="INDEXER_BATCH_SIZE.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="INDEXER_CONCURRENCY.")] = None,
) -> None:
    """Run one indexer replica of the consumer group."""
    try:
        settings = _state.settings.replace(
            consumer=consumer, batch_size=batch_size, concurrency=concurrency
        )
    except ConfigError as exc:
        _fail(str(exc), 2)
    _run(_replica(settings, drain))


async def _replica(settings: Settings, drain: bool) -> None:
    from indexer.metrics import Metrics
    from indexer.replica import Replica
    from plugins import registry

    metrics = Metrics()
    metrics.serve(settings.metrics_port)
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
    await replica.run(drain=drain)
    log.info("replica %s stopped; %d events indexed", settings.consumer, replica.indexed)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop; expected failures become one line on stderr and exit 1."""
    try:
        import uvloop

        return uvloop.run(coro)
    except (ConnectionError, RedisError, OSError) as exc:
        _fail(_describe(exc), 1)
    except SchemaNotReady as exc:
        _fail(str(exc), 1)
    except ValueError as exc:
        _fail(str(exc), 2)


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    settings = getattr(_state, "settings", None)
    if settings is not None:
        for url in (settings.redis_url, settings.database_url):
            text = text.replace(url, mask_url(url))
    if isinstance(exc, RedisError):
        return f"redis at {mask_url(settings.redis_url) if settings else '?'}: {text}"
    return text


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
