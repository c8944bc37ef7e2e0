"""Make values safe for PostgreSQL the way the AppView does: dates to ISO-8601 UTC, text bounded.

Bad input never reaches Postgres and never fails a batch: `\\u0000` is stripped, lone surrogates
are replaced, strings are bounded, unparseable dates become the epoch.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from indexer.constants import MAX_SHORT_CHARS, UNPARSEABLE_DATE


def normalize_datetime(value: object) -> str:
    """A valid datetime as ISO-8601 UTC with milliseconds; anything else as 1970-01-01."""
    if not isinstance(value, str) or not 10 <= len(value) <= 64:
        return UNPARSEABLE_DATE
    if len(value) == 24 and value[19] == "." and value[23] == "Z" and value[10] == "T":
        # Already canonical (the common case): only check that it is a real moment.
        try:
            datetime.fromisoformat(value[:23])
        except ValueError:
            return UNPARSEABLE_DATE
        return value if value[:4] != "0000" else UNPARSEABLE_DATE
    text = value.strip()
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return UNPARSEABLE_DATE
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
    except (OverflowError, ValueError):
        return UNPARSEABLE_DATE
    if moment.year < 1:
        return UNPARSEABLE_DATE
    return (
        f"{moment.year:04d}"
        + moment.strftime("-%m-%dT%H:%M:%S.")
        + (f"{moment.microsecond // 1000:03d}Z")
    )


def clean_text(value: object, limit: int = MAX_SHORT_CHARS) -> str:
    """A string PostgreSQL accepts: no NUL, valid UTF-8, at most `limit` characters."""
    if not isinstance(value, str):
        return ""
    if len(value) > limit:
        value = value[:limit]
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def clean_optional(value: object, limit: int = MAX_SHORT_CHARS) -> str | None:
    """Like `clean_text`, but absent stays absent."""
    return None if value is None else clean_text(value, limit)


def clean_json_text(raw: bytes) -> str:
    """A record's JSON as text for `record.json`; escaped NULs are harmless in text columns."""
    text = raw.decode("utf-8", "replace")
    return text.replace("\x00", "") if "\x00" in text else text


def _scrub(value: object) -> object:
    if isinstance(value, str):
        return clean_text(value, len(value))
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k, len(k)): _scrub(v) for k, v in value.items()}
    return value


def repair_json(raw: bytes) -> bytes | None:
    """JSON that msgspec refuses only for lone surrogates or NULs, re-encoded clean; else None."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return json.dumps(_scrub(value), ensure_ascii=False, separators=(",", ":")).encode()
