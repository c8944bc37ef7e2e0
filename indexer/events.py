"""The stream envelope and Jetstream events as msgspec Structs, and the one conversion between them.

Decoding touches no database. Record bodies stay `msgspec.Raw` until the collection's plugin
decodes them with its own Struct.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec


class StrongRef(msgspec.Struct, frozen=True):
    """A `com.atproto.repo.strongRef`: the uri and cid of another record."""

    uri: str
    cid: str = ""


class _Op(msgspec.Struct, kw_only=True, tag_field="type"):
    seq: int = 0
    time: str = ""
    did: str


class _RecordOp(_Op, kw_only=True):
    commit: str = ""
    rev: str
    collection: str
    rkey: str


class _Write(_RecordOp, kw_only=True):
    cid: str = ""
    record: msgspec.Raw


class Create(_Write, tag="create", kw_only=True):
    pass


class Update(_Write, tag="update", kw_only=True):
    pass


class Delete(_RecordOp, tag="delete", kw_only=True):
    pass


class Repo(_Op, tag="repo", kw_only=True):
    commit: str = ""
    rev: str = ""


class Account(_Op, tag="account", kw_only=True):
    active: bool = True
    status: str | None = None


class Identity(_Op, tag="identity", kw_only=True):
    handle: str | None = None


Envelope = Create | Update | Delete | Repo | Account | Identity
RecordOp = Create | Update | Delete


class JetstreamCommit(msgspec.Struct, kw_only=True):
    rev: str
    operation: str
    collection: str
    rkey: str
    record: msgspec.Raw = msgspec.Raw(b"")
    cid: str | None = None


class JetstreamIdentity(msgspec.Struct, kw_only=True):
    handle: str | None = None
    seq: int = 0


class JetstreamAccount(msgspec.Struct, kw_only=True):
    active: bool = True
    status: str | None = None
    seq: int = 0


class JetstreamEvent(msgspec.Struct, kw_only=True):
    """A Jetstream message, v1 or v2 (v2 adds a top-level `cursor`)."""

    did: str
    time_us: int
    kind: str
    commit: JetstreamCommit | None = None
    identity: JetstreamIdentity | None = None
    account: JetstreamAccount | None = None
    cursor: int | None = None


class _Probe(msgspec.Struct):
    """Just enough of a line to tell a Jetstream event from an envelope."""

    kind: str | None = None
    type: str | None = None


class UnsupportedEvent(ValueError):
    """A well-formed event of a kind the envelope has no place for."""


envelope_decoder: msgspec.json.Decoder[Envelope] = msgspec.json.Decoder(Envelope)
jetstream_decoder = msgspec.json.Decoder(JetstreamEvent)
_probe_decoder = msgspec.json.Decoder(_Probe)
_encoder = msgspec.json.Encoder()


def time_from_us(time_us: int) -> str:
    """ISO-8601 UTC with milliseconds from a Jetstream `time_us`."""
    moment = datetime.fromtimestamp(time_us / 1_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def from_jetstream(event: JetstreamEvent) -> Envelope:
    """Map one Jetstream event onto the envelope (its `time_us` becomes `seq` and `time`)."""
    seq = event.cursor if event.cursor is not None else event.time_us
    time = time_from_us(event.time_us)
    if event.kind == "commit" and event.commit is not None:
        return _from_commit(event, event.commit, seq, time)
    if event.kind == "identity":
        handle = event.identity.handle if event.identity else None
        return Identity(seq=seq, time=time, did=event.did, handle=handle)
    if event.kind == "account":
        acct = event.account or JetstreamAccount()
        return Account(seq=seq, time=time, did=event.did, active=acct.active, status=acct.status)
    raise UnsupportedEvent(f"unsupported Jetstream kind {event.kind!r}")


def _from_commit(event: JetstreamEvent, commit: JetstreamCommit, seq: int, time: str) -> Envelope:
    if commit.operation == "delete":
        return Delete(
            seq=seq, time=time, did=event.did, rev=commit.rev,
            collection=commit.collection, rkey=commit.rkey,
        )  # fmt: skip
    if commit.operation not in ("create", "update"):
        raise UnsupportedEvent(f"unsupported commit operation {commit.operation!r}")
    if not commit.record:
        raise UnsupportedEvent(f"{commit.operation} without a record")
    kind = Create if commit.operation == "create" else Update
    return kind(
        seq=seq, time=time, did=event.did, rev=commit.rev, collection=commit.collection,
        rkey=commit.rkey, cid=commit.cid or "", record=commit.record,
    )  # fmt: skip


def normalize_line(line: bytes) -> bytes:
    """One JSONL line (Jetstream event or envelope) as envelope JSON; raises ValueError if bad."""
    probe = _probe_decoder.decode(line)
    if probe.type is not None:
        envelope_decoder.decode(line)  # validate; pass the original bytes through
        return line
    if probe.kind is not None:
        return _encoder.encode(from_jetstream(jetstream_decoder.decode(line)))
    raise ValueError("neither an envelope (no `type`) nor a Jetstream event (no `kind`)")


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)
