"""The relay firehose as a source: `com.atproto.sync.subscribeRepos` frames to envelopes.

A frame is two DAG-CBOR objects back to back: a header (`{"op": 1, "t": "#commit"}`, or
`{"op": -1}` for an error) and the body. A `#commit` body carries its blocks as a CAR; the CAR
is split into blocks once per commit, and only the blocks of the records its ops write are
decoded, straight into the AppView's JSON form (CID links as `{"$link": ...}`, bytes as
`{"$bytes": base64}`) by cbrrr. The cursor is the relay's `seq`; a relay replays the events
after the `cursor` it is given, so the ingester resumes exactly where it was. A relay whose seq
was reset below that cursor answers with a `FutureCursor` error (`CursorAhead`), after which the
ingester reads its live stream.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import cbrrr

from indexer.car import car_blocks, cid_text, record_json
from indexer.config import Settings
from indexer.constants import RELAY_MAX_FRAME_BYTES, RELAY_PATH
from indexer.events import Account, Create, Delete, Envelope, Identity, Update, encode
from indexer.source import (
    Allowlist,
    BadFrame,
    CursorAhead,
    Frame,
    Position,
    SourceError,
    host_of,
    split_saved,
)

log = logging.getLogger(__name__)


class RelaySource:
    """One relay's `subscribeRepos`, filtered by the collection allowlist."""

    name = "relay"
    max_message_bytes = RELAY_MAX_FRAME_BYTES

    def __init__(self, settings: Settings) -> None:
        self.urls: tuple[str, ...] = (settings.relay_url,)
        self._allowed = Allowlist(settings.ingester_collections)

    def subscribe_url(self, url: str, cursor: int | None) -> str:
        """The `subscribeRepos` URL of a relay (a bare host gets the path), with `cursor`."""
        parts = urlsplit(url)
        path = parts.path if parts.path.endswith("subscribeRepos") else RELAY_PATH
        query = parse_qsl(parts.query)
        if cursor is not None:
            query.append(("cursor", str(cursor)))
        return urlunsplit(parts._replace(path=path, query=urlencode(query)))

    def resume_cursor(self, url: str, position: Position) -> int | None:
        """The seq read to, on the relay that numbered it (another relay starts live)."""
        return position.seq if position.host == host_of(url) else None

    def saved_position(self, host: str, value: str) -> Position:
        """A saved seq."""
        return Position(host, seq=split_saved(value)[0])

    def decode(self, message: bytes) -> Frame:
        """One frame: a `#commit` as one envelope per op; identity and account as one each."""
        header, body = _split_frame(message)
        if header.get("op") == -1:
            error = f"{body.get('error')}: {body.get('message')}"
            if body.get("error") == "FutureCursor":
                raise CursorAhead(error)
            raise SourceError(error)
        kind = header.get("t")
        try:
            if kind == "#commit":
                return self._commit(body)
            if kind in ("#identity", "#account"):
                return _identity_or_account(kind, body)
            if kind == "#sync":
                # The repo's state was reset (or its history cut): its current records have to
                # come from a backfill, not from this frame.
                log.info("#sync for %s at rev %s", body.get("did"), body.get("rev"))
                return _marker(body, "sync")
            if kind == "#info":
                log.warning("relay info %s: %s", body.get("name"), body.get("message"))
                return Frame(skipped=("info",))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadFrame(f"malformed {kind} frame: {exc!r}") from None
        if isinstance(body.get("seq"), int):
            return _marker(body, "unknown")
        return Frame(skipped=("unknown",))

    def _commit(self, body: dict[str, Any]) -> Frame:
        frame = Frame(seq=_seq(body), event_time_s=_seconds(body.get("time")))
        if body.get("tooBig"):
            log.warning("commit of %s too big to carry its ops; skipped", body["repo"])
            frame.skipped = ("too_big",)
            return frame
        common: dict[str, Any] = {
            "seq": frame.seq,
            "time": _text(body, "time"),
            "did": _text(body, "repo"),
            "commit": cid_text(body["commit"]),
            "rev": _text(body, "rev"),
        }
        blocks: dict[bytes, memoryview] | None = None
        skipped = []
        for op in body["ops"]:
            collection, _, rkey = op["path"].partition("/")
            if not self._allowed(collection):
                skipped.append("filtered")
                continue
            action = op["action"]
            if action == "delete":
                envelope: Envelope = Delete(collection=collection, rkey=rkey, **common)
            elif action in ("create", "update"):
                if blocks is None:
                    blocks = car_blocks(body["blocks"])
                record = record_json(blocks.get(op["cid"].cid_bytes))
                if record is None:
                    skipped.append("bad_record")
                    continue
                kind = Create if action == "create" else Update
                envelope = kind(
                    collection=collection, rkey=rkey, cid=cid_text(op["cid"]), record=record,
                    **common,
                )  # fmt: skip
            else:
                skipped.append("unknown")
                continue
            frame.envelopes.append((action, encode(envelope)))
        frame.skipped = tuple(skipped)
        return frame


def _split_frame(message: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and body of a frame, both maps."""
    try:
        parts = list(cbrrr.decode_multi_dag_cbor_in_violation_of_the_spec(message))
    except (ValueError, TypeError, RecursionError, AssertionError) as exc:
        raise BadFrame(f"not DAG-CBOR: {exc}") from None
    if len(parts) != 2 or not all(isinstance(p, dict) for p in parts):
        raise BadFrame(f"a frame is a header and a body, got {len(parts)} object(s)")
    header, body = parts
    assert isinstance(header, dict) and isinstance(body, dict)
    return header, body


def _marker(body: dict[str, Any], reason: str) -> Frame:
    """A frame that only moves the cursor (and counts why nothing was added)."""
    return Frame(seq=_seq(body), event_time_s=_seconds(body.get("time")), skipped=(reason,))


def _identity_or_account(kind: str, body: dict[str, Any]) -> Frame:
    frame = Frame(seq=_seq(body), event_time_s=_seconds(body.get("time")))
    common: dict[str, Any] = {
        "seq": frame.seq, "time": _text(body, "time"), "did": _text(body, "did"),
    }  # fmt: skip
    envelope: Envelope
    if kind == "#identity":
        envelope = Identity(handle=body.get("handle"), **common)
        frame.envelopes.append(("identity", encode(envelope)))
    else:
        envelope = Account(active=bool(body["active"]), status=body.get("status"), **common)
        frame.envelopes.append(("account", encode(envelope)))
    return frame


def _seq(body: dict[str, Any]) -> int:
    seq = body["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise BadFrame(f"seq is not an integer: {seq!r}")
    return seq


def _text(body: dict[str, Any], key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise BadFrame(f"{key} is not a string: {value!r}")
    return value


def _seconds(iso: object) -> float | None:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None
