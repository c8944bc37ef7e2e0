"""Table data: the written tables dumped and loaded with COPY, inspected, counters checked."""

from __future__ import annotations

import io
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

# Every table the indexer writes for the workload's collections (the AppView's and the rev
# guard's `record_state`; not the bookkeeping of `dirty_counter` and `account_fence`); each
# one's first column is its key (a uri or a did).
WRITTEN_TABLES = (
    "record",
    "record_state",
    "post",
    "like",
    "repost",
    "follow",
    "actor_block",
    "profile",
    "quote",
    "post_embed_image",
    "post_embed_video",
    "post_embed_external",
    "post_embed_record",
    "feed_item",
    "duplicate_record",
    "post_agg",
    "profile_agg",
    "actor",
    "account_state",
    "actor_sync",
)
# (counter, table counted, column counted, aggregate table, its key)
COUNTERS = (
    ("likeCount", "like", "subject", "post_agg", "uri"),
    ("repostCount", "repost", "subject", "post_agg", "uri"),
    ("replyCount", "post", "replyParent", "post_agg", "uri"),
    ("quoteCount", "quote", "subject", "post_agg", "uri"),
    ("followersCount", "follow", "subjectDid", "profile_agg", "did"),
    ("followsCount", "follow", "creator", "profile_agg", "did"),
    ("postsCount", "post", "creator", "profile_agg", "did"),
)
GROWN_MARK = "_g"  # DIDs of the grown base rows end in _g<copy>; workload DIDs never contain it
_DID = re.compile(rb"did:plc:([a-z2-7]{24})")


@dataclass(slots=True)
class CopyResult:
    rows: int
    seconds: float  # one load's, or the median of `loads`
    megabytes: float
    loads: tuple[float, ...] = ()  # each load's seconds, where several were timed

    @property
    def spread(self) -> float:
        """The slowest load's seconds over the fastest's (1.0 for a single load)."""
        return max(self.loads) / min(self.loads) if self.loads else 1.0


def median_load(results: Sequence[CopyResult]) -> CopyResult:
    """Several loads of the same rows as one result: the median seconds, each load kept."""
    if not results:
        raise ValueError("no COPY loads to take the median of")
    seconds = tuple(r.seconds for r in results)
    return CopyResult(results[0].rows, statistics.median(seconds), results[0].megabytes, seconds)


@dataclass(slots=True)
class Inspection:
    rows: dict[str, int]
    counter_errors: dict[str, int]
    digests: dict[str, str]


@dataclass(slots=True)
class TableDump:
    table: str
    columns: list[str]
    data: bytes
    rows: int


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def _measured(key: str, measured_only: bool) -> str:
    """Rows of the measured workload only: in grown databases, not the grown base rows."""
    return f" WHERE strpos({quote_ident(key)}, '{GROWN_MARK}') = 0" if measured_only else ""


async def table_columns(conn: Any, table: str) -> list[str]:
    """The columns COPY can write (generated ones like "sortAt" excluded), in table order."""
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1 AND is_generated = 'NEVER' "
        "ORDER BY ordinal_position",
        table,
    )
    return [r["column_name"] for r in rows]


async def dump_tables(dsn: str, measured_only: bool, fmt: str) -> list[TableDump]:
    """Every written table's rows as COPY data in memory, in heap (about insertion) order."""
    conn = await asyncpg.connect(dsn)
    dumps = []
    try:
        for table in WRITTEN_TABLES:
            cols = await table_columns(conn, table)
            query = (
                f"SELECT {', '.join(map(quote_ident, cols))} FROM {quote_ident(table)}"
                f"{_measured(cols[0], measured_only)}"
            )
            buf = io.BytesIO()
            status = await conn.copy_from_query(query, output=buf, format=fmt)
            dumps.append(TableDump(table, cols, buf.getvalue(), int(status.split()[-1])))
    finally:
        await conn.close()
    return dumps


async def copy_load(dsn: str, dumps: list[TableDump]) -> CopyResult:
    """Time COPY (binary) of the dumps into the tables, one connection, one transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        async with conn.transaction():
            for d in dumps:
                if d.rows:
                    await conn.copy_to_table(
                        d.table, source=io.BytesIO(d.data), columns=d.columns, format="binary"
                    )
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    size = sum(len(d.data) for d in dumps) / 1e6
    return CopyResult(sum(d.rows for d in dumps), seconds, size)


async def load_suffixed_copies(dsn: str, dumps: list[TableDump], copies: int) -> dict[str, int]:
    """COPY (text) the dumps in `copies` times, DIDs suffixed per copy; VACUUM ANALYZE; rows."""
    conn = await asyncpg.connect(dsn)
    try:
        for n in range(copies):
            suffix = rb"did:plc:\g<1>" + f"{GROWN_MARK}{n}".encode()
            for d in dumps:
                data = _DID.sub(suffix, d.data)
                if d.table in ("actor", "account_state"):  # handles (and claims) are unique too
                    data = data.replace(b".bsky.social", f".g{n}.bsky.social".encode())
                await conn.copy_to_table(
                    d.table, source=io.BytesIO(data), columns=d.columns, format="text"
                )
        await conn.execute("VACUUM (ANALYZE)")
        return {
            t: await conn.fetchval(f"SELECT count(*) FROM {quote_ident(t)}") for t in WRITTEN_TABLES
        }
    finally:
        await conn.close()


_COUNTER_SQL = """
SELECT count(*) FROM (
    SELECT {col} AS k, count(*) AS n FROM {table} WHERE {col} IS NOT NULL GROUP BY 1
) AS actual FULL JOIN (
    SELECT {key} AS k, {counter} AS n FROM {agg} WHERE {counter} <> 0
) AS counted USING (k)
WHERE actual.n IS DISTINCT FROM counted.n
"""


# Columns that keep how a row got to its state, not the state: left out of the digests, which
# compare the state that 1 and 2 replicas reach. `liveBefore` is the guard's previous state,
# which depends on how the ops of a record were batched.
HISTORY_COLUMNS: dict[str, tuple[str, ...]] = {"record_state": ("liveBefore",)}


# Tables of counters, every column but the key a count. A row of zeros keeps how the counters
# got to their state: deltas that cancel leave one when they land in different batches and none
# when one batch sums them (or the rev guard collapses the ops). The AppView reads a missing row
# as zeros, so the digests leave rows of zeros out.
COUNTER_TABLES = ("post_agg", "profile_agg")


async def inspect(dsn: str, measured_only: bool) -> Inspection:
    """Rows per table, counters that disagree with count(*), and a digest of each table."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: dict[str, int] = {}
        digests: dict[str, str] = {}
        for table in WRITTEN_TABLES:
            key, *values = await table_columns(conn, table)
            where = _measured(key, measured_only)
            name = quote_ident(table)
            rows[table] = await conn.fetchval(f"SELECT count(*) FROM {name}{where}")
            state = where  # the digest's rows: the state's, not the history's
            if table in COUNTER_TABLES:
                nonzero = " OR ".join(f"{quote_ident(c)} <> 0" for c in values)
                state += f" {'AND' if where else 'WHERE'} ({nonzero})"
            # rows in key order, rows of one key (an image embed's, per post) by their digest
            row = "md5((to_jsonb(t) - $1::text[])::text)"
            digests[table] = await conn.fetchval(
                f"SELECT md5(string_agg({row}, '' ORDER BY t.{quote_ident(key)}, {row})) "
                f"FROM {name} AS t{state}",
                list(HISTORY_COLUMNS.get(table, ())),
            )
        errors: dict[str, int] = {}
        for counter, table, col, agg, key in COUNTERS:
            sql = _COUNTER_SQL.format(
                col=quote_ident(col),
                table=quote_ident(table),
                key=quote_ident(key),
                counter=quote_ident(counter),
                agg=quote_ident(agg),
            )
            wrong = await conn.fetchval(sql)
            if wrong:
                errors[counter] = wrong
    finally:
        await conn.close()
    return Inspection(rows, errors, digests)
