"""The schema check of stored workflow state (graph/state.py ``state_problems``): it
passes every state the graph writes and names the field, the expected and the actual
type of anything else, bounded."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from graph.checkpointer import strict_serializer
from graph.state import JSON, state_problems
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow, run_events, thread_config
from tests_support import MARKET, TECH


async def _real_state() -> dict[str, object]:
    """A state as the graph writes it after a few events (segments, decisions, outbox)."""
    graph = build_contextual_workflow(LocalDispatch(), InMemorySaver(serde=strict_serializer()))
    await run_events(graph, "wf", [{"event_id": "e1", "content": TECH}])
    await run_events(
        graph,
        "wf",
        [{"event_id": "e2", "content": MARKET}, {"event_id": "e3", "content": "short one"}],
    )
    values = (await graph.aget_state(thread_config("wf"))).values
    assert values["segments"]
    assert values["decisions"]
    assert values["outbox"]
    return copy.deepcopy(dict(values))


async def test_states_the_graph_writes_fit_the_schema() -> None:
    assert state_problems(await _real_state()) == []
    assert state_problems({}) == []
    # a run's input before any event was integrated (durability sync writes it)
    assert state_problems({"workflow_id": "wf", "inbox": [], "run_size": 0, "event": None}) == []


async def test_a_paused_state_with_a_large_validated_event_fits() -> None:
    """Mid-run and paused states hold events as validated on input: large content, deep
    metadata and an infinite max_cost are not the schema's business."""
    graph = build_contextual_workflow(
        LocalDispatch(), InMemorySaver(serde=strict_serializer()), escalation_pauses=True
    )
    deep: JSON = "leaf"
    for _ in range(150):
        deep = {"d": deep}
    event: dict[str, JSON] = {
        "event_id": "e1",
        "content": "ok " * 700_000,
        "priority": "critical",
        "max_cost": float("inf"),
        "metadata": {"deep": deep},
    }
    run = await run_events(graph, "wf", [event, {"event_id": "e2", "content": "next"}])
    assert run.interrupted
    values = (await graph.aget_state(thread_config("wf"))).values
    assert values["event"]["event_id"] == "e1"
    assert state_problems(values) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda v: v.update(window=5), "window: expected list, got int 5"),
        (lambda v: v.pop("window"), "window: missing (required)"),
        (lambda v: v.pop("events_processed"), "events_processed: missing (required)"),
        (lambda v: v.update(events_processed="3"), "events_processed: expected int, got str"),
        (lambda v: v.update(events_processed=True), "events_processed: expected int, got bool"),
        (lambda v: v.update(events_processed=-1), "events_processed: expected an int >= 0"),
        (lambda v: v["segments"][0].update(summary=7), "segments[0].summary: expected str"),
        (lambda v: v["decisions"][-1]["scores"].update(x="high"), "decisions[-1]"),
        (lambda v: v["window"].append(b"raw"), "expected str, got bytes"),
        (lambda v: v.update(quality=float("nan")), "quality: expected a number in"),
        (lambda v: v.update(quality=7.5), "quality: expected a number in [0.0, 1.0]"),
        (lambda v: v.update(outbox={"e1": 5}), "outbox.e1: expected str or dict, got int 5"),
        (lambda v: v.update(event={"content": "x"}), "event.event_id: missing (required)"),
        (lambda v: v.update(health={"deep": {"x": {1, 2}}}), "health.deep.x: expected a JSON"),
        (lambda v: v.update(window=["x"] * 65), "window: 65 items, at most 64 allowed"),
        (lambda v: v.update(monitored="yes"), "monitored: expected bool, got str"),
        (lambda v: v.update(workflow_id=None), "workflow_id: expected str, got null"),
    ],
)
async def test_a_state_that_does_not_fit_is_named_field_by_field(
    change: object, expected: str
) -> None:
    values = await _real_state()
    change(values)  # type: ignore[operator]
    problems = state_problems(values)
    if expected.startswith("decisions[-1]"):
        last = len(values["decisions"]) - 1  # type: ignore[arg-type]
        expected = f"decisions[{last}].scores.x: expected number, got str"
    assert any(expected in p for p in problems), problems


def test_problems_are_bounded_in_number_and_length() -> None:
    values: Mapping[str, object] = {
        "workflow_id": "wf",
        "window": list(range(60)),
        "events_processed": 1,
        "integrity_hash": "h",
        "analysis": ["x" * 10_000],
    }
    problems = state_problems(values, limit=5)
    assert len(problems) == 5
    assert all(len(p) < 200 for p in problems)
    deep: object = "leaf"
    for _ in range(500):
        deep = {"d": deep}
    assert any("nested deeper than" in p for p in state_problems({"health": deep}))


async def test_the_check_costs_little_on_a_full_state() -> None:
    """The check runs before every batch: a real state with a full outbox takes well
    under a millisecond (measured: about 0.1 ms here; bound kept loose for a loaded box)."""
    values = await _real_state()
    outbox = values["outbox"]
    assert isinstance(outbox, dict)
    sample = next(iter(outbox.values()))
    values["outbox"] = {f"e{i}": sample for i in range(256)}
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        assert state_problems(values) == []
    per_check = (time.perf_counter() - started) / rounds
    assert per_check < 0.005, per_check
