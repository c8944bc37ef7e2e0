"""The contract between the batch pipeline and the per-collection plugins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from indexer.aggregates import Deltas
from indexer.db import Connection, json_rows

Kind = Literal["insert", "update", "delete"]  # what a change does to a record's typed rows


@dataclass(slots=True)
class Op:
    """One record operation that won the rev guard, with its decoded record (None for deletes).

    `rejected` is the hook for records a plugin refuses on their content (a listitem in someone
    else's list, a threadgate for another account's post): the plugin writes no typed row for
    the op and sets the reason here; `outcome_of` then counts the op as `rejected`.
    """

    uri: str
    did: str
    collection: str
    rkey: str
    rev: str
    cid: str
    record: Any
    json: str
    indexed_at: str
    rejected: str | None = None


def outcome_of(op: Op, applied: bool) -> str:
    """The `outcome` label of an op that reached the rev guard: applied, refused, or superseded."""
    if op.rejected is not None:
        return "rejected"
    return "indexed" if applied else "unchanged"


class Plugin(Protocol):
    """Knows one collection's rows: turns a list of ops into bulk statements and counter deltas.

    The pipeline calls, in one transaction: `delete` for records that went away, `update` for
    live records that changed, `insert` for records that became live. Each must only count rows
    its statements actually inserted or deleted.
    """

    collection: str

    def decode(self, raw: bytes) -> Any:
        """The record body as this collection's Struct; raises msgspec errors on bad input."""
        ...

    def accepts(self, rkey: str) -> bool:
        """Whether a record with this rkey belongs in the typed tables (profile: `self` only)."""
        ...

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None: ...

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None: ...

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None: ...


@runtime_checkable
class Locking(Protocol):
    """A plugin whose records depend on records of other transactions (posts, gates) says which
    uris each change locks, `(uri, exclusive)`; its calls expect them taken. The caller takes
    the locks of all its changes in one statement before any plugin writes
    (`indexer.locks.lock_changes`), so two transactions never lock in a cycle."""

    def locks(self, op: Op, kind: Kind) -> list[tuple[str, bool]]: ...


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows transposed to one list per column, for `unnest($1::t[], $2::t[], ...)`."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(col) for col in zip(*rows, strict=True)]


def bulk_insert(
    table: str,
    cols: tuple[str, ...],
    types: tuple[str, ...],
    tail: str,
    *,
    param: int = 1,
    where: str = "",
) -> str:
    """`INSERT INTO table (cols) <json_rows> [WHERE ...] ORDER BY 1 <tail>`, keys in one order;
    its parameter `$param` is `rows_json(rows)`; `where` may test a row's fields (`r->>0`)."""
    names = ", ".join(f'"{c}"' for c in cols)
    condition = f" WHERE {where}" if where else ""
    return f'INSERT INTO "{table}" ({names}) {json_rows(types, param)}{condition} ORDER BY 1 {tail}'


def sort_at(created_at: str, indexed_at: str) -> str:
    """`least(createdAt, indexedAt)`, as the generated `sortAt` columns compute it."""
    return min(created_at, indexed_at)
