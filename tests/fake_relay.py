"""A fake relay on loopback: `subscribeRepos` with real DAG-CBOR frames and CAR blocks.

Built from Jetstream events (as `indexer.workload` makes them): each commit becomes a `#commit`
frame whose CAR holds a signed-commit block and the record's block, encoded by cbrrr from the
record's JSON form (so `{"$link"}` and `{"$bytes"}` become real links and bytes); identity and
account events become `#identity` and `#account`. Frames get `seq` 1, 2, 3, ...; a connection
with `cursor=N` gets the frames after N, as a relay replays. `oldest_seq` makes older cursors
outdated: such a connection first gets `#info OutdatedCursor`, then everything from the oldest.
A cursor beyond the last frame gets a `FutureCursor` error frame and is closed; `refuse_with`
(an error name and message) answers every connection with that error frame and closes it.

Faults as in `FakeServer` (drop, stall, garbage). `frames_for()` builds frames for a test.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cbrrr
import msgspec

from indexer.events import time_from_us
from tests.fake_jetstream import CLOSE_AFTER, FakeServer

CBOR_GARBAGE = b"\xa2\x62op\x01\xff\xff not cbor"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def car(root: cbrrr.CID, blocks: Sequence[tuple[cbrrr.CID, bytes]]) -> bytes:
    """A CARv1 with one root."""
    header = cbrrr.encode_dag_cbor({"version": 1, "roots": [root]})
    out = [varint(len(header)), header]
    for cid, data in blocks:
        out += [varint(len(cid.cid_bytes) + len(data)), cid.cid_bytes, data]
    return b"".join(out)


def frame(kind: str, body: Mapping[str, Any]) -> bytes:
    """A frame: the header `{op: 1, t: kind}` then the body."""
    return cbrrr.encode_dag_cbor({"op": 1, "t": kind}) + cbrrr.encode_dag_cbor(dict(body))


def error_frame(error: str, message: str) -> bytes:
    return cbrrr.encode_dag_cbor({"op": -1}) + cbrrr.encode_dag_cbor(
        {"error": error, "message": message}
    )


def relay_record(value: Any) -> Any:
    """A record's JSON form with every `$link` a real CID: the workload's blob refs are only
    CID-like strings, and DAG-CBOR carries links as binary CIDs."""
    if isinstance(value, dict):
        link = value.get("$link")
        if len(value) == 1 and isinstance(link, str):
            try:
                cbrrr.encode_dag_cbor(value, atjson_mode=True)
            except ValueError:
                return {"$link": cbrrr.CID.cidv1_raw_sha256_32_from(link.encode()).encode()}
            return value
        return {k: relay_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relay_record(v) for v in value]
    return value


def commit_frame(seq: int, did: str, time: str, ops: Sequence[Mapping[str, Any]]) -> bytes:
    """A `#commit` of ops `{"action", "collection", "rkey", "record" (JSON form) or None}`."""
    blocks: list[tuple[cbrrr.CID, bytes]] = []
    body_ops = []
    for op in ops:
        cid = None
        if op.get("record") is not None:
            data = cbrrr.encode_dag_cbor(relay_record(op["record"]), atjson_mode=True)
            cid = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(data)
            blocks.append((cid, data))
        path = f"{op['collection']}/{op['rkey']}"
        body_ops.append({"action": op["action"], "path": path, "cid": cid})
    rev = str(ops[0].get("rev", "3l000000000002"))
    data_cid = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(rev.encode())
    commit = cbrrr.encode_dag_cbor(
        {"did": did, "version": 3, "data": data_cid, "rev": rev, "prev": None, "sig": b"\x01" * 64}
    )
    commit_cid = cbrrr.CID.cidv1_dag_cbor_sha256_32_from(commit)
    body = {
        "seq": seq,
        "rebase": False,
        "tooBig": False,
        "repo": did,
        "commit": commit_cid,
        "rev": rev,
        "since": None,
        "blocks": car(commit_cid, [(commit_cid, commit), *blocks]),
        "ops": body_ops,
        "blobs": [],
        "time": time,
    }
    return frame("#commit", body)


def frames_for(events: Sequence[Mapping[str, Any] | bytes]) -> list[bytes]:
    """The relay frames of Jetstream events, seq 1, 2, 3, ..."""
    out = []
    for seq, raw in enumerate(events, start=1):
        event = msgspec.json.decode(raw) if isinstance(raw, bytes) else raw
        time = time_from_us(event["time_us"])
        did = event["did"]
        if event["kind"] == "commit":
            c = event["commit"]
            op = {"action": c["operation"], "collection": c["collection"], "rkey": c["rkey"],
                  "record": c.get("record"), "rev": c["rev"]}  # fmt: skip
            out.append(commit_frame(seq, did, time, [op]))
        elif event["kind"] == "identity":
            handle = event["identity"].get("handle")
            out.append(frame("#identity", {"seq": seq, "did": did, "time": time, "handle": handle}))
        else:
            body = {"seq": seq, "did": did, "time": time, "active": event["account"]["active"]}
            out.append(frame("#account", body))
    return out


class FakeRelay(FakeServer):
    """A relay's `subscribeRepos` on loopback serving a fixed list of frames."""

    path = "/xrpc/com.atproto.sync.subscribeRepos"

    def __init__(
        self,
        events: Sequence[Mapping[str, Any] | bytes] = (),
        *,
        frames: Sequence[bytes] | None = None,
        oldest_seq: int = 1,
        refuse_with: tuple[str, str] | None = None,
        **faults: Any,
    ) -> None:
        super().__init__(**faults)
        self.frames = list(frames) if frames is not None else frames_for(events)
        self.oldest_seq = oldest_seq
        self.refuse_with = refuse_with

    @property
    def base_url(self) -> str:
        """The relay as users give it: scheme, host and port only."""
        return self.url.removesuffix(self.path)

    @property
    def cursors(self) -> list[int | None]:
        return [int(q["cursor"][0]) if "cursor" in q else None for q in self.queries]

    def messages(self, query: dict[str, list[str]]) -> Iterator[tuple[int, bytes, bool]]:
        if self.refuse_with is not None:
            yield CLOSE_AFTER, error_frame(*self.refuse_with), False
            return
        start = 0  # index of the first frame to send
        if "cursor" in query:
            cursor = int(query["cursor"][0])
            if cursor > len(self.frames):
                yield CLOSE_AFTER, error_frame("FutureCursor", "cursor in the future"), False
                return
            start = cursor
            if cursor < self.oldest_seq - 1:
                info = frame("#info", {"name": "OutdatedCursor", "message": "too old"})
                yield -1, info, False
                start = self.oldest_seq - 1
        for index in range(start, len(self.frames)):
            yield index, self.frames[index], False

    async def __aenter__(self) -> FakeRelay:
        await self.start()
        return self
