"""The real OTLP exporters, gRPC and HTTP/protobuf, against an in-process receiver."""

from __future__ import annotations

import io
import json

import anyio
import anyio.lowlevel
import pytest
import structlog
from opentelemetry.trace import SpanKind, StatusCode

from telemetry.logging import configure_logging
from telemetry.metrics import DURATION_BUCKETS, StreamReading
from telemetry.propagation import extract_context, inject_fields
from telemetry.settings import TelemetrySettings
from telemetry.setup import SCHEMA_URL, open_telemetry
from telemetry.spans import (
    node_span,
    process_span,
    record_route,
    send_span,
    set_message_id,
    workflow_span,
)
from telemetry.testing import OtlpReceiver, ReceivedSpan

PROTOCOLS = [("grpc", "grpc"), ("http/protobuf", "http")]


def _env(receiver: OtlpReceiver, protocol: str) -> dict[str, str]:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_SERVICE_NAME": "ctxd-test",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment.name=ci%20run",
    }


def _by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {span.name: span for span in spans}


@pytest.mark.parametrize(("protocol", "transport"), PROTOCOLS)
def test_spans_arrive_decoded_with_names_kinds_attributes_and_parents(
    receiver: OtlpReceiver, protocol: str, transport: str
) -> None:
    settings = TelemetrySettings.from_env(_env(receiver, protocol))
    with open_telemetry(settings, set_global=False) as telemetry:
        tracer = telemetry.tracer
        with send_span(tracer, stream="ctxd:in", workflow_id="wf-1") as sent:
            fields = {
                b"workflow_id": b"wf-1",
                **{k.encode(): v.encode() for k, v in inject_fields().items()},
            }
            set_message_id(sent, b"1700000000000-0")
        with (
            process_span(
                tracer,
                stream="ctxd:in",
                group="ctxd",
                consumer="host:1:0",
                message_id=b"1700000000000-0",
                workflow_id="wf-1",
                delivery_count=1,
                parent=extract_context(fields),
            ),
            workflow_span(tracer, conversation_id="wf-1"),
            node_span(tracer, "context_analyzer", 1),
        ):
            record_route(
                tracer,
                policy="analyzer",
                factors={"error_rate": 0.5, "tier": "gold"},
                scores={"adaptive_processor": 0.8, "decision_engine": 0.3},
                viable=["adaptive_processor", "decision_engine"],
                target="adaptive_processor",
                reason="score_max",
                margin=0.5,
                score=0.8,
            )
        assert telemetry.force_flush(10.0)

    spans = _by_name(receiver.wait_for_spans(lambda s: len(s) >= 5))
    send, process = spans["send ctxd:in"], spans["process ctxd:in"]
    workflow, node = spans["invoke_workflow contextual"], spans["context_analyzer"]
    route = spans["route analyzer"]

    assert [s.kind for s in (send, process, workflow, node, route)] == [
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.INTERNAL,
        SpanKind.INTERNAL,
        SpanKind.INTERNAL,
    ]
    assert {s.trace_id for s in spans.values()} == {send.trace_id}
    assert send.parent_span_id == ""
    assert process.parent_span_id == send.span_id
    assert [(link.trace_id, link.span_id) for link in process.links] == [
        (send.trace_id, send.span_id)
    ]
    assert (workflow.parent_span_id, node.parent_span_id, route.parent_span_id) == (
        process.span_id,
        workflow.span_id,
        node.span_id,
    )
    assert send.attributes["messaging.message.id"] == "1700000000000-0"
    assert process.attributes["ctxd.delivery_count"] == 1
    assert process.attributes["messaging.consumer.group.name"] == "ctxd"
    assert route.attributes["ctxd.routing.viable"] == ("adaptive_processor", "decision_engine")
    assert route.attributes["ctxd.routing.factor.tier"] == "gold"
    assert route.attributes["ctxd.routing.score.adaptive_processor"] == 0.8
    assert route.status_code is StatusCode.UNSET
    for span in spans.values():
        assert span.transport == transport
        assert span.resource["service.name"] == "ctxd-test"
        assert span.resource["deployment.environment.name"] == "ci run"
        assert span.scope_name == "ctxd"
        assert span.schema_url == SCHEMA_URL


@pytest.mark.parametrize(("protocol", "transport"), PROTOCOLS)
def test_metrics_arrive_with_names_units_and_second_buckets(
    receiver: OtlpReceiver, protocol: str, transport: str
) -> None:
    settings = TelemetrySettings.from_env(_env(receiver, protocol))
    with open_telemetry(settings, set_global=False) as telemetry:
        instruments = telemetry.instruments
        attributes = {"messaging.system": "redis", "messaging.destination.name": "ctxd:in"}
        instruments.process_duration.record(0.02, attributes)
        instruments.consumed_messages.add(1, attributes)
        instruments.sent_messages.add(1, attributes)
        instruments.node_duration.record(0.003, {"ctxd.graph.node": "context_analyzer"})
        instruments.routing_decisions.add(1, {"ctxd.routing.policy": "analyzer"})
        instruments.breaker_transitions.add(1, {"ctxd.circuit_breaker.name": "analysis"})
        instruments.breaker_calls.add(1, {"ctxd.circuit_breaker.outcome": "success"})
        instruments.actor_restarts.add(1, {"ctxd.actor.kind": "analysis"})
        instruments.record_breaker_state("analysis", "half_open")
        instruments.register_stream_gauges(
            lambda: [StreamReading(stream="ctxd:in", group="ctxd", pending=3, lag=7)]
        )
        assert telemetry.force_flush(10.0)

    expected = {
        "messaging.process.duration",
        "messaging.client.consumed.messages",
        "messaging.client.sent.messages",
        "ctxd.graph.node.duration",
        "ctxd.routing.decisions",
        "ctxd.circuit_breaker.transitions",
        "ctxd.circuit_breaker.state",
        "ctxd.circuit_breaker.calls",
        "ctxd.actor.restarts",
        "ctxd.stream.pending",
        "ctxd.stream.lag",
    }
    metrics = receiver.wait_for_metrics(lambda m: expected <= {x.name for x in m})
    first = {m.name: m for m in reversed(metrics)}  # the first export of each
    duration = first["messaging.process.duration"]
    assert (duration.unit, duration.data_type, duration.transport) == ("s", "histogram", transport)
    assert duration.points[0].explicit_bounds == DURATION_BUCKETS
    assert duration.points[0].count == 1
    assert first["ctxd.graph.node.duration"].points[0].explicit_bounds == DURATION_BUCKETS
    assert first["messaging.client.consumed.messages"].unit == "{message}"
    assert first["messaging.client.consumed.messages"].data_type == "sum"
    states = {
        p.attributes["ctxd.circuit_breaker.state"]: p.value
        for p in first["ctxd.circuit_breaker.state"].points
    }
    assert states == {"closed": 0, "open": 0, "half_open": 1, "forced_open": 0}
    (lag,) = first["ctxd.stream.lag"].points
    assert lag.value == 7
    assert lag.attributes["messaging.consumer.group.name"] == "ctxd"
    assert first["ctxd.stream.pending"].points[0].value == 3
    assert all(m.resource["service.name"] == "ctxd-test" for m in metrics)
    assert not any(name.endswith("_total") for name in receiver.metric_names())


def test_leaving_the_context_flushes_batched_spans(receiver: OtlpReceiver) -> None:
    """The SIGTERM path: no explicit force_flush, the context exit exports."""
    settings = TelemetrySettings.from_env(_env(receiver, "grpc"))
    with (
        open_telemetry(settings, set_global=False) as telemetry,
        telemetry.tracer.start_as_current_span("last words"),
    ):
        pass
    assert [s.name for s in receiver.wait_for_spans(lambda s: len(s) == 1)] == ["last words"]


def test_per_signal_endpoints_mix_transports(receiver: OtlpReceiver) -> None:
    settings = TelemetrySettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.http_endpoint}/v1/traces",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.grpc_endpoint,
        }
    )
    with open_telemetry(settings, set_global=False) as telemetry:
        with telemetry.tracer.start_as_current_span("via http"):
            telemetry.instruments.consumed_messages.add(1)
        assert telemetry.force_flush(10.0)
    assert {s.transport for s in receiver.wait_for_spans(lambda s: len(s) == 1)} == {"http"}
    metrics = receiver.wait_for_metrics(lambda m: len(m) >= 1)
    assert {m.transport for m in metrics} == {"grpc"}


def test_always_off_sampler_exports_nothing_but_logs_keep_ids(receiver: OtlpReceiver) -> None:
    env = {**_env(receiver, "grpc"), "OTEL_TRACES_SAMPLER": "always_off"}
    stream = io.StringIO()
    configure_logging(stream=stream)
    with open_telemetry(TelemetrySettings.from_env(env), set_global=False) as telemetry:
        with telemetry.tracer.start_as_current_span("dropped") as span:
            structlog.get_logger().info("inside an unsampled span")
        assert telemetry.force_flush(10.0)
        # force_flush returns after everything queued was exported: nothing was queued.
        assert receiver.spans() == []
    line = json.loads(stream.getvalue())
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert line["trace_flags"] == format(context.trace_flags, "02x")
    assert not int(line["trace_flags"], 16) & 0x01  # not sampled (0x02 is "random trace id")


def test_ratio_sampler_zero_is_respected(receiver: OtlpReceiver) -> None:
    env = {
        **_env(receiver, "http/protobuf"),
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    with open_telemetry(TelemetrySettings.from_env(env), set_global=False) as telemetry:
        with telemetry.tracer.start_as_current_span("dropped") as span:
            assert not span.is_recording()
        assert telemetry.force_flush(10.0)
    assert receiver.spans() == []


def test_receivers_are_independent(receiver: OtlpReceiver) -> None:
    with OtlpReceiver() as other:
        assert other.grpc_endpoint != receiver.grpc_endpoint
        settings = TelemetrySettings.from_env(_env(other, "grpc"))
        with (
            open_telemetry(settings, set_global=False) as telemetry,
            telemetry.tracer.start_as_current_span("to the other one"),
        ):
            pass
        assert len(other.wait_for_spans(lambda s: len(s) == 1)) == 1
    assert receiver.spans() == []


def test_wait_for_spans_times_out_with_what_arrived(receiver: OtlpReceiver) -> None:
    with pytest.raises(TimeoutError, match=r"received \[\]"):
        receiver.wait_for_spans(lambda s: len(s) > 0, timeout=0.05)


async def test_async_exit_flushes_even_when_the_scope_is_cancelled(receiver: OtlpReceiver) -> None:
    """The SIGTERM path in the daemon: cancellation unwinds through ``async with``."""
    settings = TelemetrySettings.from_env(_env(receiver, "http/protobuf"))
    with anyio.CancelScope() as scope:
        async with open_telemetry(settings, set_global=False) as telemetry:
            with telemetry.tracer.start_as_current_span("in flight at SIGTERM"):
                pass
            scope.cancel()
            await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    spans = receiver.wait_for_spans(lambda s: len(s) == 1)
    assert [s.name for s in spans] == ["in flight at SIGTERM"]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_traces_only_backend_like_jaeger_does_not_break_flush_or_exit(protocol: str) -> None:
    """Jaeger answers UNIMPLEMENTED to metrics: traces still arrive, nothing raises."""
    with OtlpReceiver(accept_metrics=False) as jaeger_like:
        settings = TelemetrySettings.from_env(_env(jaeger_like, protocol))
        with open_telemetry(settings, set_global=False, shutdown_timeout=5.0) as telemetry:
            with telemetry.tracer.start_as_current_span("traced"):
                telemetry.instruments.consumed_messages.add(1)
            telemetry.force_flush(5.0)
        assert [s.name for s in jaeger_like.wait_for_spans(lambda s: len(s) == 1)] == ["traced"]
        assert jaeger_like.metric_requests() == []
