"""The input contract without Redis: whole-entry limits before parsing, bounded JSON,
dates that stay in range, and DLQ copies that keep a bounded prefix of each field."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from actors.config import Settings, load_settings
from actors.service.partitions import partition_of
from actors.service.streams import DLQ_CUT_FIELD, dlq_entry, done_key
from actors.service.validation import JSON_MAX_DEPTH, check_entry, parse_entry, parse_event
from graph.errors import ConfigError, InvalidEntryError

OK = {"workflow_id": "w", "content": "hello"}


def reason_of(fields: dict[str, str]) -> str:
    with pytest.raises(InvalidEntryError) as info:
        parse_event("1-0", fields)
    return info.value.reason


@pytest.mark.parametrize(
    ("label", "extra", "reason"),
    [
        ("deadline past year 9999 in UTC", {"deadline": "9999-12-31T23:59:59-01:00"},
         "invalid_deadline"),
        ("deadline before year 1 in UTC", {"deadline": "0001-01-01T00:00:00+01:00"},
         "invalid_deadline"),
        ("metadata 3,000 arrays deep", {"metadata": '{"a":' + "[" * 3000 + "]" * 3000 + "}"},
         "invalid_metadata"),
        ("metadata 3,000 objects deep", {"metadata": '{"":' * 3000 + "1" + "}" * 3000},
         "invalid_metadata"),
        ("metadata one level too deep",
         {"metadata": '{"a":' + "[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH + "}"},
         "invalid_metadata"),
        ("metadata int of 5,000 digits", {"metadata": '{"a":' + "1" * 5000 + "}"},
         "invalid_metadata"),
        ("metadata int 2**63", {"metadata": json.dumps({"a": 2**63})}, "invalid_metadata"),
        ("metadata int -2**63-1", {"metadata": json.dumps({"a": -(2**63) - 1})},
         "invalid_metadata"),
        ("metadata NaN", {"metadata": '{"a": NaN}'}, "invalid_metadata"),
        ("metadata Infinity", {"metadata": '{"a": [Infinity]}'}, "invalid_metadata"),
        ("metadata -Infinity", {"metadata": '{"a": -Infinity}'}, "invalid_metadata"),
        ("metadata float overflowing", {"metadata": '{"a": 1e400}'}, "invalid_metadata"),
        ("metadata lone surrogate", {"metadata": '{"a": "\\ud800"}'}, "invalid_metadata"),
        ("metadata lone surrogate key", {"metadata": '{"\\udfff": 1}'}, "invalid_metadata"),
        ("resume value 3,000 deep", {"control": "resume", "value": "[" * 3000 + "]" * 3000},
         "invalid_value"),
        ("resume value NaN", {"control": "resume", "value": "NaN"}, "invalid_value"),
        ("rollback to a query", {"control": "rollback", "checkpoint_id": "*|@x:{y}"},
         "invalid_checkpoint_id"),
        ("NUL in content", {"content": "a\x00b"}, "invalid_text"),
        ("NUL in event_id", {"event_id": "a\x00b"}, "invalid_text"),
        ("newline in event_id", {"event_id": "a\nb"}, "invalid_event_id"),
    ],
)  # fmt: skip
def test_hostile_values_are_invalid_entries_not_crashes(
    label: str, extra: dict[str, str], reason: str
) -> None:
    """Each of these raised OverflowError, RecursionError or ValueError (or was let in
    and broke a later step); now each is an InvalidEntryError with its reason."""
    assert reason_of({**OK, **extra}) == reason, label


def test_values_at_the_limits_are_accepted() -> None:
    """The bounds are not off by one: depth JSON_MAX_DEPTH, int64 ends, year 9999 in UTC."""
    depth = JSON_MAX_DEPTH - 1  # inside the metadata object
    meta = (
        '{"a":'
        + "[" * depth
        + "]" * depth
        + ', "b": 9223372036854775807, "c": -9223372036854775808, "d": 1.5e300}'
    )
    event = parse_event(
        "1-0", {**OK, "metadata": meta, "deadline": "9999-12-31T23:59:59+00:00", "odd": "ok"}
    )
    assert event.metadata["b"] == 2**63 - 1
    assert event.deadline == "9999-12-31T23:59:59+00:00"


def test_unexpected_exceptions_become_invalid_entry() -> None:
    """Whatever breaks inside parsing is reported as invalid_entry naming the exception."""

    class Exploding(dict[str, str]):
        def get(self, key: str, default: object = None) -> str:
            raise RuntimeError("a bug in reading " + "x" * 5000)

    with pytest.raises(InvalidEntryError) as info:
        parse_event("1-0", Exploding(OK))
    assert info.value.reason == "invalid_entry"
    assert "RuntimeError" in str(info.value)
    assert len(str(info.value)) < 1000
    # Text that cannot be encoded (a lone surrogate) is refused, not a crash later on.
    with pytest.raises(InvalidEntryError) as info:
        parse_event("1-0", {"workflow_id": "w", "content": "\ud800"})
    assert info.value.reason == "invalid_utf8"


def test_field_count_and_total_bytes_include_unknown_fields() -> None:
    raw = {b"workflow_id": b"w", b"content": b"x", **{f"u{i}".encode(): b"v" for i in range(31)}}
    with pytest.raises(InvalidEntryError) as info:
        check_entry(raw, max_fields=32, max_entry_bytes=1 << 20)
    assert info.value.reason == "too_many_fields"
    assert "33 fields" in str(info.value)
    big = {b"workflow_id": b"w", b"content": b"x", b"extra": b"y" * 2000}
    with pytest.raises(InvalidEntryError) as info:
        check_entry(big, max_fields=32, max_entry_bytes=2000)
    assert info.value.reason == "oversized_entry"
    assert "CTXD_MAX_ENTRY_BYTES" in str(info.value)
    check_entry(big, max_fields=32, max_entry_bytes=4096)  # within both: fine


def test_binary_field_names_are_rejected_before_decoding() -> None:
    with pytest.raises(InvalidEntryError) as info:
        check_entry({b"\xff\xfe": b"x", b"content": b"x"}, max_fields=32, max_entry_bytes=4096)
    assert info.value.reason == "invalid_field_name"


def test_parse_entry_checks_limits_on_the_raw_bytes_first() -> None:
    """A 10 MB value is refused by size before anything decodes it (not as invalid_utf8)."""
    settings = Settings()
    raw = {b"workflow_id": b"w", b"content": b"\xff" * (10 << 20)}
    with pytest.raises(InvalidEntryError) as info:
        parse_entry("1-0", raw, settings)
    assert info.value.reason == "oversized_entry"
    event = parse_entry("1-0", {b"workflow_id": b"w", b"content": b"hi"}, settings)
    assert (event.workflow_id, event.content) == ("w", "hi")


def test_entry_limit_settings_are_validated() -> None:
    settings = load_settings({})
    assert settings.max_entry_bytes >= settings.max_content_bytes + 16 * 1024
    assert settings.dlq_field_bytes == 4096
    # Raising the content limit alone raises the derived entry limit with it.
    big = load_settings({"CTXD_MAX_CONTENT_BYTES": str(1 << 20)})
    assert big.max_entry_bytes > big.max_content_bytes
    with pytest.raises(ConfigError, match="CTXD_MAX_ENTRY_BYTES"):
        load_settings({"CTXD_MAX_CONTENT_BYTES": "200000", "CTXD_MAX_ENTRY_BYTES": "100000"})
    with pytest.raises(ConfigError, match="CTXD_DLQ_FIELD_BYTES"):
        load_settings({"CTXD_DLQ_FIELD_BYTES": "3"})


def test_dlq_copy_cuts_long_fields_with_a_marker() -> None:
    fields = {
        b"workflow_id": b"w",
        b"content": "é".encode() * 5000,  # 10,000 bytes of two-byte characters
        b"blob": b"\xff" * 9000,  # not UTF-8: copied as bytes
        b"n" * 1000: b"v",
    }
    entry = dlq_entry(
        fields, reason="oversized_entry", error="too big", attempts=1, source_id="1-0",
        field_bytes=100, max_fields=32,
    )  # fmt: skip
    content = entry[b"content"].decode()  # still valid UTF-8: cut on a character boundary
    assert content.startswith("é" * 50)
    assert content.endswith("…[cut 9900 bytes]")
    assert entry[b"blob"] == b"\xff" * 100 + "…[cut 8900 bytes]".encode()
    assert entry[b"workflow_id"] == b"w"
    assert (entry[b"reason"], entry[b"source_id"], entry[b"attempts"]) == (
        b"oversized_entry",
        b"1-0",
        b"1",
    )
    marker = entry[DLQ_CUT_FIELD.encode()].decode()
    assert "content" in marker
    assert "blob" in marker
    assert "100 bytes" in marker


def test_dlq_copy_of_ten_thousand_fields_keeps_a_bounded_number() -> None:
    fields = {f"f{i}".encode(): b"v" for i in range(10_000)}
    entry = dlq_entry(
        fields, reason="too_many_fields", error="e", attempts=1, source_id="1-0",
        field_bytes=4096, max_fields=32,
    )  # fmt: skip
    assert len(entry) <= 64 + 5
    marker = entry[DLQ_CUT_FIELD.encode()].decode()
    assert "not copied" in marker
    assert "10000" in marker


def test_dlq_copy_replaces_reserved_fields_and_takes_the_original_source() -> None:
    fields = {"reason": "forged", "ctxd_cut": "forged", "ctxd_source_id": "9-9", "content": "x"}
    entry = dlq_entry(
        fields, reason="poison", error="boom", attempts=5, source_id="1-0", field_bytes=64,
        max_fields=32,
    )  # fmt: skip
    assert entry[b"reason"] == b"poison"
    assert entry[b"source_id"] == b"9-9"
    assert DLQ_CUT_FIELD.encode() not in entry  # nothing was cut
    assert b"ctxd_source_id" not in entry


def test_done_keys_are_per_workflow() -> None:
    settings = replace(Settings(), stream_prefix="p")
    n = partition_of("wf-1", settings.partitions)
    assert done_key(settings, "wf-1", "e/1") == f"p:{{p{n}}}:done:wf-1/e/1"  # the partition's slot
    assert done_key(settings, "wf-1", "e") != done_key(settings, "wf-2", "e")
