"""Node, event and routing spans of the contextual workflow, in process.

A batch of several events of one workflow runs in one graph run; each event must still
be its own trace: ``process`` → ``invoke_workflow contextual`` → node spans → ``route``.
"""

from __future__ import annotations

from collections import defaultdict

from langgraph.checkpoint.memory import InMemorySaver
from opentelemetry.sdk.metrics.export import NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from graph.checkpointer import strict_serializer
from graph.state import JSON
from graph.tracing import GraphTelemetry, event_trace_fields
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow, run_events
from telemetry.testing import capture_metrics, capture_spans

_NODES = {
    "context_analyzer",
    "adaptive_processor",
    "context_updater",
    "continuous_monitor",
    "decision_engine",
    "technical_research_worker",
    "market_research_worker",
    "competitive_research_worker",
}


def _event(event_id: str, content: str, **extra: str) -> dict[str, JSON]:
    return {
        "source_id": f"{event_id}-0",
        "event_id": event_id,
        "content": content,
        "priority": "high",
        "deadline": None,
        "max_cost": None,
        "metadata": {},
        **extra,
    }


def _saver() -> InMemorySaver:
    return InMemorySaver(serde=strict_serializer())


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_each_event_of_a_batch_is_its_own_trace_with_nodes_and_routes() -> None:
    with capture_spans() as cap, capture_metrics() as met:
        graph = build_contextual_workflow(
            LocalDispatch(), _saver(), telemetry=GraphTelemetry(cap.tracer, met.instruments)
        )
        events: list[dict[str, JSON]] = []
        process_spans = []
        texts = [
            "Checkout latency rose after the deploy; the API and database look slow.",
            "Competitor pricing changed; market share and customers may shift.",
            "Quarterly revenue forecast and the vendor rivalry in the region.",
        ]
        for i, text in enumerate(texts):
            span = cap.tracer.start_span(f"process {i}", kind=SpanKind.CONSUMER)
            process_spans.append(span)
            events.append(_event(f"ev-{i}", text, **event_trace_fields(span)))
        result = await run_events(graph, "wf-trace", events)
        for span in process_spans:
            span.end()
        assert set(result.results) == {"ev-0", "ev-1", "ev-2"}

        spans = cap.spans()
        by_id = {s.context.span_id: s for s in spans}
        by_trace: dict[int, list[ReadableSpan]] = defaultdict(list)
        for s in spans:
            by_trace[s.context.trace_id].append(s)
        assert len(by_trace) == 3  # one trace per event, no strays

        for i, process in enumerate(process_spans):
            trace_spans = by_trace[process.get_span_context().trace_id]
            invokes = [s for s in trace_spans if s.name == "invoke_workflow contextual"]
            assert len(invokes) == 1
            invoke = invokes[0]
            assert _parent(invoke) == process.get_span_context().span_id
            assert invoke.attributes is not None
            assert invoke.attributes["gen_ai.conversation.id"] == "wf-trace"
            assert invoke.attributes["ctxd.event_id"] == f"ev-{i}"
            nodes = [s for s in trace_spans if s.name in _NODES]
            assert {s.name for s in nodes} >= {"context_analyzer", "decision_engine"}
            assert all(_parent(s) == invoke.context.span_id for s in nodes)
            routes = [s for s in trace_spans if s.name.startswith("route ")]
            assert routes
            for route in routes:
                parent = by_id[_parent(route) or 0]
                policy = route.attributes["ctxd.routing.policy"] if route.attributes else None
                expected = "context_analyzer" if policy == "context_analyzer" else "decision_engine"
                assert parent.name == expected, (route.name, parent.name)
            decisions = [s for s in routes if s.name == "route enterprise_routing"]
            assert len(decisions) >= 1
            attributes = decisions[-1].attributes or {}
            assert attributes["ctxd.routing.result.target"] == result.results[f"ev-{i}"]["decision"]
            scored = {k for k in attributes if k.startswith("ctxd.routing.score.")}
            assert len(scored) == 6  # every candidate's score
            assert "ctxd.routing.factor.quality_score" in attributes
            assert "ctxd.routing.viable" in attributes
            assert attributes["ctxd.routing.result.reason"]
            # the analyzer's last route of each event ends it
            analyzer_routes = [s for s in routes if s.name == "route context_analyzer"]
            final = max(analyzer_routes, key=lambda s: s.start_time or 0)
            assert (final.attributes or {})["ctxd.routing.result.target"] == ("processing_complete")

        counts = met.points("ctxd.routing.decisions")
        decisions_counted = sum(int(p.value) for p in counts if isinstance(p, NumberDataPoint))
        assert decisions_counted == sum(1 for s in spans if s.name.startswith("route "))
        node_points = met.points("ctxd.graph.node.duration")
        assert {dict(p.attributes or {})["ctxd.graph.node"] for p in node_points} >= {
            "context_analyzer",
            "decision_engine",
        }


async def test_events_without_trace_context_start_their_own_traces() -> None:
    with capture_spans() as cap:
        graph = build_contextual_workflow(
            LocalDispatch(), _saver(), telemetry=GraphTelemetry(cap.tracer)
        )
        await run_events(
            graph, "wf-roots", [_event("a", "Latency rose."), _event("b", "Pricing changed.")]
        )
        invokes = [s for s in cap.spans() if s.name == "invoke_workflow contextual"]
        assert len(invokes) == 2
        assert all(s.parent is None for s in invokes)
        assert invokes[0].context.trace_id != invokes[1].context.trace_id
