"""Span helpers: names, kinds, attributes, parents and links as DESIGN.md fixes them."""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    Tracer,
)

from telemetry.setup import SCHEMA_URL
from telemetry.spans import (
    node_span,
    process_span,
    record_breaker_transition,
    record_error,
    record_route,
    send_span,
    set_message_id,
    workflow_span,
)
from telemetry.testing import capture_spans

PRODUCER = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
)


def _producer_context() -> Context:
    return trace.set_span_in_context(NonRecordingSpan(PRODUCER), Context())


def _process(
    tracer: Tracer, parent: Context | None, workflow_id: str | None = "wf-7"
) -> AbstractContextManager[Span]:
    return process_span(
        tracer,
        stream="ctxd:in",
        group="ctxd",
        consumer="host:42:0",
        message_id=b"1700000000000-0",
        workflow_id=workflow_id,
        delivery_count=2,
        parent=parent,
    )


def test_process_span_is_a_consumer_child_of_the_producer_with_a_link() -> None:
    with capture_spans() as capture:
        with _process(capture.tracer, _producer_context()):
            pass
        span = capture.named("process ctxd:in")
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (PRODUCER.trace_id, PRODUCER.span_id)
    assert [link.context for link in span.links] == [PRODUCER]
    assert dict(span.attributes or {}) == {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "ctxd:in",
        "messaging.consumer.group.name": "ctxd",
        "messaging.client.id": "host:42:0",
        "messaging.message.id": "1700000000000-0",
        "messaging.message.conversation_id": "wf-7",
        "ctxd.delivery_count": 2,
    }
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.schema_url == SCHEMA_URL


@pytest.mark.parametrize("parent", [None, Context()], ids=["no-parent", "no-traceparent"])
def test_process_span_without_a_producer_is_a_root_even_inside_another_span(
    parent: Context | None,
) -> None:
    with capture_spans() as capture:
        with (
            capture.tracer.start_as_current_span("consumer loop"),
            _process(capture.tracer, parent, workflow_id=None),
        ):
            pass
        span = capture.named("process ctxd:in")
    assert span.parent is None
    assert span.links == ()
    assert "messaging.message.conversation_id" not in (span.attributes or {})


def test_send_span_is_a_producer_and_takes_the_message_id_after_xadd() -> None:
    with capture_spans() as capture:
        with send_span(capture.tracer, stream="ctxd:out", workflow_id="wf-7") as span:
            set_message_id(span, b"1700000000001-0")
        recorded = capture.named("send ctxd:out")
    assert recorded.kind is SpanKind.PRODUCER
    assert dict(recorded.attributes or {}) == {
        "messaging.system": "redis",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "ctxd:out",
        "messaging.message.conversation_id": "wf-7",
        "messaging.message.id": "1700000000001-0",
    }


def test_workflow_and_node_spans_nest() -> None:
    with capture_spans() as capture:
        with workflow_span(capture.tracer, conversation_id="wf-7"):
            with node_span(capture.tracer, "context_analyzer", 0):
                pass
            with node_span(capture.tracer, "decision_engine", 1):
                pass
        workflow = capture.named("invoke_workflow contextual")
        analyzer = capture.named("context_analyzer")
        decision = capture.named("decision_engine")
    assert workflow.kind is SpanKind.INTERNAL
    assert dict(workflow.attributes or {}) == {
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.workflow.name": "contextual",
        "gen_ai.conversation.id": "wf-7",
    }
    assert dict(analyzer.attributes or {}) == {
        "ctxd.graph.node": "context_analyzer",
        "ctxd.graph.step": 0,
    }
    assert decision.attributes is not None
    assert decision.attributes["ctxd.graph.step"] == 1
    for node in (analyzer, decision):
        assert node.kind is SpanKind.INTERNAL
        assert node.parent is not None
        assert node.parent.span_id == workflow.context.span_id


def test_an_exception_marks_the_span_and_propagates() -> None:
    with capture_spans() as capture:
        with pytest.raises(TimeoutError), node_span(capture.tracer, "adaptive_processor", 3):
            raise TimeoutError("actor did not answer in 5s")
        span = capture.named("adaptive_processor")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "TimeoutError: actor did not answer in 5s"
    assert span.attributes is not None
    assert span.attributes["error.type"] == "TimeoutError"
    assert [event.name for event in span.events] == ["exception"]


async def test_cancellation_is_not_an_error() -> None:
    with capture_spans() as capture:
        with (
            pytest.raises(asyncio.CancelledError),
            node_span(capture.tracer, "continuous_monitor", 4),
        ):
            raise asyncio.CancelledError
        span = capture.named("continuous_monitor")
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in (span.attributes or {})


def test_record_error_marks_a_handled_failure() -> None:
    class PoisonEntryError(ValueError):
        pass

    with capture_spans() as capture:
        with capture.tracer.start_as_current_span("dead-letter") as span:
            record_error(span, PoisonEntryError("5 deliveries"))
        recorded = capture.named("dead-letter")
    assert recorded.status.status_code is StatusCode.ERROR
    assert recorded.attributes is not None
    assert str(recorded.attributes["error.type"]).endswith(
        "test_record_error_marks_a_handled_failure.<locals>.PoisonEntryError"
    )


def test_record_route_puts_the_whole_explanation_in_attributes() -> None:
    with capture_spans() as capture:
        with capture.tracer.start_as_current_span("context_analyzer") as node:
            returned = record_route(
                capture.tracer,
                policy="analyzer",
                factors={"error_rate": 0.25, "events": 12, "tier": "gold", "degraded": False},
                scores={"adaptive_processor": 0.75, "context_updater": 0.5, "decision_engine": 1},
                viable=["adaptive_processor", "decision_engine"],
                target="decision_engine",
                reason="score_max",
                margin=0.25,
                score=1.0,
            )
        span = capture.named("route analyzer")
    assert span.kind is SpanKind.INTERNAL
    assert span.context == returned
    assert span.parent is not None
    assert span.parent.span_id == node.get_span_context().span_id
    assert dict(span.attributes or {}) == {
        "ctxd.routing.policy": "analyzer",
        "ctxd.routing.factor.error_rate": 0.25,
        "ctxd.routing.factor.events": 12,
        "ctxd.routing.factor.tier": "gold",
        "ctxd.routing.factor.degraded": False,
        "ctxd.routing.score.adaptive_processor": 0.75,
        "ctxd.routing.score.context_updater": 0.5,
        "ctxd.routing.score.decision_engine": 1.0,
        "ctxd.routing.viable": ("adaptive_processor", "decision_engine"),
        "ctxd.routing.result.target": "decision_engine",
        "ctxd.routing.result.reason": "score_max",
        "ctxd.routing.result.margin": 0.25,
        "ctxd.routing.result.score": 1.0,
    }
    assert span.events == ()
    assert span.status.status_code is StatusCode.UNSET


def test_record_route_without_a_score_omits_it() -> None:
    with capture_spans() as capture:
        record_route(
            capture.tracer,
            policy="decision",
            factors={},
            scores={},
            viable=[],
            target="fallback_processing",
            reason="fallback",
            margin=0.0,
            score=None,
        )
        span = capture.named("route decision")
    assert "ctxd.routing.result.score" not in (span.attributes or {})
    assert span.attributes is not None
    assert span.attributes["ctxd.routing.viable"] == ()


def test_breaker_transition_inside_a_call_is_its_child() -> None:
    with capture_spans() as capture:
        with capture.tracer.start_as_current_span("ask analysis") as call:
            record_breaker_transition(
                capture.tracer,
                name="analysis",
                from_state="closed",
                to_state="open",
                trigger="failure_rate",
                failure_rate=0.6,
                window_calls=20,
                error_type="TimeoutError",
                link=None,
            )
        span = capture.named("circuit_breaker.transition analysis")
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == call.get_span_context().span_id
    assert span.links == ()
    assert dict(span.attributes or {}) == {
        "ctxd.circuit_breaker.name": "analysis",
        "ctxd.circuit_breaker.state.from": "closed",
        "ctxd.circuit_breaker.state.to": "open",
        "ctxd.circuit_breaker.trigger": "failure_rate",
        "ctxd.circuit_breaker.failure_rate": 0.6,
        "ctxd.circuit_breaker.window.calls": 20,
        "error.type": "TimeoutError",
    }


def test_timer_driven_transition_is_a_root_linked_to_the_opening_span() -> None:
    with capture_spans() as capture:
        with capture.tracer.start_as_current_span("ask analysis"):
            opened = record_breaker_transition(
                capture.tracer,
                name="analysis",
                from_state="closed",
                to_state="open",
                trigger="failure_rate",
                failure_rate=0.5,
                window_calls=20,
            )
        # Later, from a timer with no current span:
        half_open = record_breaker_transition(
            capture.tracer,
            name="analysis",
            from_state="open",
            to_state="half_open",
            trigger="break_elapsed",
            failure_rate=None,
            window_calls=None,
            link=opened,
        )
        (span,) = [s for s in capture.spans() if s.context == half_open]
    assert span.parent is None
    assert span.context.trace_id != opened.trace_id
    assert [link.context for link in span.links] == [opened]
    assert dict(span.attributes or {}) == {
        "ctxd.circuit_breaker.name": "analysis",
        "ctxd.circuit_breaker.state.from": "open",
        "ctxd.circuit_breaker.state.to": "half_open",
        "ctxd.circuit_breaker.trigger": "break_elapsed",
    }


def test_unsampled_spans_still_have_valid_ids_for_propagation() -> None:
    with (
        capture_spans(sampler=ALWAYS_OFF) as capture,
        send_span(capture.tracer, stream="ctxd:in") as span,
    ):
        assert span.get_span_context().is_valid
        assert not span.is_recording()
    assert capture.spans() == ()
