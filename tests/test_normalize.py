"""Normalization the AppView's readers rely on: dates, text, JSON that msgspec refuses."""

from __future__ import annotations

import pytest

from indexer.constants import UNPARSEABLE_DATE
from indexer.events import normalize_line
from indexer.normalize import clean_text, normalize_datetime, repair_json


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2024-11-19T07:06:40.123Z", "2024-11-19T07:06:40.123Z"),
        ("2024-11-19T07:06:40Z", "2024-11-19T07:06:40.000Z"),
        ("2024-11-19T07:06:40.123456789Z"[:26] + "Z", "2024-11-19T07:06:40.123Z"),
        ("2024-11-19T09:06:40.5+02:00", "2024-11-19T07:06:40.500Z"),
        ("2024-11-19T07:06:40", "2024-11-19T07:06:40.000Z"),
        ("2024-11-19", "2024-11-19T00:00:00.000Z"),
        ("0001-01-01T00:30:00+01:00", UNPARSEABLE_DATE),
        ("2024-02-30T07:06:40.123Z", UNPARSEABLE_DATE),
        ("2024-13-19T07:06:40.123Z", UNPARSEABLE_DATE),
        ("yesterday", UNPARSEABLE_DATE),
        ("", UNPARSEABLE_DATE),
        (12345, UNPARSEABLE_DATE),
        (None, UNPARSEABLE_DATE),
    ],
)
def test_normalize_datetime(given, expected):
    assert normalize_datetime(given) == expected


def test_clean_text_strips_nul_replaces_surrogates_and_bounds():
    assert clean_text("a\x00b") == "ab"
    assert clean_text("a\ud800b") == "a?b"
    assert clean_text("é" * 10, limit=4) == "éééé"
    assert clean_text(5) == ""


def test_repair_json_keeps_what_can_be_kept():
    assert repair_json(rb'{"t":"a\ud800b\u0000c","n":[1,"\udfff"]}') == b'{"t":"a?bc","n":[1,"?"]}'
    assert repair_json(b"{nope") is None


def test_jetstream_line_becomes_an_envelope():
    line = (
        b'{"did":"did:plc:a","time_us":1732000000123456,"kind":"commit","commit":{"rev":"3k",'
        b'"operation":"create","collection":"app.bsky.feed.like","rkey":"r1","cid":"bafy",'
        b'"record":{"a":1}}}'
    )
    assert normalize_line(line) == (
        b'{"type":"create","seq":1732000000123456,"time":"2024-11-19T07:06:40.123Z",'
        b'"did":"did:plc:a","commit":"","rev":"3k","collection":"app.bsky.feed.like",'
        b'"rkey":"r1","cid":"bafy","record":{"a":1}}'
    )
    v2 = line.replace(b'"kind"', b'"cursor":77,"kind"')
    assert b'"seq":77' in normalize_line(v2)
    account = (
        b'{"did":"did:plc:a","time_us":1,"kind":"account",'
        b'"account":{"active":false,"status":"deleted"}}'
    )
    assert normalize_line(account) == (
        b'{"type":"account","seq":1,"time":"1970-01-01T00:00:00.000Z","did":"did:plc:a",'
        b'"active":false,"status":"deleted"}'
    )
    with pytest.raises(ValueError, match="unsupported Jetstream kind"):
        normalize_line(b'{"did":"did:plc:a","time_us":1,"kind":"mystery"}')
