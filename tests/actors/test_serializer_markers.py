"""Producer JSON shaped like the checkpoint serializer's own markers.

The Redis saver stores ``metadata`` and a resume's ``value`` as JSON and, when it loads
a checkpoint, turns objects shaped like its markers (``{"__send__": true, …}``,
LangChain ``{"lc": 1, "type": "constructor", …}`` envelopes, ``{"__bytes__": …}``…)
into Python objects, or into None. A resume value of that shape was accepted, stored,
and read back as a ``Send``/``set``/message: the next event found a state that does not
fit the schema and the workflow lost its context (found by the adversary review of
issue 11). Such JSON is refused at the input with a reason instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import cast

import pytest
from actor_support import RawEntries
from redis import Redis

from actors.service.validation import parse_event
from graph.errors import InvalidEntryError
from tests_support import ServiceProcess, read_outputs

MARKERS: dict[str, object] = {
    "send": {"__send__": True, "node": "x", "arg": 1},
    "interrupt": {"__interrupt__": True, "value": 1},
    "delta snapshot": {"__delta_snapshot__": True, "value": 1},
    "bytes": {"__bytes__": "aGk="},
    "lc true": {"lc": True, "type": "secret", "id": ["HOME"]},
    "lc 1.0": {"lc": 1.0, "type": "constructor", "id": ["builtins", "set"], "args": [[1]]},
    "set envelope": {"lc": 2, "type": "constructor", "id": ["builtins", "set"], "args": [[1]]},
    "message envelope": {
        "lc": 1,
        "type": "constructor",
        "id": ["langchain_core", "messages", "HumanMessage"],
        "kwargs": {"content": "hi"},
    },
    "secret envelope": {"lc": 1, "type": "secret", "id": ["HOME"]},
    "not implemented envelope": {"lc": 1, "type": "not_implemented", "id": ["x"]},
}
# Near misses a producer may well send: plain data, kept.
PLAIN: list[object] = [
    {"lc": "yes", "type": "constructor"},
    {"type": "constructor", "id": ["a", "b"]},
    {"__send__": "maybe"},
    {"bytes": "aGk="},
    {"note": "__send__"},
]


@pytest.mark.parametrize("name", list(MARKERS))
def test_marker_shaped_metadata_and_resume_values_are_refused(name: str) -> None:
    nested = {"outer": [{"inner": MARKERS[name]}]}
    with pytest.raises(InvalidEntryError) as caught:
        parse_event("1-0", {"workflow_id": "w", "content": "c", "metadata": json.dumps(nested)})
    assert caught.value.reason == "invalid_metadata"
    assert "outer[0].inner" in str(caught.value)
    with pytest.raises(InvalidEntryError) as caught:
        parse_event(
            "1-0", {"workflow_id": "w", "control": "resume", "value": json.dumps(MARKERS[name])}
        )
    assert caught.value.reason == "invalid_value"


@pytest.mark.parametrize("value", PLAIN)
def test_plain_json_near_the_markers_is_kept(value: object) -> None:
    event = parse_event(
        "1-0", {"workflow_id": "w", "content": "c", "metadata": json.dumps({"m": value})}
    )
    assert event.metadata == {"m": value}
    resume = parse_event(
        "1-0", {"workflow_id": "w", "control": "resume", "value": json.dumps(value)}
    )
    assert resume.value == value


@pytest.mark.slow
def test_a_running_service_dead_letters_marker_shaped_json_and_keeps_the_workflow(
    start_service: Callable[..., ServiceProcess], redis_url: str, prefix: str
) -> None:
    raw = Redis.from_url(redis_url, socket_timeout=60)
    service = start_service("run", env={"CTXD_ESCALATION_PAUSES": "true"})
    service.wait_ready()
    stream = f"{prefix}:in"
    sources = []
    for i, marker in enumerate(MARKERS.values()):
        sources.append(
            raw.xadd(
                stream,
                {"workflow_id": f"m{i}", "content": "x", "metadata": json.dumps({"k": marker})},
            )
        )
        sources.append(
            raw.xadd(
                stream, {"workflow_id": f"m{i}", "control": "resume", "value": json.dumps(marker)}
            )
        )
        raw.xadd(stream, {"workflow_id": f"m{i}", "content": "fine", "event_id": f"ok{i}"})
    outputs = cast(
        RawEntries, read_outputs(raw, f"{prefix}:out", len(MARKERS), timeout_ms=60_000)
    )  # a bytes client
    dead = cast(
        RawEntries, read_outputs(raw, f"{prefix}:dlq", len(sources), timeout_ms=20_000)
    )  # a bytes client
    assert sorted(f[b"event_id"] for _, f in outputs) == sorted(
        f"ok{i}".encode() for i in range(len(MARKERS))
    )
    assert all(f[b"error"] == b"" for _, f in outputs)
    assert sorted(f[b"source_id"] for _, f in dead) == sorted(sources)
    assert {f[b"reason"] for _, f in dead} == {b"invalid_metadata", b"invalid_value"}
    assert all(b"checkpoint" in f[b"error"] for _, f in dead)
    assert service.proc.poll() is None
    raw.close()
