"""app.bsky.actor.profile: the `profile` table, rkey `self` only; updates apply."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.aggregates import Deltas
from indexer.db import Connection, rows_json
from indexer.events import StrongRef
from indexer.normalize import clean_optional, normalize_datetime
from indexer.plugin import Op, bulk_insert


class ProfileRecord(msgspec.Struct):
    displayName: str | None = None
    description: str | None = None
    avatar: dict[str, Any] | None = None
    banner: dict[str, Any] | None = None
    joinedViaStarterPack: StrongRef | None = None
    pinnedPost: StrongRef | None = None
    createdAt: Any = None


_decoder = msgspec.json.Decoder(ProfileRecord)
_COLS = (
    "uri",
    "cid",
    "creator",
    "displayName",
    "description",
    "avatarCid",
    "bannerCid",
    "joinedViaStarterPackUri",
    "pinnedPost",
    "pinnedPostCid",
    "createdAt",
    "indexedAt",
)
_UPSERT = bulk_insert(
    "profile",
    _COLS,
    ("varchar",) * len(_COLS),
    "ON CONFLICT (uri) DO UPDATE SET " + ", ".join(f'"{c}" = excluded."{c}"' for c in _COLS[1:]),
)


def blob_cid(blob: dict[str, Any] | None) -> str | None:
    """The CID of a blob reference, current (`ref.$link`) or legacy (`cid`) form."""
    if not blob:
        return None
    ref = blob.get("ref")
    cid = ref.get("$link") if isinstance(ref, dict) else blob.get("cid")
    return clean_optional(cid) if isinstance(cid, str) else None


def _row(op: Op) -> tuple[Any, ...]:
    rec: ProfileRecord = op.record
    joined, pinned = rec.joinedViaStarterPack, rec.pinnedPost
    return (
        op.uri,
        op.cid,
        op.did,
        clean_optional(rec.displayName),
        clean_optional(rec.description),
        blob_cid(rec.avatar),
        blob_cid(rec.banner),
        clean_optional(joined.uri) if joined else None,
        clean_optional(pinned.uri) if pinned else None,
        clean_optional(pinned.cid) if pinned else None,
        normalize_datetime(rec.createdAt),
        op.indexed_at,
    )


class ProfilePlugin:
    collection = "app.bsky.actor.profile"

    def decode(self, raw: bytes) -> ProfileRecord:
        return _decoder.decode(raw)

    def accepts(self, rkey: str) -> bool:
        return rkey == "self"

    async def insert(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        if ops:
            await conn.execute(_UPSERT, rows_json([_row(op) for op in ops]))

    async def update(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await self.insert(conn, ops, deltas)

    async def delete(self, conn: Connection, ops: list[Op], deltas: Deltas) -> None:
        await conn.execute(
            "DELETE FROM profile WHERE uri = ANY($1::varchar[])", [op.uri for op in ops]
        )
