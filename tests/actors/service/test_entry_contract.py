"""The ``ctxd:in`` entry contract as a table: each entry, valid or not, and what it becomes.

Entries go through :func:`parse_entry` as bytes, the way the router reads them, with small
limits so the edges are cheap to reach. An invalid entry's reason tag and its whole
message are pinned: the message is what a person reads in the DLQ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace

import pytest

from actors.config import Settings
from actors.service.streams import DLQ_CUT_FIELD, DLQ_MIN_FIELDS, dlq_entry
from actors.service.validation import (
    JSON_MAX_DEPTH,
    Event,
    as_invalid_entry,
    parse_entry,
    routing_key,
)
from graph.errors import InvalidEntryError

LIMITS = replace(Settings(), max_content_bytes=10, max_fields=8, max_entry_bytes=1024)
OK = {"workflow_id": "w", "content": "hello"}
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


def raw(fields: Mapping[str, str | bytes]) -> dict[bytes, bytes]:
    """The fields as read from a stream: bytes names and values."""
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def parsed(fields: Mapping[str, str | bytes], settings: Settings = LIMITS) -> Event:
    return parse_entry("7-0", raw(fields), settings)


def refusal(fields: Mapping[str, str | bytes], settings: Settings = LIMITS) -> tuple[str, str]:
    with pytest.raises(InvalidEntryError) as info:
        parsed(fields, settings)
    return info.value.reason, str(info.value)


WIDE = replace(LIMITS, max_entry_bytes=64 * 1024)  # for the per-field limits below 16 KiB
META_NOT_JSON = (
    "metadata is not valid JSON (Expecting property name enclosed in double quotes at 1)"
)
MARKER = (
    "metadata holds an object at 'a' shaped like a checkpoint serializer marker (a LangChain lc "
    "envelope or a __send__/__interrupt__/__delta_snapshot__/__bytes__ key), which the "
    "checkpoint store would read back as something else: rename its keys"
)


@pytest.mark.parametrize(
    ("fields", "reason", "message"),
    [
        ({"content": "x"}, "missing_workflow_id",
         "entry has no workflow_id: every event names its workflow"),
        ({"workflow_id": "", "content": "x"}, "missing_workflow_id",
         "entry has no workflow_id: every event names its workflow"),
        ({"workflow_id": "a b", "content": "x"}, "invalid_workflow_id",
         "workflow_id 'a b' is invalid: use 1-200 characters of letters, digits and _ . : -"),
        ({"workflow_id": "w" * 201, "content": "x"}, "invalid_workflow_id",
         f"workflow_id '{'w' * 60}' is invalid: use 1-200 characters of letters, digits "
         "and _ . : -"),
        ({"workflow_id": "w"}, "missing_content", "entry has no content: send the event's text"),
        ({"workflow_id": "w", "content": " \n"}, "missing_content",
         "entry has no content: send the event's text"),
        ({"workflow_id": "w", "content": "x" * 11}, "oversized_content",
         "field 'content' is 11 bytes, over the limit of 10: split the event or raise "
         "CTXD_MAX_CONTENT_BYTES"),
        ({"workflow_id": "w", "content": b"\xff"}, "invalid_utf8",
         "field 'content' is not valid UTF-8: send text encoded as UTF-8"),
        ({"workflow_id": "w", "content": "a\x00b"}, "invalid_text",
         "field 'content' contains a NUL character (U+0000) at offset 1: remove it; "
         "text fields hold text"),
        ({**OK, "event_id": "e" * 201}, "invalid_event_id", "event_id must be 1-200 characters"),
        ({**OK, "event_id": "a\nb"}, "invalid_event_id",
         "event_id 'a\\nb' contains control characters: use printable text"),
        ({**OK, "priority": "urgent"}, "invalid_priority",
         "priority 'urgent' is not one of low, standard, high, critical"),
        ({**OK, "deadline": "2026-01-31T12:00:00"}, "invalid_deadline",
         "deadline '2026-01-31T12:00:00' has no UTC offset: add Z or +HH:MM so it is "
         "unambiguous"),
        ({**OK, "deadline": "tomorrow"}, "invalid_deadline",
         "deadline 'tomorrow' is not an ISO-8601 timestamp: use e.g. 2026-01-31T12:00:00Z"),
        ({**OK, "deadline": "9999-12-31T23:59:59-01:00"}, "invalid_deadline",
         "deadline '9999-12-31T23:59:59-01:00' is outside the years 1-9999 once converted "
         "to UTC: send a real date"),
        ({**OK, "max_cost": "-1"}, "invalid_max_cost", "max_cost '-1' is not a finite number >= 0"),
        ({**OK, "max_cost": "nan"}, "invalid_max_cost",
         "max_cost 'nan' is not a finite number >= 0"),
        ({**OK, "max_cost": "inf"}, "invalid_max_cost",
         "max_cost 'inf' is not a finite number >= 0"),
        ({**OK, "metadata": "[1]"}, "invalid_metadata",
         "metadata must be a JSON object, got list: send {...}"),
        ({**OK, "metadata": "{"}, "invalid_metadata", META_NOT_JSON),
        ({**OK, "metadata": json.dumps({"a": INT64_MAX + 1})}, "invalid_metadata",
         "metadata: integer 9223372036854775808 is outside the signed 64-bit range: "
         "send it as a string"),
        ({**OK, "metadata": json.dumps({"a": INT64_MIN - 1})}, "invalid_metadata",
         "metadata: integer -9223372036854775809 is outside the signed 64-bit range: "
         "send it as a string"),
        ({**OK, "metadata": '{"a": NaN}'}, "invalid_metadata",
         "metadata: NaN is not JSON: send null or a string"),
        ({**OK, "metadata": '{"a": -Infinity}'}, "invalid_metadata",
         "metadata: -Infinity is not JSON: send null or a string"),
        ({**OK, "metadata": '{"a": 1e400}'}, "invalid_metadata",
         "metadata: number 1e400 overflows: send it as a string"),
        ({**OK, "metadata": '{"a":' + "[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH + "}"},
         "invalid_metadata",
         f"metadata is nested {JSON_MAX_DEPTH + 1} levels deep, over the limit of "
         f"{JSON_MAX_DEPTH}: flatten it"),
        ({**OK, "metadata": '{"a": "\\ud800"}'}, "invalid_metadata",
         "metadata holds a lone UTF-16 surrogate (\\ud800-\\udfff): send valid text"),
        ({**OK, "metadata": '{"a": {"lc": 1, "type": "x"}}'}, "invalid_metadata", MARKER),
        ({**OK, "control": "pause"}, "invalid_control",
         "control 'pause' is not one of resume, rollback"),
        ({"workflow_id": "w", "control": "rollback"}, "missing_checkpoint_id",
         "a rollback needs checkpoint_id: see `ctxd state WORKFLOW_ID --history`"),
        ({"workflow_id": "w", "control": "rollback", "checkpoint_id": "a b"},
         "invalid_checkpoint_id",
         "checkpoint_id 'a b' is not a checkpoint id: copy one from "
         "`ctxd state WORKFLOW_ID --history`"),
        ({"workflow_id": "w", "control": "resume", "value": "{"}, "invalid_value",
         "resume value is not valid JSON (Expecting property name enclosed in double quotes "
         "at 1)"),
        ({**OK, "traceparent": "x" * 4097}, "oversized_traceparent",
         "field 'traceparent' is 4097 bytes, over the limit of 4096: shorten it"),
    ],
)  # fmt: skip
def test_an_invalid_entry_gets_its_reason_and_an_actionable_message(
    fields: dict[str, str | bytes], reason: str, message: str
) -> None:
    assert refusal(fields, WIDE) == (reason, message)


def test_metadata_over_sixteen_kib_is_refused_by_its_own_limit() -> None:
    metadata = json.dumps({"a": "x" * (16 * 1024)})
    assert refusal({**OK, "metadata": metadata}, WIDE) == (
        "oversized_metadata",
        f"field 'metadata' is {len(metadata)} bytes, over the limit of 16384: shorten it",
    )


@pytest.mark.parametrize(
    ("fields", "reason", "message"),
    [
        ({**OK, **{f"x{i}": "1" for i in range(7)}}, "too_many_fields",
         "entry has 9 fields, over the limit of 8 (unknown fields count too): drop the extra "
         "fields or raise CTXD_MAX_FIELDS"),
        ({**OK, "x": "y" * 2000}, "oversized_entry",
         "entry is 2025 bytes (field names and values, unknown fields included), over the "
         "limit of 1024: shorten it or raise CTXD_MAX_ENTRY_BYTES"),
    ],
)  # fmt: skip
def test_whole_entry_limits_count_unknown_fields(
    fields: dict[str, str], reason: str, message: str
) -> None:
    assert refusal(fields) == (reason, message)


def test_a_field_name_that_is_not_utf8_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidEntryError) as info:
        parse_entry("7-0", {b"\xff": b"1", **raw(OK)}, LIMITS)
    assert (info.value.reason, str(info.value)) == (
        "invalid_field_name",
        "field name b'\\xff' is not UTF-8 text: name fields with text",
    )


def test_a_minimal_event_gets_the_defaults() -> None:
    assert parsed(OK) == Event(source_id="7-0", workflow_id="w", event_id="7-0", content="hello")


def test_every_optional_field_is_parsed_and_normalised() -> None:
    event = parsed(
        {
            **OK,
            "event_id": "order-1",
            "priority": "critical",
            "deadline": "2026-01-31T13:00:00+01:00",
            "max_cost": "2.5",
            "metadata": json.dumps({"n": INT64_MAX, "m": INT64_MIN, "f": 1.5}),
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        WIDE,
    )
    assert event == Event(
        source_id="7-0",
        workflow_id="w",
        event_id="order-1",
        content="hello",
        priority="critical",
        deadline="2026-01-31T12:00:00+00:00",  # converted to UTC
        max_cost=2.5,
        metadata={"n": INT64_MAX, "m": INT64_MIN, "f": 1.5},
        carrier={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


def test_control_entries_need_no_content() -> None:
    resume = parsed({"workflow_id": "w", "control": "resume", "value": '{"ok": true}'})
    assert (resume.control, resume.value, resume.content) == ("resume", {"ok": True}, "ctxd resume")
    rollback = parsed({"workflow_id": "w", "control": "rollback", "checkpoint_id": "1ef-a.b"})
    assert (rollback.control, rollback.checkpoint_id) == ("rollback", "1ef-a.b")


def test_values_exactly_at_each_limit_are_accepted() -> None:
    at_fields = {**OK, **{f"x{i}": "1" for i in range(6)}}  # 8 fields
    assert parsed(at_fields).workflow_id == "w"
    padding = 1024 - sum(len(k) + len(v) for k, v in OK.items()) - len("pad")
    assert parsed({**OK, "pad": "p" * padding}).content == "hello"  # exactly 1024 bytes
    assert parsed({"workflow_id": "w", "content": "é" * 5}).content == "é" * 5  # 10 bytes
    deepest = '{"a":' + "[" * (JSON_MAX_DEPTH - 1) + "]" * (JSON_MAX_DEPTH - 1) + "}"
    assert parsed({**OK, "metadata": deepest}, WIDE).metadata["a"] is not None
    assert parsed({**OK, "workflow_id": "w" * 200}).workflow_id == "w" * 200


def test_an_unexpected_exception_becomes_an_invalid_entry_naming_its_type() -> None:
    error = as_invalid_entry(KeyError("x" * 500))
    assert error.reason == "invalid_entry"
    assert str(error).startswith("entry could not be read (KeyError: '" + "x" * 100)
    assert len(str(error)) < 500  # the detail is bounded


def test_a_dlq_copy_of_a_hostile_entry_stays_within_its_bounds() -> None:
    """10,000 fields of 10 KB with long names: the copy keeps DLQ_MIN_FIELDS fields, each
    name at most 256 bytes and each value at most the field limit plus its marker."""
    hostile = {(str(i) + "n" * 300).encode(): b"v" * 10_000 for i in range(10_000)}
    copy = dlq_entry(
        hostile, reason="too_many_fields", error="e" * 5000, attempts=1, source_id="7-0",
        field_bytes=64, max_fields=8,
    )  # fmt: skip
    own = {b"reason", b"error", b"attempts", b"source_id", DLQ_CUT_FIELD.encode()}
    originals = {k: v for k, v in copy.items() if k not in own}
    assert len(originals) == DLQ_MIN_FIELDS
    assert max(len(k) for k in originals) <= 256 + len("…[cut 999 bytes]".encode())
    assert max(len(v) for v in originals.values()) <= 64 + len("…[cut 9936 bytes]".encode())
    assert len(copy[b"error"]) <= 1000 + len("…[cut 4000 bytes]".encode())
    assert copy[b"source_id"] == b"7-0"
    assert f"{10_000 - DLQ_MIN_FIELDS} field(s) not copied" in copy[DLQ_CUT_FIELD.encode()].decode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({b"workflow_id": b"wf-1", b"content": b"\x00 not text \xfe"}, "wf-1"),
        ({b"workflow_id": b"wf-2", b"metadata": b"{not json", b"priority": b"urgent!"}, "wf-2"),
        ({"workflow_id": "wf-3"}, "wf-3"),  # no content: the owner refuses it, not the router
    ],
)
def test_the_router_reads_only_the_routing_key(raw: Mapping[bytes, bytes], expected: str) -> None:
    """An entry's content is validated once, by its partition's owner; the router only
    needs the workflow id (and the whole-entry limits, to move the entry)."""
    assert routing_key(raw, LIMITS) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({b"content": b"no workflow"}, "missing_workflow_id"),
        ({b"workflow_id": b"a b"}, "invalid_workflow_id"),
        ({b"workflow_id": b"\xfe\xff"}, "invalid_utf8"),
        ({b"workflow_id": b"wf", **{f"f{i}".encode(): b"v" for i in range(9)}}, "too_many_fields"),
        ({b"workflow_id": b"wf", b"blob": b"z" * 2048}, "oversized_entry"),
    ],
)
def test_an_entry_the_router_cannot_move_is_refused_with_its_reason(
    raw: Mapping[bytes, bytes], reason: str
) -> None:
    with pytest.raises(InvalidEntryError) as refused:
        routing_key(raw, LIMITS)
    assert refused.value.reason == reason
