"""CAR files (content-addressed archives) as atproto writes them: split into blocks, read the roots.

CAR framing is a varint length before the header and before each block (CID, then data). The
blocks are kept undecoded: cbrrr decodes those we need, straight into the AppView's JSON form
(CID links as `{"$link": ...}`, bytes as `{"$bytes": base64}`); libipld's CAR reader would hand
CID links back as plain bytes, which a record's JSON must keep apart from byte strings.
"""

from __future__ import annotations

import cbrrr
import libipld
import msgspec

_json = msgspec.json.Encoder()
_SHA256_CIDV1_PREFIXES = (b"\x01\x71\x12\x20", b"\x01\x55\x12\x20")  # dag-cbor, raw


class BadCar(ValueError):
    """The bytes are not a CAR file we can read."""


def cid_text(cid: cbrrr.CID | bytes) -> str:
    """A CID as its base32 string (libipld does in Rust what cbrrr's CID.encode does in Python)."""
    return libipld.encode_cid(cid if isinstance(cid, bytes) else cid.cid_bytes)


def record_json(block: memoryview | bytes | None) -> msgspec.Raw | None:
    """A record block as AppView JSON; None if the block is missing or not DAG-CBOR."""
    if block is None:
        return None
    try:
        return msgspec.Raw(_json.encode(cbrrr.decode_dag_cbor(bytes(block), atjson_mode=True)))
    except (ValueError, RecursionError):
        return None


def car_roots(car: bytes) -> list[bytes]:
    """The root CIDs (as bytes) named by a CARv1 header."""
    view = memoryview(car)
    header_length, position = _varint(view, 0)
    try:
        header = cbrrr.decode_dag_cbor(bytes(view[position : position + header_length]))
    except (ValueError, RecursionError) as exc:
        raise BadCar(f"CAR header is not DAG-CBOR: {exc}") from None
    if not isinstance(header, dict) or header.get("version") != 1:
        raise BadCar("not a CARv1 header")
    roots = header.get("roots")
    if not isinstance(roots, list):
        raise BadCar("CAR header has no list of roots")
    cids = [r for r in roots if isinstance(r, cbrrr.CID)]
    if len(cids) != len(roots):
        raise BadCar("a CAR root is not a CID")
    return [c.cid_bytes for c in cids]


def car_blocks(car: bytes) -> dict[bytes, memoryview]:
    """The blocks of a CARv1 by CID bytes, undecoded (the header is skipped)."""
    view = memoryview(car)
    header_length, position = _varint(view, 0)
    position += header_length
    blocks: dict[bytes, memoryview] = {}
    while position < len(view):
        length, position = _varint(view, position)
        end = position + length
        if end > len(view):
            raise BadCar("CAR block runs past the end")
        data_start = _cid_end(view, position)
        blocks[bytes(view[position:data_start])] = view[data_start:end]
        position = end
    return blocks


def _cid_end(view: memoryview, position: int) -> int:
    """Where the binary CID starting at `position` ends (v0: a bare sha-256 multihash)."""
    prefix = bytes(view[position : position + 4])
    if prefix in _SHA256_CIDV1_PREFIXES:  # what atproto writes: the fast path
        return position + 36
    if prefix[:2] == b"\x12\x20":
        return position + 34
    _, position = _varint(view, position)  # version
    _, position = _varint(view, position)  # codec
    _, position = _varint(view, position)  # hash function
    digest_length, position = _varint(view, position)
    return position + digest_length


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    """An unsigned LEB128 varint at `position`: its value and the position after it."""
    value = shift = 0
    while True:
        if position >= len(view) or shift > 63:
            raise BadCar("truncated or overlong varint in CAR")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
