"""The compiled contextual workflow end to end (in-memory checkpointer, local dispatch)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from langgraph.checkpoint.memory import InMemorySaver

from graph.analysis import load_analyzer
from graph.checkpointer import strict_serializer
from graph.json_values import as_float, as_int, as_list, as_object, as_str
from graph.routing import RoutingContext, RoutingEngine
from graph.state import JSON, ContextState
from graph.work import DispatchHealth, LocalDispatch, WorkHandlers, WorkKind
from graph.workflow import (
    ContextualGraph,
    build_contextual_workflow,
    resume_workflow,
    run_events,
    thread_config,
)
from tests_support import MARKET, REPO, TECH


class HealthDispatch:
    """LocalDispatch whose health() reports the figures the test sets."""

    def __init__(self, health: DispatchHealth, handlers: WorkHandlers | None = None) -> None:
        self.inner = LocalDispatch(handlers)
        self.figures = health

    async def __call__(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        return await self.inner(kind, payload)

    def health(self) -> DispatchHealth:
        return self.figures


def _graph(dispatch: object | None = None, *, pauses: bool = False) -> ContextualGraph:
    return build_contextual_workflow(
        cast(LocalDispatch, dispatch or LocalDispatch()),
        InMemorySaver(serde=strict_serializer()),
        escalation_pauses=pauses,
    )


async def _values(graph: ContextualGraph, workflow_id: str) -> ContextState:
    return cast(ContextState, dict((await graph.aget_state(thread_config(workflow_id))).values))


async def test_adaptive_processor_raises_quality_over_passes() -> None:
    """Each adaptive pass deepens the analysis: quality never falls and ends higher."""
    graph = _graph()
    qualities: list[float] = []
    visits: list[str] = []
    run_input: ContextState = {"workflow_id": "w", "inbox": [{"event_id": "e1", "content": MARKET}]}
    async for update in graph.astream(
        run_input,
        thread_config("w"),
        stream_mode="updates",
    ):
        for node, changes in cast(dict[str, dict[str, JSON]], update).items():
            visits.append(node)
            if changes and "quality" in changes:
                qualities.append(as_float(changes["quality"]))
    assert visits.count("adaptive_processor") >= 2
    assert len(qualities) >= 3
    assert qualities == sorted(qualities)
    assert qualities[-1] > qualities[0]


async def test_research_workers_fan_out_and_their_findings_land_in_state() -> None:
    """Market/competitive content sends Send()s to those workers; findings are merged."""
    graph = _graph()
    await run_events(graph, "w", [{"event_id": "e1", "content": MARKET}])
    research = (await _values(graph, "w"))["research"]
    assert set(research) == {"market", "competitive"}
    assert all(isinstance(v, str) and v for v in research.values())
    await run_events(graph, "t", [{"event_id": "e1", "content": TECH}])
    assert set((await _values(graph, "t"))["research"]) == {"technical"}


async def test_context_updater_records_a_real_checkpoint_as_rollback_point() -> None:
    """A shift closes the segment with the checkpoint the run started from, also after
    a restart (a new graph over the same saver, no ingress memory)."""
    saver = InMemorySaver(serde=strict_serializer())
    first = build_contextual_workflow(LocalDispatch(), saver)
    run1 = await run_events(first, "w", [{"event_id": "e1", "content": TECH}])
    assert run1.checkpoint_id
    restarted = build_contextual_workflow(LocalDispatch(), saver)
    run2 = await run_events(restarted, "w", [{"event_id": "e2", "content": MARKET}])
    assert "context_updater" in as_list(run2.results["e2"]["route"])
    segment = (await _values(restarted, "w"))["segments"][-1]
    assert segment["checkpoint_id"] == run1.checkpoint_id
    summary = as_str(segment["summary"])
    assert TECH.split(";")[0][:40] in summary or summary
    old = await restarted.aget_state(thread_config("w", run1.checkpoint_id))
    assert old.values["events_processed"] == 1


async def test_decision_engine_uses_event_constraints_and_live_health() -> None:
    """Open breakers and a high error rate from dispatch.health() reach the routing
    context; the decision and its scores are in the state and in the result."""
    health = DispatchHealth(
        breaker_states={"analysis": "open", "decision": "closed"},
        error_rate=0.8,
        performance_score=0.2,
    )
    graph = _graph(HealthDispatch(health))
    deadline = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    event: dict[str, JSON] = {
        "event_id": "e1",
        "content": TECH,
        "priority": "high",
        "deadline": deadline,
        "max_cost": 5.0,
    }
    run = await run_events(graph, "w", [event])
    result = run.results["e1"]
    values = await _values(graph, "w")
    record = values["decisions"][-1]
    assert record["decision"] == result["decision"]
    assert record["scores"] == result["scores"]
    assert set(as_object(record["scores"])) == {
        "high_quality_path",
        "standard_quality_path",
        "retry_with_improvements",
        "circuit_breaker_mode",
        "fallback_processing",
        "escalation_required",
    }
    # The history keeps decision and scores; the current record also keeps its context.
    current = values["decision"]
    assert current is not None
    assert current["scores"] == record["scores"]
    context = as_object(current["context"])
    assert context["error_rate"] == 0.8
    assert context["performance_score"] == 0.2
    assert context["business_priority"] == "high"
    assert context["execution_deadline"] == deadline
    assert context["cost_constraints"] == {"max_cost": 5.0}
    # The same context through the engine gives the same decision and scores.
    expected = RoutingEngine().decide(
        RoutingContext(
            quality_score=as_float(context["quality_score"]),
            performance_score=0.2,
            error_rate=0.8,
            resource_utilization=as_float(context["resource_utilization"]),
            business_priority="high",
            execution_deadline=datetime.fromisoformat(deadline),
            cost_constraints={"max_cost": 5.0},
        ),
        iteration_count=int(values["passes"]),
        now=datetime.now(UTC),
    )
    assert result["decision"] == expected.decision.value


async def test_failing_workers_drive_the_decision_to_circuit_breaker_mode() -> None:
    """No deadline or budget: a high error rate and slow workers → circuit_breaker_mode."""
    health = DispatchHealth(
        breaker_states={"analysis": "open"}, error_rate=0.9, performance_score=0.1
    )
    graph = _graph(HealthDispatch(health))
    run = await run_events(graph, "w", [{"event_id": "e1", "content": TECH}])
    assert run.results["e1"]["decision"] == "circuit_breaker_mode"
    assert run.results["e1"]["status"] == "fallback"
    assert "adaptive_processor" not in as_list(run.results["e1"]["route"])  # breaker open


async def test_escalation_pauses_and_resume_continues_with_the_answer() -> None:
    """escalation_required interrupts (status=escalated); resume finishes the event."""
    graph = _graph(pauses=True)
    run = await run_events(
        graph, "w", [{"event_id": "e1", "content": "ok", "priority": "critical"}]
    )
    assert run.interrupted
    assert run.paused_event_id == "e1"
    assert run.results["e1"]["status"] == "escalated"
    assert run.results["e1"]["decision"] == "escalation_required"
    resumed = await resume_workflow(
        graph, "w", {"decision": "standard_quality_path"}, control_event_id="c1"
    )
    assert not resumed.interrupted
    assert resumed.results["e1"]["decision"] == "standard_quality_path"
    assert resumed.results["e1"]["status"] == "ok"
    record = (await _values(graph, "w"))["decisions"][-1]
    assert record["resolution"] == {
        "value": {"decision": "standard_quality_path"},
        "control_event_id": "c1",
    }


async def test_escalation_without_pauses_does_not_interrupt() -> None:
    graph = _graph(pauses=False)
    run = await run_events(
        graph, "w", [{"event_id": "e1", "content": "ok", "priority": "critical"}]
    )
    assert not run.interrupted
    assert run.results["e1"]["status"] == "escalated"


async def test_example_plugin_runs_in_the_workflow() -> None:
    """CTXD_ANALYZER=examples/keyword_analyzer.py:analyze: its analysis and field land."""
    analyzer = load_analyzer(str(Path(REPO) / "examples" / "keyword_analyzer.py") + ":analyze")
    graph = _graph(LocalDispatch(WorkHandlers(analyzer)))
    text = "Outage after the deploy: errors and latency rose, rollback started. Incident open."
    await run_events(graph, "w", [{"event_id": "e1", "content": text}])
    values = await _values(graph, "w")
    assert values["analysis"].startswith("Analysis: ")
    assert "an incident is under way" in values["analysis"]
    assert as_int(values["analysis_fields"]["keywords"]) >= 5


async def test_a_run_larger_than_the_outbox_bound_returns_every_result() -> None:
    """CTXD_BATCH_SIZE may exceed the outbox's usual bound (128 results): a run of 200
    events must not evict its own results before the ingress reads them."""
    graph = _graph()
    events: list[Mapping[str, JSON]] = [
        {"event_id": f"big-{i}", "content": f"checkout latency rose after deploy {i}"}
        for i in range(200)
    ]
    run = await run_events(graph, "wf-big", events)
    assert sorted(run.results) == sorted(f"big-{i}" for i in range(200))
    again = await run_events(graph, "wf-big", [{"event_id": "big-200", "content": TECH}])
    assert list(again.results) == ["big-200"]
    outbox = (await _values(graph, "wf-big"))["outbox"]
    assert 128 <= len(outbox) <= 201
