"""The real ``ctxd run`` exporting over OTLP to a real receiver the test starts.

Every test drives a ``ctxd`` subprocess configured only by ``OTEL_*`` variables, appends
raw entries with ``XADD`` (with a producer's ``traceparent``), and reads back what the
real OTLP exporters sent, decoded by :class:`telemetry.testing.OtlpReceiver`.
"""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from opentelemetry.trace import SpanKind
from redis import Redis

from telemetry.testing import OtlpReceiver, ReceivedMetric, ReceivedSpan
from tests_support import REPO, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

_ENDPOINTS = {"grpc": "grpc_endpoint", "http/protobuf": "http_endpoint"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP receiver (gRPC and HTTP) on loopback."""
    with OtlpReceiver() as running:
        yield running


def _otel_env(receiver: OtlpReceiver, protocol: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": getattr(receiver, _ENDPOINTS[protocol]),
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_SERVICE_NAME": "ctxd-under-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,team=obs%2Cdata",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        **extra,
    }


def _producer() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _send(redis: Redis, prefix: str, workflow_id: str, content: str, traceparent: str) -> str:
    return str(
        redis.xadd(
            f"{prefix}:in",
            {"workflow_id": workflow_id, "content": content, "traceparent": traceparent},
        )
    )


def _in_trace(trace_id: str) -> Callable[[Sequence[ReceivedSpan]], list[ReceivedSpan]]:
    return lambda spans: [s for s in spans if s.trace_id == trace_id]


def _event_complete(trace_id: str, prefix: str) -> Callable[[Sequence[ReceivedSpan]], bool]:
    """The event's own spans are all in: the ingress's ``process`` span ends last (after
    the commit), later than the actors' ``process`` spans of the same trace."""
    select_trace = _in_trace(trace_id)
    wanted = {"invoke_workflow contextual", "route enterprise_routing", f"process {prefix}:in"}

    def done(spans: Sequence[ReceivedSpan]) -> bool:
        return wanted <= {s.name for s in select_trace(spans)}

    return done


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_one_trace_per_event_continues_the_producers_traceparent(
    protocol: str,
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """process ← producer; invoke_workflow ← process; nodes ← invoke; routes ← their node."""
    service = start_service("run", env=_otel_env(receiver, protocol))
    service.wait_ready()
    trace_id, producer_span, traceparent = _producer()
    source_id = _send(
        redis, prefix, "orders-7", "Checkout latency rose after the deploy.", traceparent
    )

    outputs = read_outputs(redis, f"{prefix}:out", 1)
    assert outputs[0][1]["trace_id"] == trace_id
    received = receiver.wait_for_spans(_event_complete(trace_id, prefix), timeout=30)
    spans = _in_trace(trace_id)(received)
    by_id = {s.span_id: s for s in spans}

    process = [s for s in spans if s.name == f"process {prefix}:in"]
    assert len(process) == 1
    process_span = process[0]
    assert process_span.kind is SpanKind.CONSUMER
    assert process_span.parent_span_id == producer_span
    assert [(link.trace_id, link.span_id) for link in process_span.links] == [
        (trace_id, producer_span)
    ]
    assert process_span.attributes["messaging.message.id"] == source_id
    assert process_span.attributes["messaging.message.conversation_id"] == "orders-7"
    assert process_span.attributes["messaging.consumer.group.name"] == "ctxd"
    assert process_span.transport == ("grpc" if protocol == "grpc" else "http")
    assert process_span.resource["service.name"] == "ctxd-under-test"
    assert process_span.resource["deployment.environment.name"] == "test"
    assert process_span.resource["team"] == "obs,data"

    (invoke,) = [s for s in spans if s.name == "invoke_workflow contextual"]
    assert invoke.parent_span_id == process_span.span_id
    assert invoke.attributes["gen_ai.conversation.id"] == "orders-7"
    nodes = [s for s in spans if s.attributes.get("ctxd.graph.node")]
    assert {"context_analyzer", "decision_engine"} <= {s.name for s in nodes}
    assert all(s.parent_span_id == invoke.span_id for s in nodes)
    routes = [s for s in spans if s.name.startswith("route ")]
    for route in routes:
        parent = by_id[route.parent_span_id]
        policy = route.attributes["ctxd.routing.policy"]
        assert parent.name == (
            "context_analyzer" if policy == "context_analyzer" else "decision_engine"
        )
    (decision,) = [s for s in routes if s.name == "route enterprise_routing"]
    assert decision.attributes["ctxd.routing.result.target"] == outputs[0][1]["decision"]
    scores = json.loads(outputs[0][1]["scores"])
    for name, score in scores.items():
        assert decision.attributes[f"ctxd.routing.score.{name}"] == pytest.approx(score)
    assert decision.attributes["ctxd.routing.factor.business_priority"] == "standard"
    assert isinstance(decision.attributes["ctxd.routing.viable"], tuple)
    assert decision.attributes["ctxd.routing.result.reason"]

    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_events_batched_in_one_run_keep_their_own_traces(
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """Entries appended before start are read, and run, as one batch of one workflow."""
    producers = [_producer() for _ in range(3)]
    for i, (_, _, traceparent) in enumerate(producers):
        _send(redis, prefix, "batch-1", f"Event {i}: checkout latency rose.", traceparent)
    service = start_service("run", env=_otel_env(receiver, "grpc"))
    service.wait_ready()
    outputs = read_outputs(redis, f"{prefix}:out", 3)
    assert [o[1]["trace_id"] for o in outputs] == [p[0] for p in producers]

    def all_complete(spans: Sequence[ReceivedSpan]) -> bool:
        return all(_event_complete(p[0], prefix)(spans) for p in producers)

    received = receiver.wait_for_spans(all_complete, timeout=30)
    for trace_id, producer_span, _ in producers:
        spans = _in_trace(trace_id)(received)
        (process,) = [s for s in spans if s.name == f"process {prefix}:in"]
        assert process.parent_span_id == producer_span
        (invoke,) = [s for s in spans if s.name == "invoke_workflow contextual"]
        assert invoke.parent_span_id == process.span_id
        nodes = [s for s in spans if s.attributes.get("ctxd.graph.node")]
        assert nodes
        assert all(s.parent_span_id == invoke.span_id for s in nodes)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_metrics_reach_the_receiver(
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """Process duration, consumed messages, decisions, node durations, backlog gauges."""
    # Metrics over gRPC, traces over HTTP: each signal's own settings are honoured.
    env = _otel_env(receiver, "http/protobuf", OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="grpc")
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = receiver.grpc_endpoint
    service = start_service("run", env=env)
    service.wait_ready()
    for i in range(3):
        _send(redis, prefix, "metrics-1", f"Event {i}: latency rose.", _producer()[2])
    read_outputs(redis, f"{prefix}:out", 3)

    wanted = {
        "messaging.process.duration",
        "messaging.client.consumed.messages",
        "ctxd.routing.decisions",
        "ctxd.graph.node.duration",
        "ctxd.stream.pending",
        "ctxd.stream.lag",
    }

    def latest(metrics: Sequence[ReceivedMetric], name: str) -> ReceivedMetric | None:
        found = [m for m in metrics if m.name == name]
        return found[-1] if found else None

    def complete(metrics: Sequence[ReceivedMetric]) -> bool:
        if not wanted <= {m.name for m in metrics}:
            return False
        consumed = latest(metrics, "messaging.client.consumed.messages")
        duration = latest(metrics, "messaging.process.duration")
        if consumed is None or duration is None:
            return False
        return sum(p.value or 0 for p in consumed.points) >= 3 and (
            sum(p.count or 0 for p in duration.points) >= 3
        )

    metrics = receiver.wait_for_metrics(complete, timeout=30)
    duration = latest(metrics, "messaging.process.duration")
    assert duration is not None
    assert duration.unit == "s"
    assert duration.transport == "grpc"
    point = duration.points[0]
    assert point.attributes["messaging.destination.name"] == f"{prefix}:in"
    assert point.attributes["ctxd.outcome"] == "processed"
    assert point.attributes["ctxd.status"] in ("ok", "escalated", "fallback", "error")
    assert point.explicit_bounds[0] == 0.005  # seconds buckets, not the SDK's milliseconds
    decisions = latest(metrics, "ctxd.routing.decisions")
    assert decisions is not None
    policies = {p.attributes["ctxd.routing.policy"] for p in decisions.points}
    assert policies == {"context_analyzer", "enterprise_routing"}
    nodes = latest(metrics, "ctxd.graph.node.duration")
    assert nodes is not None
    assert {"context_analyzer", "decision_engine"} <= {
        p.attributes["ctxd.graph.node"] for p in nodes.points
    }
    lag = latest(metrics, "ctxd.stream.lag")
    assert lag is not None
    assert any(  # ctxd:in's lag comes from the partitions' cursors (no consumer group)
        p.attributes["messaging.destination.name"] == f"{prefix}:in"
        and p.attributes.get("messaging.consumer.group.name") == "partitions"
        for p in lag.points
    )
    assert all(
        not n.startswith("ctxd.") or not n.endswith("_total") for n in {m.name for m in metrics}
    )

    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_stream_gauges_report_the_backlog(
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """Entries appended for a group nobody reads show up as lag."""
    redis.xgroup_create(f"{prefix}:in", "audit", id="$", mkstream=True)
    service = start_service("run", env=_otel_env(receiver, "grpc"))
    service.wait_ready()
    for i in range(4):
        _send(redis, prefix, "lag-1", f"Event {i}.", _producer()[2])
    read_outputs(redis, f"{prefix}:out", 4)

    def audit_lag(metrics: Sequence[ReceivedMetric]) -> bool:
        return any(
            m.name == "ctxd.stream.lag"
            and p.attributes.get("messaging.consumer.group.name") == "audit"
            and p.value == 4
            for m in metrics
            for p in m.points
        )

    receiver.wait_for_metrics(audit_lag, timeout=30)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_sigterm_flushes_the_spans_of_the_last_event(
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """With a 10-minute batch delay only the shutdown flush can deliver the spans."""
    env = _otel_env(receiver, "grpc", OTEL_BSP_SCHEDULE_DELAY="600000")
    env["OTEL_METRICS_EXPORTER"] = "none"
    service = start_service("run", env=env)
    service.wait_ready()
    trace_id, _, traceparent = _producer()
    _send(redis, prefix, "last-1", "The last event before shutdown.", traceparent)
    read_outputs(redis, f"{prefix}:out", 1)
    assert _in_trace(trace_id)(receiver.spans()) == []  # nothing exported yet

    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    spans = _in_trace(trace_id)(receiver.spans())
    assert _event_complete(trace_id, prefix)(spans), [s.name for s in spans]


def test_sdk_disabled_exports_nothing(
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """OTEL_SDK_DISABLED=true: the service works, the receiver hears nothing."""
    env = _otel_env(receiver, "grpc", OTEL_SDK_DISABLED="true")
    service = start_service("run", env=env)
    service.wait_ready()
    _send(redis, prefix, "off-1", "No telemetry please.", _producer()[2])
    assert len(read_outputs(redis, f"{prefix}:out", 1)) == 1
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert receiver.trace_requests() == []
    assert receiver.metric_requests() == []


def test_sampler_from_the_environment(
    receiver: OtlpReceiver,
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """always_off drops even a sampled producer's trace; log lines keep the trace id."""
    env = _otel_env(receiver, "grpc", OTEL_TRACES_SAMPLER="always_off", CTXD_LOG_LEVEL="debug")
    env["OTEL_METRICS_EXPORTER"] = "none"
    service = start_service("run", env=env)
    service.wait_ready()
    trace_id, _, traceparent = _producer()
    _send(redis, prefix, "sampled-off", "Not sampled.", traceparent)
    read_outputs(redis, f"{prefix}:out", 1)
    line = service.wait_for_line(lambda x: '"event started"' in x)
    assert json.loads(line)["trace_id"] == trace_id
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert _in_trace(trace_id)(receiver.spans()) == []


def test_bad_otel_variable_is_a_one_line_config_error(service_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXD_", "OTEL_"))}
    env.update(service_env)
    env["OTEL_TRACES_SAMPLER"] = "sometimes"
    done = run_ctxd(env, "run", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ctxd: OTEL_TRACES_SAMPLER='sometimes' is not supported")


def test_json_log_lines_carry_the_events_trace_and_workflow(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """Lines logged while an event is processed carry its trace_id and workflow_id."""
    service = start_service("run", env={"CTXD_LOG_LEVEL": "debug", "CTXD_LOG_FORMAT": "json"})
    service.wait_ready()
    trace_id, _, traceparent = _producer()
    _send(redis, prefix, "logs-1", "Checkout latency rose.", traceparent)
    read_outputs(redis, f"{prefix}:out", 1)
    service.wait_for_line(lambda x: '"event finished"' in x)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0

    records = []
    for line in service.lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    event_lines = [r for r in records if r.get("event") in ("event started", "event finished")]
    assert len(event_lines) == 2
    for record in event_lines:
        assert record["trace_id"] == trace_id
        assert re.fullmatch(r"[0-9a-f]{16}", record["span_id"])
        assert record["workflow_id"] == "logs-1"
        assert record["level"] == "debug"
    # Routine third-party INFO lines are quieted.
    assert not [r for r in records if "Index already exists" in str(r.get("event"))]
    assert not [r for r in records if "standalone client" in str(r.get("event"))]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_console_rendering_on_a_terminal(service_env: dict[str, str]) -> None:
    """On a TTY (a real pty) ctxd logs for people, not JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXD_", "OTEL_"))}
    env.update(service_env)
    env["CTXD_LOG_FORMAT"] = "auto"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.app.cli", "run"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    try:
        deadline = time.monotonic() + 60
        while b"ctxd is running" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the pty closed: the process is gone
                break
            if not chunk:
                break
            output += chunk
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(controller)
    text = _ANSI.sub("", output.decode("utf-8", errors="replace"))
    running = [line for line in text.splitlines() if "ctxd is running" in line]
    assert running, text
    assert not running[0].lstrip().startswith("{")
    assert re.search(r"\[info\s*\]\s+ctxd is running", running[0]), running[0]
    assert "\x1b[" in output.decode("utf-8", errors="replace")  # colours: a console renderer
