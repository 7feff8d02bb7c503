"""Bad input against a running ``ctxd run``: each case goes to the DLQ at once with a
reason a person can act on, nothing is checkpointed for it, and the service keeps going
(same process, no restarts). A repeated event_id is suppressed as a duplicate."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
from actor_support import RawEntries
from redis import Redis

from tests_support import ServiceProcess, read_outputs, unmoved_input

pytestmark = pytest.mark.slow

# (label, fields, reason, words the message must contain)
CASES: list[tuple[str, dict[str, str | bytes], str, str]] = [
    ("no workflow_id", {"content": "hello"}, "missing_workflow_id", "no workflow_id"),
    ("bad workflow_id", {"workflow_id": "bad id!", "content": "x"}, "invalid_workflow_id",
     "letters, digits"),
    ("no content", {"workflow_id": "bad-nocontent"}, "missing_content", "no content"),
    ("non-UTF-8 content", {"workflow_id": "bad-utf8", "content": b"\xff\xfe\xfa"},
     "invalid_utf8", "UTF-8"),
    ("oversized content", {"workflow_id": "bad-big", "content": "x" * 2000},
     "oversized_content", "CTXD_MAX_CONTENT_BYTES"),
    ("too many fields", {"workflow_id": "bad-fields", "content": "x",
                         **{f"f{i}": "v" for i in range(12)}}, "too_many_fields", "limit"),
    ("bad priority", {"workflow_id": "bad-prio", "content": "x", "priority": "urgent"},
     "invalid_priority", "critical"),
    ("bad deadline", {"workflow_id": "bad-deadline", "content": "x", "deadline": "tomorrow"},
     "invalid_deadline", "deadline"),
    ("bad max_cost", {"workflow_id": "bad-cost", "content": "x", "max_cost": "-3"},
     "invalid_max_cost", ">= 0"),
    ("bad metadata", {"workflow_id": "bad-meta", "content": "x", "metadata": "{not json"},
     "invalid_metadata", "JSON"),
    ("metadata not an object", {"workflow_id": "bad-meta2", "content": "x", "metadata": "[1]"},
     "invalid_metadata", "object"),
]  # fmt: skip


def test_bad_entries_go_to_the_dlq_and_the_service_keeps_running(
    start_service: Callable[..., ServiceProcess], redis: Redis, redis_url: str, prefix: str
) -> None:
    """Every bad entry: one DLQ entry with its reason; good events around them are fine."""
    service = start_service("run", env={"CTXD_MAX_CONTENT_BYTES": "1024", "CTXD_MAX_FIELDS": "10"})
    service.wait_ready()
    pid = service.proc.pid
    stream = f"{prefix}:in"
    redis.xadd(stream, {"workflow_id": "good-1", "content": "first", "event_id": "g1"})
    sources = {
        label: cast(str, redis.xadd(stream, fields))  # type: ignore[arg-type]
        for label, fields, _, _ in CASES
    }
    redis.xadd(stream, {"workflow_id": "good-1", "content": "again", "event_id": "g1"})
    redis.xadd(stream, {"workflow_id": "good-2", "content": "second", "event_id": "g2"})

    outputs = read_outputs(redis, f"{prefix}:out", 2, timeout_ms=4000)
    raw = Redis.from_url(redis_url, socket_timeout=60)
    read_outputs(raw, f"{prefix}:dlq", len(CASES))
    dead = [
        (eid, {k.decode(): v.decode(errors="replace") for k, v in fields.items()})
        for eid, fields in cast(RawEntries, raw.xrange(f"{prefix}:dlq"))
    ]
    raw.close()
    by_source = {fields["source_id"]: fields for _, fields in dead}
    assert len(dead) == len(CASES)
    for label, _, reason, words in CASES:
        entry = by_source[sources[label]]
        assert entry["reason"] == reason, label
        assert words in entry["error"], (label, entry["error"])
        assert entry["attempts"] == "1", label
    # The repeated event_id was suppressed: one output for g1, none in the DLQ.
    assert sorted(f["event_id"] for _, f in outputs) == ["g1", "g2"]
    assert not any(f.get("event_id") == "g1" for _, f in dead)
    # Same process, still running, no restarts, nothing pending.
    assert service.proc.poll() is None
    assert service.proc.pid == pid
    assert not any("restart" in line for line in service.lines)
    assert unmoved_input(redis, prefix) == 0  # every entry routed (ctxd:in has no group)
    # No checkpoint for any invalid entry's workflow.
    for _, fields, _, _ in CASES:
        wf = fields.get("workflow_id")
        if isinstance(wf, str) and wf.startswith("bad-"):
            assert not list(redis.scan_iter(f"*{wf}*", count=1000)), wf
    assert list(redis.scan_iter("*good-2*", count=1000)), "control: good events checkpoint"


def test_poison_event_goes_to_the_dlq_after_the_attempt_limit(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """An event whose run always fails is retried in place (its workflow waits, others
    do not), then dead-lettered as poison after CTXD_MAX_DELIVERIES attempts; the next
    event of its workflow runs after it, and the service keeps running."""
    service = start_service(
        "run",
        env={
            "CTXD_ANALYZER": "tests/actors/plugins/slow_analyzer.py:hang_on_boom",
            "CTXD_MAX_DELIVERIES": "3",
            "CTXD_EVENT_TIMEOUT": "1",
            # In-process work: the run itself hangs (with actors, the ask would time out
            # and the graph would turn it into a fallback decision, not a failed run).
            "CTXD_DISPATCH": "local",
        },
    )
    service.wait_ready()
    stream = f"{prefix}:in"
    wf = f"p-{prefix}"
    redis.xadd(stream, {"workflow_id": wf, "event_id": "p1", "content": "fine first"})
    boom = redis.xadd(stream, {"workflow_id": wf, "event_id": "p2", "content": "boom here"})
    redis.xadd(stream, {"workflow_id": wf, "event_id": "p3", "content": "fine after"})
    redis.xadd(stream, {"workflow_id": f"q-{prefix}", "event_id": "q1", "content": "other"})
    service.wait_for_line(lambda line: "poison" in line)
    dead = read_outputs(redis, f"{prefix}:dlq", 1)
    outputs = read_outputs(redis, f"{prefix}:out", 3)
    assert [(f["event_id"], f["reason"], f["attempts"], f["source_id"]) for _, f in dead] == [
        ("p2", "poison", "3", boom)
    ]
    order = [f["event_id"] for _, f in outputs]
    assert [e for e in order if e.startswith("p")] == ["p1", "p3"]
    assert order.index("q1") < order.index("p3"), "another workflow waited for the poison"
    assert service.proc.poll() is None
    assert unmoved_input(redis, prefix) == 0  # every entry routed (ctxd:in has no group)
