"""Wire format of events: JSON objects in, clear errors for anything else."""

from __future__ import annotations

import math

import pytest

from core.streaming.events import Event, MalformedEventError, decode, encode, normalize_headers


def test_encode_decode_round_trip_keeps_unicode_and_nesting() -> None:
    value = {"amount": 12.5, "merchant": "Café ☕", "tags": ["a", 1, None], "nested": {"ok": True}}
    raw = encode(value)
    assert isinstance(raw, bytes)
    assert b" " not in raw.replace(b"Caf\xc3\xa9 ", b"")  # compact separators
    assert decode(raw) == value


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty payload"),
        (None, "empty payload"),
        (b"\xff\xfe{", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON list, expected a JSON object"),
        (b'"text"', "JSON str, expected a JSON object"),
        (b"42", "JSON int, expected a JSON object"),
    ],
)
def test_decode_rejects_non_objects_with_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(MalformedEventError, match=reason) as info:
        decode(raw)
    assert reason in info.value.reason
    assert info.value.event is None


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([1, 2], TypeError, "must be a dict"),
        ({"when": object()}, TypeError, "not JSON-serialisable"),
        ({"x": math.nan}, ValueError, "Out of range float"),
    ],
)
def test_encode_rejects_what_json_cannot_carry(value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        encode(value)  # type: ignore[arg-type]


def test_event_header_returns_last_value_decoded() -> None:
    event = Event("t", None, {}, 0, 0, 0, headers=(("h", b"one"), ("h", b"two")))
    assert event.header("h") == "two"
    assert event.header("missing") is None


def test_normalize_headers_encodes_str_and_rejects_other_types() -> None:
    assert normalize_headers({"a": "é", "b": b"\x00"}) == (("a", "é".encode()), ("b", b"\x00"))
    assert normalize_headers(None) == ()
    with pytest.raises(TypeError, match="header 'n' must be str or bytes"):
        normalize_headers({"n": 3})  # type: ignore[dict-item]
