"""`indexer reconcile`: counters recomputed from their rows; drift reported and repaired.

Every counter of `indexer.drift.COUNTERS` is recomputed per key from the rows behind it, a
chunk of keys of one aggregate table (`post_agg`, `profile_agg`) at a time, each chunk in one
short transaction that

1. makes sure the chunk's aggregate rows exist (`INSERT ... ON CONFLICT DO NOTHING`),
2. locks them, in key order (`SELECT ... FOR UPDATE`), the order batches lock them in,
3. counts the rows behind each of their counters, in a new statement, and
4. writes the counts where they differ.

Why a concurrent delta cannot be lost: a batch inserts or deletes rows and moves the counters
they count in one transaction, and it moves a counter by updating its aggregate row, which
needs the row lock reconcile holds. Under READ COMMITTED the count of step 3 sees every
transaction committed before it started. So for each batch touching a locked key, either it
committed before the lock was granted (its rows and its delta are both visible, the count
includes its rows) or it has not yet updated that row and cannot until reconcile commits (its
rows are not visible either, and its delta is added afterwards to the recounted value). A batch
cannot be half-visible, so the recount plus the deltas still to come is exactly `count(*)`.

`--sample N` reads without writing, in one REPEATABLE READ snapshot, so a concurrent batch is
either wholly in it or not at all and shows no false drift. `--dirty` repairs the keys in
`dirty_counter` (marked by account deletions and duplicate promotions) and clears them in the
same transaction; `--all` walks every aggregate row, then the keys that have rows but no
aggregate row.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import asyncpg

from indexer.config import mask_url
from indexer.constants import DEFAULT_RECONCILE_CHUNK
from indexer.db import Connection, is_contention
from indexer.drift import COUNTERS
from indexer.migrate import SchemaNotReady, pending

log = logging.getLogger(__name__)

Mode = Literal["dirty", "all", "sample"]
_MAX_ATTEMPTS: Final = 20


@dataclass(frozen=True, slots=True)
class Table:
    """An aggregate table, its key and its counters with the query counting each."""

    name: str
    key: str
    counters: tuple[tuple[str, str], ...]  # (counter, SELECT k, n ... GROUP BY 1)

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.counters]


def _tables() -> dict[str, Table]:
    grouped: defaultdict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for counter, (table, key, actual) in COUNTERS.items():
        grouped[(table, key)].append((counter, actual))
    return {t: Table(t, k, tuple(c)) for (t, k), c in grouped.items()}


TABLES: Final = _tables()


@dataclass
class Report:
    """What a run checked and found: keys checked, drifted (any counter), repaired."""

    mode: str
    checked: int = 0
    drifted: int = 0
    repaired: int = 0
    by_counter: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, drift: dict[str, list[str]], checked: int, *, repaired: bool) -> None:
        keys = sorted({k for ks in drift.values() for k in ks})
        self.checked += checked
        self.drifted += len(keys)
        self.repaired += len(keys) if repaired else 0
        for counter, ks in drift.items():
            self.by_counter[counter] = self.by_counter.get(counter, 0) + len(ks)
        self.examples += keys[: max(0, 5 - len(self.examples))]

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "checked": self.checked,
            "drifted": self.drifted,
            "repaired": self.repaired,
            "drifted_by_counter": dict(sorted(self.by_counter.items())),
            "examples": self.examples,
        }


async def reconcile(
    database_url: str, mode: Mode, sample: int = 0, chunk: int = DEFAULT_RECONCILE_CHUNK
) -> Report:
    """Run one mode against the database; raises ConnectionError or SchemaNotReady."""
    try:
        conn = await asyncpg.connect(database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConnectionError(f"cannot connect to {mask_url(database_url)}: {exc}") from None
    try:
        missing = await pending(conn)
        if missing:
            names = ", ".join(m.name for m in missing)
            raise SchemaNotReady(f"migrations not applied: {names} (run `indexer migrate`)")
        report = Report(mode)
        if mode == "sample":
            await check_sample(conn, sample, report)
        elif mode == "all":
            await repair_all(conn, chunk, report)
        else:
            await repair_dirty(conn, chunk, report)
        return report
    finally:
        await conn.close()


async def check_sample(conn: Connection, n: int, report: Report) -> None:
    """Compare `n` random keys of each aggregate table with their rows; write nothing."""
    for table in TABLES.values():
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            keys = await _random_keys(conn, table, n)
            stored = await _stored(conn, table, keys, lock=False)
            drift, _ = await _drift(conn, table, keys, stored)
            report.add(drift, len(keys), repaired=False)


async def repair_all(conn: Connection, chunk: int, report: Report) -> None:
    """Every aggregate row, in key order; then keys with rows behind them but no row."""
    for table in TABLES.values():
        after = ""
        while True:
            keys = [
                r["k"]
                for r in await conn.fetch(
                    f"SELECT {table.key} AS k FROM {table.name} WHERE {table.key} > $1 "
                    f"ORDER BY 1 LIMIT $2",
                    after,
                    chunk,
                )
            ]
            if not keys:
                break
            await repair(conn, table, keys, report)
            after = keys[-1]
        for counter, actual in table.counters:
            while keys := [
                r["k"]
                for r in await conn.fetch(
                    f"SELECT DISTINCT k FROM ({actual}) s WHERE k IS NOT NULL AND NOT EXISTS "
                    f"(SELECT 1 FROM {table.name} a WHERE a.{table.key} = s.k) LIMIT $1",
                    chunk,
                )
            ]:
                log.info("%d %s keys without a %s row", len(keys), counter, table.name)
                await repair(conn, table, sorted(keys), report)


async def repair_dirty(conn: Connection, chunk: int, report: Report) -> None:
    """The keys marked in `dirty_counter`, repaired and unmarked chunk by chunk."""
    after = ("", "")
    while True:
        rows = await conn.fetch(
            "SELECT kind, key FROM dirty_counter WHERE (kind, key) > ($1, $2) "
            "ORDER BY kind, key LIMIT $3",
            *after,
            chunk,
        )
        if not rows:
            return
        after = (rows[-1]["kind"], rows[-1]["key"])
        by_kind: defaultdict[str, list[str]] = defaultdict(list)
        for r in rows:
            by_kind[r["kind"]].append(r["key"])
        for kind, keys in sorted(by_kind.items()):
            table = TABLES.get(kind)
            if table is None:
                log.warning("dirty_counter: unknown kind %r, %d keys dropped", kind, len(keys))
                await conn.execute("DELETE FROM dirty_counter WHERE kind = $1", kind)
                continue
            await repair(conn, table, keys, report, unmark=True)


async def repair(
    conn: Connection, table: Table, keys: list[str], report: Report, *, unmark: bool = False
) -> None:
    """Recount and fix one chunk of keys in one transaction (retried on contention)."""
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                drift = await _repair_locked(conn, table, keys)
                if unmark:
                    await conn.execute(
                        "DELETE FROM dirty_counter WHERE kind = $1 AND key = ANY($2::varchar[])",
                        table.name,
                        keys,
                    )
            report.add(drift, len(keys), repaired=True)
            return
        except Exception as exc:
            if not is_contention(exc) or attempt == _MAX_ATTEMPTS:
                raise
            log.info("reconcile chunk of %s retried after contention (%s)", table.name, exc)


async def _repair_locked(conn: Connection, table: Table, keys: list[str]) -> dict[str, list[str]]:
    await conn.execute(
        f"INSERT INTO {table.name} ({table.key}) SELECT unnest($1::varchar[]) ORDER BY 1 "
        "ON CONFLICT DO NOTHING",
        keys,
    )
    stored = await _stored(conn, table, keys, lock=True)
    drift, actual = await _drift(conn, table, keys, stored)
    fixes = sorted({k for ks in drift.values() for k in ks})
    if fixes:
        sets = ", ".join(f'"{c}" = v."{c}"' for c in table.names)
        arrays = ", ".join(f"${i + 2}::bigint[]" for i in range(len(table.names)))
        names = ", ".join(f'"{c}"' for c in table.names)
        await conn.execute(
            f"UPDATE {table.name} t SET {sets} FROM unnest($1::varchar[], {arrays}) "
            f"AS v(k, {names}) WHERE t.{table.key} = v.k",
            fixes,
            *([actual[k][c] for k in fixes] for c in table.names),
        )
    return drift


async def _stored(
    conn: Connection, table: Table, keys: list[str], *, lock: bool
) -> dict[str, dict[str, int]]:
    cols = ", ".join(f'"{c}"' for c in table.names)
    rows = await conn.fetch(
        f"SELECT {table.key} AS k, {cols} FROM {table.name} "
        f"WHERE {table.key} = ANY($1::varchar[]) ORDER BY 1" + (" FOR UPDATE" if lock else ""),
        keys,
    )
    return {r["k"]: {c: r[c] for c in table.names} for r in rows}


async def _actual(conn: Connection, table: Table, keys: list[str]) -> dict[str, dict[str, int]]:
    """count(*) behind each counter of these keys (0 where there are no rows)."""
    found: dict[str, dict[str, int]] = {k: dict.fromkeys(table.names, 0) for k in keys}
    for counter, actual in table.counters:
        # the key condition is pushed down into the grouped query, so its index is used
        for r in await conn.fetch(
            f"SELECT k, n FROM ({actual}) s WHERE k = ANY($1::varchar[])", keys
        ):
            found[r["k"]][counter] = r["n"]
    return found


async def _drift(
    conn: Connection, table: Table, keys: list[str], stored: dict[str, dict[str, int]]
) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """Per counter, the keys whose stored value differs from the count (missing row = 0);
    and the counts."""
    actual = await _actual(conn, table, keys)
    drift: dict[str, list[str]] = {}
    for counter in table.names:
        bad = [k for k in keys if stored.get(k, {}).get(counter, 0) != actual[k][counter]]
        if bad:
            drift[counter] = bad
    return drift, actual


async def _random_keys(conn: Connection, table: Table, n: int) -> list[str]:
    """About `n` random keys: a page sample sized from the table's statistics, or, for small
    or unanalyzed tables, a random order of all keys."""
    if n <= 0:
        return []
    rows = await conn.fetchval(
        "SELECT reltuples FROM pg_class WHERE oid = $1::regclass", table.name
    )
    keys: list[str] = []
    if rows and rows > 20 * n:
        percent = min(100.0, 100.0 * 4 * n / rows)
        keys = [
            r["k"]
            for r in await conn.fetch(
                f"SELECT {table.key} AS k FROM {table.name} TABLESAMPLE SYSTEM ($1) "
                "ORDER BY random() LIMIT $2",
                percent,
                n,
            )
        ]
    if len(keys) < n:
        keys = [
            r["k"]
            for r in await conn.fetch(
                f"SELECT {table.key} AS k FROM {table.name} ORDER BY random() LIMIT $1", n
            )
        ]
    return sorted(keys)
