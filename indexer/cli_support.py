"""What every command of the CLI shares: the settings, running a coroutine, one-line errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from redis.exceptions import RedisError

from indexer.config import Settings, mask_url
from indexer.dlq import NotFound
from indexer.migrate import SchemaNotReady

T = TypeVar("T")


class State:
    """The settings, built once by the CLI's callback before any command runs."""

    settings: Settings


state = State()


async def with_redis(use: Callable[[Any], Awaitable[T]]) -> T:
    """Run `use` with a Redis client that is closed afterwards."""
    from indexer.stream import connect

    client = connect(state.settings)
    try:
        return await use(client)
    finally:
        await client.aclose()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop; expected failures become one line on stderr and exit 1."""
    try:
        import uvloop

        return uvloop.run(coro)
    except (ConnectionError, RedisError, OSError) as exc:
        fail(describe(exc), 1)
    except (SchemaNotReady, NotFound) as exc:
        fail(str(exc), 1)
    except ValueError as exc:
        fail(str(exc), 2)


def describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    settings = getattr(state, "settings", None)
    if settings is not None:
        for url in (settings.redis_url, settings.database_url):
            text = text.replace(url, mask_url(url))
    if isinstance(exc, RedisError):
        return f"redis at {mask_url(settings.redis_url) if settings else '?'}: {text}"
    return text


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
