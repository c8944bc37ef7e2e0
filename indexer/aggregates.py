"""Counter deltas: summed per key over a batch, applied in sorted key order in its transaction.

Counts move only by rows actually inserted or deleted (the plugins feed this from RETURNING),
so replays and duplicates leave them unchanged and `count(*)` never runs per event.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Final

from indexer.db import Connection, json_rows, rows_json

POST_COUNTERS: Final = ("likeCount", "repostCount", "replyCount", "quoteCount")
PROFILE_COUNTERS: Final = ("followersCount", "followsCount", "postsCount")


def _upsert_sql(table: str, key: str, counters: tuple[str, ...], param: int) -> str:
    cols = ", ".join(f'"{c}"' for c in counters)
    rows = json_rows(("varchar",) + ("bigint",) * len(counters), param)
    sums = ", ".join(f'"{c}" = {table}."{c}" + excluded."{c}"' for c in counters)
    return (
        f"INSERT INTO {table} ({key}, {cols}) {rows} ORDER BY 1 "
        f"ON CONFLICT ({key}) DO UPDATE SET {sums}"
    )


# Both tables in one round trip. One statement, so every transaction locks the rows in the
# same order (its plan's), each table's keys sorted.
_APPLY_SQL: Final = (
    f"WITH post AS ({_upsert_sql('post_agg', 'uri', POST_COUNTERS, 1)}) "
    f"{_upsert_sql('profile_agg', 'did', PROFILE_COUNTERS, 2)}"
)


class Deltas:
    """Per-batch counter deltas for `post_agg` (by post uri) and `profile_agg` (by did)."""

    __slots__ = ("_post", "_profile")

    def __init__(self) -> None:
        self._post: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._profile: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    def post(self, uri: str, counter: str, by: int) -> None:
        self._post[uri][POST_COUNTERS.index(counter)] += by

    def profile(self, did: str, counter: str, by: int) -> None:
        self._profile[did][PROFILE_COUNTERS.index(counter)] += by

    def __bool__(self) -> bool:
        return bool(self._post) or bool(self._profile)

    def keys(self) -> tuple[list[str], list[str]]:
        """The post uris and dids whose counters move, each sorted."""
        return (
            sorted(k for k, v in self._post.items() if any(v)),
            sorted(k for k, v in self._profile.items() if any(v)),
        )

    def merge(self, other: Deltas) -> None:
        """Add another batch's deltas to these."""
        for key, values in other._post.items():
            self._post[key] = [a + b for a, b in zip(self._post[key], values, strict=True)]
        for key, values in other._profile.items():
            self._profile[key] = [a + b for a, b in zip(self._profile[key], values, strict=True)]

    async def apply(self, conn: Connection) -> None:
        """Apply the non-zero deltas, keys sorted so concurrent batches lock rows in one order."""
        post, profile = _rows(self._post), _rows(self._profile)
        if post or profile:
            await conn.execute(_APPLY_SQL, rows_json(post), rows_json(profile))


def _rows(deltas: dict[str, list[int]]) -> list[tuple[str | int, ...]]:
    return [(k, *deltas[k]) for k in sorted(k for k, v in deltas.items() if any(v))]
