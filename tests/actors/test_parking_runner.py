"""The workflow runner in process: control entries, redelivery, replay after a crash.

Real Redis (streams, done keys, the replay script), in-memory checkpointer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import cast

import pytest
from actor_support import RawEntries
from langgraph.checkpoint.memory import InMemorySaver
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.parking import WorkflowRunner, parked_stream, resume_fields, rollback_fields
from actors.service.streams import done_key, ensure_group
from actors.service.validation import Event, parse_event
from graph.checkpointer import strict_serializer
from graph.errors import InvalidEntryError
from graph.work import LocalDispatch
from graph.workflow import ContextualGraph, build_contextual_workflow, paused_event_id

TECH = "The API latency of the database cluster rose after the deploy; pods restart."


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def paused_settings(settings: Settings) -> Settings:
    return replace(settings, escalation_pauses=True)


def _graph() -> ContextualGraph:
    return build_contextual_workflow(
        LocalDispatch(), InMemorySaver(serde=strict_serializer()), escalation_pauses=True
    )


async def _entry(
    aredis: Redis, settings: Settings, fields: dict[str, str]
) -> tuple[Event, dict[str, str]]:
    """XADD to ctxd:in and read it through the group, as the ingress does."""
    await ensure_group(aredis, settings.input_stream, settings.group)
    added = await aredis.xadd(settings.input_stream, fields)  # type: ignore[arg-type]
    entry_id = cast(bytes, added).decode()  # a bytes client
    await aredis.xreadgroup(settings.group, "test", {settings.input_stream: ">"}, count=100)
    return parse_event(entry_id, fields), fields


def _event(workflow_id: str, event_id: str, content: str, **extra: str) -> dict[str, str]:
    return {"workflow_id": workflow_id, "event_id": event_id, "content": content, **extra}


def test_control_fields_are_validated() -> None:
    event = parse_event("1-0", resume_fields("w", {"decision": "fallback_processing"}))
    assert event.control == "resume"
    assert event.value == {"decision": "fallback_processing"}
    event = parse_event("1-1", rollback_fields("w", "1f0abc"))
    assert (event.control, event.checkpoint_id) == ("rollback", "1f0abc")
    with pytest.raises(InvalidEntryError, match="not one of resume, rollback"):
        parse_event("1-2", {"workflow_id": "w", "control": "delete"})
    with pytest.raises(InvalidEntryError, match="needs checkpoint_id"):
        parse_event("1-3", {"workflow_id": "w", "control": "rollback"})
    with pytest.raises(InvalidEntryError, match="not valid JSON"):
        parse_event("1-4", {"workflow_id": "w", "control": "resume", "value": "{"})


async def test_resume_of_a_workflow_that_is_not_paused_is_an_error_output(
    aredis: Redis, paused_settings: Settings, prefix: str
) -> None:
    runner = WorkflowRunner(aredis, paused_settings, _graph())
    resume = await _entry(aredis, paused_settings, resume_fields(f"{prefix}-w", None))
    run = await runner.run(f"{prefix}-w", [resume])
    assert run.results[resume[0].event_id]["status"] == "error"


async def test_a_redelivered_resume_gives_the_same_answer_once(
    aredis: Redis, paused_settings: Settings, prefix: str
) -> None:
    """Killed after the resume was durable but before its output: the redelivered
    resume reports the resumed decision again and resumes nothing else."""
    graph = _graph()
    workflow_id = f"{prefix}-w"
    runner = WorkflowRunner(aredis, paused_settings, graph)
    first = await _entry(
        aredis, paused_settings, _event(workflow_id, "e1", "ok", priority="critical")
    )
    run = await runner.run(workflow_id, [first])
    assert run.results["e1"]["status"] == "escalated"
    assert await paused_event_id(graph, workflow_id) == "e1"
    resume = await _entry(aredis, paused_settings, resume_fields(workflow_id, "yes"))
    done = await runner.run(workflow_id, [resume])
    again = await runner.run(workflow_id, [resume])
    rid = resume[0].event_id
    assert done.results[rid]["status"] == again.results[rid]["status"] == "ok"
    assert done.results[rid]["decision"] == again.results[rid]["decision"]
    values = (await graph.aget_state({"configurable": {"thread_id": workflow_id}})).values
    resolved = [d for d in values["decisions"] if "resolution" in d]
    assert len(resolved) == 1


async def test_parked_events_left_by_a_crash_are_replayed_before_newer_ones(
    aredis: Redis, paused_settings: Settings, prefix: str
) -> None:
    """Parked entries of a workflow that is no longer paused (a replay cut short by
    SIGKILL) run first, oldest first, each committed with its output."""
    workflow_id = f"{prefix}-w"
    stream = parked_stream(paused_settings, workflow_id)
    for event_id in ("p1", "p2"):
        parked = {**_event(workflow_id, event_id, TECH), "source_id": f"0-{event_id[1]}"}
        await aredis.xadd(stream, parked)  # type: ignore[arg-type]
    runner = WorkflowRunner(aredis, paused_settings, _graph())
    newer = await _entry(aredis, paused_settings, _event(workflow_id, "n1", TECH))
    run = await runner.run(workflow_id, [newer])
    outputs = cast(RawEntries, await aredis.xrange(paused_settings.output_stream))
    assert [f[b"event_id"] for _, f in outputs] == [b"p1", b"p2"]
    assert await aredis.xlen(stream) == 0
    assert "n1" in run.results  # the ingress commits it, after the replayed ones
    assert await aredis.get(done_key(paused_settings, workflow_id, "p1"))


async def test_a_parked_entry_that_no_longer_validates_is_dead_lettered_not_retried(
    aredis: Redis, paused_settings: Settings, prefix: str
) -> None:
    """Limits lowered since an event was parked: its replay sends it to the DLQ (and off
    the parked stream) instead of failing every later batch of its workflow."""
    workflow_id = f"{prefix}-w"
    stream = parked_stream(paused_settings, workflow_id)
    big = _event(workflow_id, "p1", "x" * 3000)
    await aredis.xadd(stream, {**big, "source_id": "0-1"})  # type: ignore[dict-item]
    second = {**_event(workflow_id, "p2", TECH), "source_id": "0-2"}
    await aredis.xadd(stream, second)  # type: ignore[arg-type]
    strict = replace(paused_settings, max_content_bytes=1000)
    runner = WorkflowRunner(aredis, strict, _graph())
    newer = await _entry(aredis, strict, _event(workflow_id, "n1", TECH))
    run = await runner.run(workflow_id, [newer])
    outputs = cast(RawEntries, await aredis.xrange(strict.output_stream))
    assert [f[b"event_id"] for _, f in outputs] == [b"p2"]
    dead = cast(RawEntries, await aredis.xrange(strict.dlq_stream))
    assert [(f[b"reason"], f[b"source_id"], f[b"event_id"]) for _, f in dead] == [
        (b"oversized_content", b"0-1", b"p1")
    ]
    assert await aredis.xlen(stream) == 0
    assert "n1" in run.results


async def test_events_behind_the_pause_in_one_batch_are_parked_and_replayed_in_order(
    aredis: Redis, paused_settings: Settings, prefix: str
) -> None:
    """One batch [escalating, e2, e3]: e1 escalates, e2 and e3 are parked; the resume
    replays them (their outputs first), then the resume's own result."""
    graph = _graph()
    workflow_id = f"{prefix}-w"
    runner = WorkflowRunner(aredis, paused_settings, graph)
    batch = [
        await _entry(aredis, paused_settings, _event(workflow_id, "e1", "ok", priority="critical")),
        await _entry(aredis, paused_settings, _event(workflow_id, "e2", TECH)),
        await _entry(aredis, paused_settings, _event(workflow_id, "e3", TECH + " More.")),
    ]
    run = await runner.run(workflow_id, batch)
    assert run.results["e1"]["status"] == "escalated"
    assert set(run.results) == {"e1"}
    assert run.handled == {batch[1][0].source_id, batch[2][0].source_id}
    stream = parked_stream(paused_settings, workflow_id)
    assert [f[b"event_id"] for _, f in cast(RawEntries, await aredis.xrange(stream))] == [
        b"e2",
        b"e3",
    ]
    pending = await aredis.xpending(paused_settings.input_stream, paused_settings.group)
    assert pending["pending"] == 3 - 2  # e1 waits for the ingress's commit

    resume = await _entry(aredis, paused_settings, resume_fields(workflow_id, None))
    done = await runner.run(workflow_id, [resume])
    assert done.results[resume[0].event_id]["status"] == "ok"
    outputs = cast(RawEntries, await aredis.xrange(paused_settings.output_stream))
    assert [f[b"event_id"] for _, f in outputs] == [b"e2", b"e3"]
    assert await aredis.xlen(stream) == 0
    values = (await graph.aget_state({"configurable": {"thread_id": workflow_id}})).values
    assert values["events_processed"] == 3  # e2 and e3 ran once, in the resume run


async def test_a_replayed_parked_event_keeps_its_own_trace(
    aredis: Redis, paused_settings: Settings, prefix: str
) -> None:
    """The output of an event parked behind a pause carries the trace id of the event's
    own process span, though it is written later, by the resume's run."""
    graph = _graph()
    workflow_id = f"{prefix}-t"
    runner = WorkflowRunner(aredis, paused_settings, graph)
    batch = [
        await _entry(aredis, paused_settings, _event(workflow_id, "t1", "ok", priority="critical")),
        await _entry(aredis, paused_settings, _event(workflow_id, "t2", TECH)),
    ]
    parked = batch[1][0].source_id
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    await runner.run(
        workflow_id,
        batch,
        trace_ids={parked: trace_id},
        carriers={parked: {"traceparent": traceparent}},
    )
    assert await aredis.xlen(parked_stream(paused_settings, workflow_id)) == 1

    resume = await _entry(aredis, paused_settings, resume_fields(workflow_id, None))
    await runner.run(workflow_id, [resume])
    outputs = cast(RawEntries, await aredis.xrange(paused_settings.output_stream))
    assert [(f[b"event_id"], f[b"trace_id"]) for _, f in outputs] == [(b"t2", trace_id.encode())]
