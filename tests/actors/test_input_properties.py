"""Property tests (hypothesis) of the input path, done-means 1(b): arbitrary field maps
of arbitrary bytes, names and values, go through the whole-entry limits, decoding,
validation and the building of the DLQ copy; nothing but InvalidEntryError escapes
validation, the DLQ copy never fails and is always bounded, and (for a bounded number
of examples) the real DLQ write to Redis succeeds."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import cast

from actor_support import RawEntries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from actors.config import Settings
from actors.service.gateway import dead_letter
from actors.service.streams import DLQ_CUT_FIELD, DLQ_MIN_FIELDS, dlq_entry
from actors.service.validation import parse_entry, parse_event
from graph.errors import InvalidEntryError

LIMITS = replace(Settings(), max_content_bytes=2048, max_fields=16, max_entry_bytes=8192)
FIELD_BYTES = 128
KNOWN = [
    "workflow_id", "content", "event_id", "priority", "deadline", "max_cost", "metadata",
    "traceparent", "tracestate", "control", "value", "checkpoint_id", "ctxd_source_id",
    "reason", "error", "attempts", "source_id", DLQ_CUT_FIELD,
]  # fmt: skip
JSONISH = [
    "{}", "[]", "null", "NaN", "-Infinity", "1e999", '{"a":' + "[" * 40 + "]" * 40 + "}",
    '{"a": ' + "9" * 30 + "}", '{"\\ud800": 1}', '"\\udfff"', "{" * 2000,
    "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2026-01-01T00:00:00Z",
    "resume", "rollback", "low", "critical", "w", "0", "-0", "1e308", "\x00", "",
    "[" * 3000 + "]" * 3000, '{"a":' + "1" * 5000 + "}", '{"a": 18446744073709551616}',
]  # fmt: skip

names = st.one_of(
    st.sampled_from(KNOWN).map(str.encode),
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(200, 400).map(lambda n: b"n" * n),
)
values = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(JSONISH).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=30,
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(0, 20_000).map(lambda n: b"x" * n),
)
valid_base = st.fixed_dictionaries(
    {
        b"workflow_id": st.sampled_from([b"w", b"wf-1"]),
        b"content": st.sampled_from([b"hi", b"x" * 99]),
    }
)
special = st.sampled_from(JSONISH).map(lambda t: t.encode("utf-8", "surrogatepass"))
overrides = st.dictionaries(
    st.sampled_from(KNOWN[:12]).map(str.encode), special | values, min_size=1, max_size=3
)
entries = st.one_of(
    st.dictionaries(names, values, max_size=40),
    # A valid entry with a few known fields replaced: reaches every field's checks.
    st.tuples(valid_base, overrides).map(lambda t: {**t[0], **t[1]}),
)
WRITES = 25  # real DLQ writes: a bounded number of examples


def _check_dlq_copy(raw: dict[bytes, bytes], entry: dict[bytes, bytes]) -> None:
    originals = {k: v for k, v in entry.items() if k not in _OWN}
    assert len(originals) <= max(LIMITS.max_fields, DLQ_MIN_FIELDS)
    marker = "…[cut 99999999 bytes]".encode()
    for name, value in originals.items():
        assert len(name) <= 256 + len(marker)
        assert len(value) <= FIELD_BYTES + len(marker)
    for own in (b"reason", b"error", b"attempts", b"source_id"):
        assert own in entry
    copied = {k: v for k, v in raw.items() if k not in _OWN and k != b"ctxd_source_id"}
    too_long = any(len(v) > FIELD_BYTES or len(k) > 256 for k, v in copied.items())
    if too_long or len(copied) > max(LIMITS.max_fields, DLQ_MIN_FIELDS):
        assert DLQ_CUT_FIELD.encode() in entry
    else:
        assert originals == copied  # nothing cut: copied whole, bytes as they were


_OWN = {b"reason", b"error", b"attempts", b"source_id", DLQ_CUT_FIELD.encode()}


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=entries)
def test_arbitrary_bytes_raise_only_invalid_entry_and_always_dead_letter(
    raw: dict[bytes, bytes], redis_url: str, prefix: str
) -> None:
    reason, error = "poison", "failed 5 times"
    try:
        event = parse_entry("1-0", raw, LIMITS)
    except InvalidEntryError as exc:
        reason, error = exc.reason, str(exc)
    else:
        assert event.workflow_id
    assert reason
    assert error
    entry = dlq_entry(
        raw, reason=reason, error=error, attempts=1, source_id="1-0",
        field_bytes=FIELD_BYTES, max_fields=LIMITS.max_fields,
    )  # fmt: skip
    _check_dlq_copy(raw, entry)
    _write_some(redis_url, prefix, raw)


_written = {"count": 0}


def _write_some(redis_url: str, prefix: str, raw: dict[bytes, bytes]) -> None:
    """The real DLQ write (fenced Lua script and MULTI), for the first WRITES examples."""
    if _written["count"] >= WRITES or not raw:
        return
    _written["count"] += 1

    async def write() -> None:
        client = AsyncRedis.from_url(redis_url)
        try:
            lease = (f"{prefix}:lease:prop", "me")
            await client.set(*lease)
            for fenced in (lease, None):
                await dead_letter(
                    client,
                    dlq_stream=f"{prefix}:dlq",
                    input_stream=f"{prefix}:in",
                    group="ctxd",
                    source_id="1-0",
                    fields=raw,
                    reason="r",
                    error="e",
                    attempts=1,
                    lease=fenced,
                    field_bytes=FIELD_BYTES,
                    max_fields=LIMITS.max_fields,
                )
        finally:
            await client.aclose()

    asyncio.run(write())
    sync = Redis.from_url(redis_url)
    try:
        for _, stored in cast(RawEntries, sync.xrange(f"{prefix}:dlq"))[-2:]:
            _check_dlq_copy(raw, stored)
    finally:
        sync.close()


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.text(max_size=30), st.text(max_size=300) | st.binary(max_size=50)))
def test_parse_event_on_any_text_raises_only_invalid_entry(fields: dict[str, str | bytes]) -> None:
    """Decoded maps too (as the parking replay passes them), lone surrogates included."""
    fields = {**fields, **({"workflow_id": "w"} if len(fields) % 2 else {})}
    reason = "valid"
    try:
        parse_event("1-0", fields, max_fields=16, max_entry_bytes=8192)
    except InvalidEntryError as exc:
        reason = exc.reason
    assert reason


def test_ten_thousand_fields_and_ten_megabytes_are_written_to_the_dlq(
    redis_url: str, prefix: str
) -> None:
    """The two largest shapes, through the real fenced DLQ script (Lua unpack bound)."""
    cases = [
        {f"f{i}".encode(): b"v" for i in range(10_000)},
        {b"workflow_id": b"w", b"blob": b"\xff" * (10 << 20)},
    ]
    for raw in cases:
        _written["count"] = 0
        _write_some(redis_url, prefix, raw)
    sync = Redis.from_url(redis_url)
    try:
        assert sync.xlen(f"{prefix}:dlq") == 4
    finally:
        sync.close()
