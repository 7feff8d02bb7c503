"""Hostile input against a running ``ctxd run``: every malformed entry, whatever its
bytes, ends in exactly one DLQ entry with a reason a person can act on; each normal
event after it gets its output; the process never exits or restarts (issue 11)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import cast

import pytest
from actor_support import RawEntries, TextEntries
from redis import Redis

from actors.config import Settings
from actors.service.partitions import partition_stream, workflow_partition
from actors.service.streams import done_key
from tests_support import ServiceProcess, read_outputs, run_ctxd, unmoved_input

pytestmark = pytest.mark.slow

Fields = dict[str | bytes, str | bytes]

W: Fields = {"workflow_id": "bad-w", "content": "text"}  # a valid base the cases break
BAD_UTF8 = b"\xff\xfe\xc3\x28"


def _with(**changes: str | bytes) -> Fields:
    fields = dict(W)
    fields.update(changes)
    return fields


def _deep(depth: int) -> str:
    return '{"a":' + "[" * depth + "]" * depth + "}"


# (label, fields, reason); labels are unique. The six kinds of issue 11 are marked (*).
CASES: list[tuple[str, Fields, str]] = [
    # workflow_id
    ("no workflow_id", {"content": "x"}, "missing_workflow_id"),
    ("empty workflow_id", _with(workflow_id=""), "missing_workflow_id"),
    ("workflow_id with a space", _with(workflow_id="bad id"), "invalid_workflow_id"),
    ("workflow_id with a slash", _with(workflow_id="a/b"), "invalid_workflow_id"),
    ("workflow_id of 201 chars", _with(workflow_id="w" * 201), "invalid_workflow_id"),
    ("workflow_id of 2,000 bytes", _with(workflow_id="w" * 2000), "oversized_workflow_id"),
    ("workflow_id not ASCII", _with(workflow_id="wörk"), "invalid_workflow_id"),
    ("workflow_id not UTF-8", _with(workflow_id=BAD_UTF8), "invalid_utf8"),
    ("workflow_id with NUL", _with(workflow_id="a\x00b"), "invalid_text"),
    ("workflow_id with glob", _with(workflow_id="a*"), "invalid_workflow_id"),
    # content
    ("no content", {"workflow_id": "bad-w"}, "missing_content"),
    ("empty content", _with(content=""), "missing_content"),
    ("blank content", _with(content=" \n\t "), "missing_content"),
    ("content not UTF-8", _with(content=BAD_UTF8), "invalid_utf8"),
    ("content cut mid-character", _with(content=b"abc\xe2\x82"), "invalid_utf8"),
    ("content with an encoded surrogate", _with(content=b"a\xed\xa0\x80"), "invalid_utf8"),
    ("content with NUL", _with(content="a\x00b"), "invalid_text"),
    ("content over 64 KiB", _with(content="x" * 65537), "oversized_content"),
    # event_id
    ("empty event_id", _with(event_id=""), "invalid_event_id"),
    ("event_id of 201 chars", _with(event_id="e" * 201), "invalid_event_id"),
    ("event_id of 10 KB", _with(event_id="e" * 10_000), "oversized_event_id"),
    ("event_id not UTF-8", _with(event_id=BAD_UTF8), "invalid_utf8"),
    ("event_id with NUL", _with(event_id="e\x00"), "invalid_text"),
    ("event_id with a newline", _with(event_id="e\nf"), "invalid_event_id"),
    # priority
    ("unknown priority", _with(priority="urgent"), "invalid_priority"),
    ("priority in capitals", _with(priority="HIGH"), "invalid_priority"),
    ("empty priority", _with(priority=""), "invalid_priority"),
    ("priority not UTF-8", _with(priority=BAD_UTF8), "invalid_utf8"),
    ("priority of 5 KB", _with(priority="p" * 5000), "oversized_priority"),
    # deadline
    ("deadline in words", _with(deadline="tomorrow"), "invalid_deadline"),
    ("(*) deadline past 9999 in UTC", _with(deadline="9999-12-31T23:59:59-01:00"),
     "invalid_deadline"),
    ("(*) deadline before year 1 in UTC", _with(deadline="0001-01-01T00:00:00+01:00"),
     "invalid_deadline"),
    ("deadline without offset", _with(deadline="2026-01-01T00:00:00"), "invalid_deadline"),
    ("deadline 30 February", _with(deadline="2026-02-30T00:00:00Z"), "invalid_deadline"),
    ("empty deadline", _with(deadline=""), "invalid_deadline"),
    ("deadline of 5 KB", _with(deadline="2" * 5000), "oversized_deadline"),
    # max_cost
    ("negative max_cost", _with(max_cost="-3"), "invalid_max_cost"),
    ("max_cost NaN", _with(max_cost="NaN"), "invalid_max_cost"),
    ("max_cost inf", _with(max_cost="inf"), "invalid_max_cost"),
    ("max_cost 1e999", _with(max_cost="1e999"), "invalid_max_cost"),
    ("max_cost of 4,000 digits", _with(max_cost="9" * 4000), "invalid_max_cost"),
    ("max_cost in words", _with(max_cost="cheap"), "invalid_max_cost"),
    ("empty max_cost", _with(max_cost=""), "invalid_max_cost"),
    # metadata
    ("metadata not JSON", _with(metadata="{not json"), "invalid_metadata"),
    ("metadata an array", _with(metadata="[1]"), "invalid_metadata"),
    ("metadata null", _with(metadata="null"), "invalid_metadata"),
    ("empty metadata", _with(metadata=""), "invalid_metadata"),
    ("(*) metadata 3,000 deep", _with(metadata=_deep(3000)), "invalid_metadata"),
    ("metadata 3,000 objects deep", _with(metadata='{"":' * 3000 + "1" + "}" * 3000),
     "invalid_metadata"),
    ("metadata 33 deep", _with(metadata=_deep(32)), "invalid_metadata"),
    ("(*) metadata int of 5,000 digits", _with(metadata='{"a":' + "7" * 5000 + "}"),
     "invalid_metadata"),
    ("metadata int 2**63", _with(metadata=json.dumps({"a": 2**63})), "invalid_metadata"),
    ("metadata int below -2**63", _with(metadata=json.dumps({"a": -(2**63) - 1})),
     "invalid_metadata"),
    ("metadata NaN", _with(metadata='{"a": NaN}'), "invalid_metadata"),
    ("metadata Infinity", _with(metadata='{"a": [Infinity]}'), "invalid_metadata"),
    ("metadata float overflow", _with(metadata='{"a": -1e400}'), "invalid_metadata"),
    ("metadata lone surrogate", _with(metadata='{"a": "\\ud800"}'), "invalid_metadata"),
    ("metadata over 16 KiB", _with(metadata=json.dumps({"a": "m" * 17000})),
     "oversized_metadata"),
    ("metadata not UTF-8", _with(metadata=b'{"a": "\xff"}'), "invalid_utf8"),
    # control entries
    ("unknown control", _with(control="delete"), "invalid_control"),
    ("empty control", _with(control=""), "invalid_control"),
    ("control not UTF-8", _with(control=BAD_UTF8), "invalid_utf8"),
    ("(*) resume value 3,000 deep", {"workflow_id": "bad-w", "control": "resume",
                                     "value": "[" * 3000 + "]" * 3000}, "invalid_value"),
    ("resume value not JSON", {"workflow_id": "bad-w", "control": "resume", "value": "{"},
     "invalid_value"),
    ("resume value NaN", {"workflow_id": "bad-w", "control": "resume", "value": "NaN"},
     "invalid_value"),
    ("resume value of 20 KB", {"workflow_id": "bad-w", "control": "resume",
                               "value": json.dumps("v" * 20000)}, "oversized_value"),
    ("rollback without checkpoint", {"workflow_id": "bad-w", "control": "rollback"},
     "missing_checkpoint_id"),
    ("rollback to a query", {"workflow_id": "bad-w", "control": "rollback",
                             "checkpoint_id": "*|@x:{y}"}, "invalid_checkpoint_id"),
    # trace context
    ("traceparent not UTF-8", _with(traceparent=BAD_UTF8), "invalid_utf8"),
    ("tracestate of 5 KB", _with(tracestate="t" * 5000), "oversized_tracestate"),
    # the whole entry
    ("33 fields", _with(**{f"x{i}": "v" for i in range(31)}), "too_many_fields"),
    ("(*) 10,000 fields", _with(**{f"x{i}": "v" for i in range(10_000)}), "too_many_fields"),
    ("unknown field of 200 KB", _with(extra="z" * 200_000), "oversized_entry"),
    ("20 unknown fields of 7 KB", _with(**{f"u{i}": "u" * 7000 for i in range(20)}),
     "oversized_entry"),
    ("full content, metadata and a big unknown field",
     _with(content="c" * 65000, metadata=json.dumps({"m": "m" * 16000}), extra="e" * 60000),
     "oversized_entry"),
    ("binary field name", {**W, b"\xff\xfename": "v"}, "invalid_field_name"),
    ("binary field name and value", {**W, b"\x80": b"\x80"}, "invalid_field_name"),
]  # fmt: skip

# Odd but valid: each must get its output, not a DLQ entry.
TOLERATED: list[tuple[str, dict[str, str]]] = [
    ("garbage traceparent", {"traceparent": "zz-not-a-trace"}),
    ("garbage tracestate", {"tracestate": "===,,,"}),
    ("metadata 32 deep", {"metadata": _deep(31)}),
    ("metadata int64 ends", {"metadata": json.dumps({"a": 2**63 - 1, "b": -(2**63)})}),
    ("deadline at the end of 9999 UTC", {"deadline": "9999-12-31T23:59:59Z"}),
    ("small unknown field", {"producer_note": "kept"}),
    ("max_cost 1e308", {"max_cost": "1e308"}),
]


def test_every_malformed_entry_is_dead_lettered_once_and_the_service_keeps_running(
    start_service: Callable[..., ServiceProcess], redis_url: str, prefix: str
) -> None:
    """The table of issue 11, done-means 1(a): at least 60 kinds of malformed entries,
    the six that crashed `ctxd run` among them, each followed by a normal event."""
    assert len(CASES) >= 60
    assert len({label for label, _, _ in CASES}) == len(CASES)
    raw = Redis.from_url(redis_url, socket_timeout=60)
    service = start_service("run")
    service.wait_ready()
    pid = service.proc.pid
    stream = f"{prefix}:in"
    sources: dict[str, str] = {}
    normal: list[str] = []
    for i, (label, fields, _) in enumerate(CASES):
        sources[label] = cast(bytes, raw.xadd(stream, fields)).decode()  # type: ignore[arg-type]
        event_id = f"n{i}"
        raw.xadd(
            stream, {"workflow_id": f"ok-{i % 4}", "content": f"normal {i}", "event_id": event_id}
        )
        normal.append(event_id)
    for i, (_, extra) in enumerate(TOLERATED):
        event_id = f"t{i}"
        odd = {"workflow_id": "ok-t", "content": "odd", "event_id": event_id, **extra}
        raw.xadd(stream, odd)  # type: ignore[arg-type]
        normal.append(event_id)

    outputs = cast(RawEntries, read_outputs(raw, f"{prefix}:out", len(normal), timeout_ms=60_000))
    dead = cast(RawEntries, read_outputs(raw, f"{prefix}:dlq", len(CASES), timeout_ms=20_000))
    out_ids = sorted(f[b"event_id"].decode() for _, f in outputs)
    assert out_ids == sorted(normal), "every normal and odd-but-valid event has one output"
    by_source: dict[str, list[dict[bytes, bytes]]] = {}
    for _, entry in dead:
        by_source.setdefault(entry[b"source_id"].decode(), []).append(entry)
    assert len(dead) == len(CASES)
    for label, _, reason in CASES:
        entries = by_source.get(sources[label], [])
        assert len(entries) == 1, (label, len(entries))
        entry = entries[0]
        assert entry[b"reason"].decode() == reason, (label, entry[b"reason"], entry[b"error"])
        assert len(entry[b"error"]) > 20, label  # a sentence, not a bare tag
        assert entry[b"attempts"] == b"1", label
        assert len(entry) <= 64 + 5, label
    # Same process throughout; no restarts; nothing left pending.
    assert service.proc.poll() is None
    assert service.proc.pid == pid
    assert not any("restart" in line or "Traceback" in line for line in service.lines)
    assert unmoved_input(raw, prefix) == 0
    raw.close()


def test_entries_too_large_or_odd_to_copy_reach_the_dlq_cut_without_failing_their_batch(
    start_service: Callable[..., ServiceProcess],
    redis_url: str,
    prefix: str,
    service_env: dict[str, str],
) -> None:
    """Done-means 1(c) and 2: 10,000 fields (its whole copy overflowed Lua's unpack and
    failed the router's batch of 128), a 10 MB unknown field (refused by the entry size
    limit before parsing) and 10 KB of bytes that are not UTF-8 reach the DLQ cut, with
    a marker; the valid entries read in the same batch get their outputs."""
    raw = Redis.from_url(redis_url, socket_timeout=60)
    stream = f"{prefix}:in"
    # All written before the service starts: the router reads them in one batch.
    raw.xadd(stream, {"workflow_id": "ok-a", "content": "before", "event_id": "v1"})
    wide: Fields = {"workflow_id": "x", "content": "y", **{f"f{i}": "v" for i in range(10_000)}}
    many = cast(bytes, raw.xadd(stream, wide))  # type: ignore[arg-type]
    raw.xadd(stream, {"workflow_id": "ok-b", "content": "between", "event_id": "v2"})
    huge = cast(
        bytes, raw.xadd(stream, {"workflow_id": "x", "content": "y", "blob": b"z" * (10 << 20)})
    )
    binary = cast(bytes, raw.xadd(stream, {"workflow_id": "x", "content": b"\xfe" * 10_000}))
    raw.xadd(stream, {"workflow_id": "ok-a", "content": "after", "event_id": "v3"})
    service = start_service("run", env={"CTXD_DLQ_FIELD_BYTES": "4096"})
    service.wait_ready()

    outputs = cast(RawEntries, read_outputs(raw, f"{prefix}:out", 3, timeout_ms=60_000))
    dead = cast(RawEntries, read_outputs(raw, f"{prefix}:dlq", 3, timeout_ms=20_000))
    assert sorted(f[b"event_id"] for _, f in outputs) == [b"v1", b"v2", b"v3"]
    by_source = {f[b"source_id"]: f for _, f in dead}
    assert set(by_source) == {many, huge, binary}

    entry = by_source[many]
    assert entry[b"reason"] == b"too_many_fields"
    assert len(entry) <= 64 + 5
    assert b"not copied" in entry[b"ctxd_cut"]
    assert b"10002 fields" in entry[b"ctxd_cut"]
    assert entry[b"workflow_id"] == b"x"  # the known fields come first and are kept

    entry = by_source[huge]
    assert entry[b"reason"] == b"oversized_entry"
    assert b"CTXD_MAX_ENTRY_BYTES" in entry[b"error"]
    marker = f"…[cut {(10 << 20) - 4096} bytes]".encode()
    assert entry[b"blob"] == b"z" * 4096 + marker
    assert b"'blob'" in entry[b"ctxd_cut"]

    entry = by_source[binary]
    assert entry[b"reason"] == b"invalid_utf8"
    assert entry[b"content"] == b"\xfe" * 4096 + f"…[cut {10_000 - 4096} bytes]".encode()
    # People can look at such entries; a cut copy is not replayed as if it were whole.
    for args in (["dlq", "list"], ["dlq", "list", "--json"]):
        shown = run_ctxd(service_env, *args)
        assert shown.returncode == 0, shown.stderr
        assert "invalid_utf8" in shown.stdout
        assert "Traceback" not in shown.stderr
    huge_id = next(i for i, f in dead if f[b"source_id"] == huge).decode()
    replay = run_ctxd(service_env, "dlq", "replay", "--id", huge_id)
    assert replay.returncode == 1
    assert "cut" in replay.stdout
    assert raw.xlen(f"{prefix}:dlq") == 3
    assert service.proc.poll() is None
    assert unmoved_input(raw, prefix) == 0
    raw.close()


def test_event_id_is_an_idempotency_key_within_its_workflow(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """Done-means 3: the same event_id in two workflows is two events (two outputs);
    repeated within one workflow it is one (the repeat is acknowledged, no output)."""
    service = start_service("run")
    service.wait_ready()
    stream = f"{prefix}:in"
    redis.xadd(stream, {"workflow_id": "wf-a", "content": "first", "event_id": "same"})
    redis.xadd(stream, {"workflow_id": "wf-b", "content": "other", "event_id": "same"})
    redis.xadd(stream, {"workflow_id": "wf-a", "content": "repeat", "event_id": "same"})
    redis.xadd(stream, {"workflow_id": "wf-a", "content": "next", "event_id": "later"})
    read_outputs(redis, f"{prefix}:out", 3)
    # wf-a's "later" came after its repeat, so the repeat has been handled by now.
    service.wait_for_line(lambda line: "duplicate event suppressed" in line)
    outputs = cast(TextEntries, redis.xrange(f"{prefix}:out"))
    assert sorted((f["workflow_id"], f["event_id"]) for _, f in outputs) == [
        ("wf-a", "later"),
        ("wf-a", "same"),
        ("wf-b", "same"),
    ]
    layout = Settings(stream_prefix=prefix)
    keys = (done_key(layout, "wf-a", "same"), done_key(layout, "wf-b", "same"))
    assert redis.exists(*keys) == 2
    assert not redis.exists(f"{prefix}:done:same"), "the old global layout is not written"
    assert redis.xlen(f"{prefix}:dlq") == 0
    assert service.proc.poll() is None


def test_hostile_entries_appended_straight_to_a_partition_are_contained_by_the_ingress(
    start_service: Callable[..., ServiceProcess], redis_url: str, prefix: str
) -> None:
    """Producers may append to a partition stream directly (no router): the ingress
    applies the same limits and containment; the partition's later events still run."""
    raw = Redis.from_url(redis_url, socket_timeout=60)
    layout = Settings(stream_prefix=prefix)
    part = partition_stream(layout, workflow_partition(layout, "ok-p"))
    cases = [
        ("(*) metadata 3,000 deep", _with(workflow_id="ok-p", metadata=_deep(3000)),
         "invalid_metadata"),
        ("(*) deadline past 9999", _with(workflow_id="ok-p", deadline="9999-12-31T23:59:59-01:00"),
         "invalid_deadline"),
        ("(*) 10,000 fields", _with(workflow_id="ok-p", **{f"x{i}": "v" for i in range(10_000)}),
         "too_many_fields"),
        ("a 1 MB field", _with(workflow_id="ok-p", blob="b" * (1 << 20)), "oversized_entry"),
        ("binary source id", {**_with(workflow_id="ok-p", content=b"\xff"),
                              "ctxd_source_id": b"\xff\xfe"}, "invalid_utf8"),
    ]  # fmt: skip
    ids = []
    for i, (_, fields, _) in enumerate(cases):
        ids.append(raw.xadd(part, fields))  # type: ignore[arg-type]
        raw.xadd(part, {"workflow_id": "ok-p", "content": f"fine {i}", "event_id": f"p{i}"})
    service = start_service("run")
    service.wait_ready()
    outputs = cast(RawEntries, read_outputs(raw, f"{prefix}:out", len(cases), timeout_ms=60_000))
    dead = cast(RawEntries, read_outputs(raw, f"{prefix}:dlq", len(cases), timeout_ms=20_000))
    assert [f[b"event_id"] for _, f in outputs] == [f"p{i}".encode() for i in range(len(cases))]
    assert [f[b"reason"].decode() for _, f in dead] == [reason for _, _, reason in cases]
    assert all(len(f) <= 64 + 5 for _, f in dead)
    assert service.proc.poll() is None
    assert raw.xpending(part, "ctxd")["pending"] == 0
    raw.close()
