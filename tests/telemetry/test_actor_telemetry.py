"""Breaker transitions and actor restarts, exported by the real OTLP exporters.

The breaker and the supervisor are the real ones (fake clock); the listeners of
actors/runtime/telemetry_hooks.py record spans and metrics on a non-global Telemetry whose
exporters send to an in-process OTLP receiver.
"""

from __future__ import annotations

import anyio
import pytest
import structlog
from anyio.abc import TaskStatus

from actors.runtime.breaker import BreakerConfig, CircuitBreaker
from actors.runtime.supervisor import ChildSpec, Supervisor, SupervisorConfig
from actors.runtime.telemetry_hooks import actor_restarts, breaker_calls, breaker_transitions
from telemetry.settings import TelemetrySettings
from telemetry.setup import open_telemetry
from telemetry.testing import OtlpReceiver


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _settings(receiver: OtlpReceiver) -> TelemetrySettings:
    return TelemetrySettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "3600000",  # only force_flush exports
        }
    )


def test_breaker_cycle_closed_open_half_open_closed(receiver: OtlpReceiver) -> None:
    clock = _Clock()
    config = BreakerConfig(
        window_size=4, minimum_calls=4, open_wait=10.0, jitter=0.0, half_open_permitted_calls=1
    )
    breaker = CircuitBreaker("analysis", config, clock=clock)
    with open_telemetry(_settings(receiver), set_global=False) as telemetry:
        breaker.add_listener(breaker_transitions(telemetry.tracer, telemetry.instruments))
        breaker.add_call_listener(breaker_calls(telemetry.instruments))
        with structlog.testing.capture_logs() as logs:
            with telemetry.tracer.start_as_current_span("ask analysis") as ask:
                for _ in range(4):
                    assert breaker.try_acquire()
                    breaker.on_error(0.01, ConnectionError("refused"))
            assert breaker.state.value == "open"
            assert not breaker.try_acquire()  # rejected
            clock.now += 10.0
            assert breaker.state.value == "half_open"  # timer-driven: no span is current
            assert breaker.try_acquire()
            breaker.on_success(0.01)
        assert str(breaker.state) == "closed"  # str(): not narrowed by the asserts above
        assert telemetry.force_flush()

    spans = receiver.wait_for_spans(lambda s: len(s) >= 4)
    transitions = [s for s in spans if s.name == "circuit_breaker.transition analysis"]
    assert [(s.attributes["ctxd.circuit_breaker.state.from"],
             s.attributes["ctxd.circuit_breaker.state.to"],
             s.attributes["ctxd.circuit_breaker.trigger"]) for s in transitions] == [
        ("closed", "open", "failure_rate"),
        ("open", "half_open", "break_elapsed"),
        ("half_open", "closed", "probe_succeeded"),
    ]  # fmt: skip
    opened, half_open, closed = transitions
    ask_id = format(ask.get_span_context().span_id, "016x")
    assert opened.parent_span_id == ask_id  # a child of the call that tripped it
    assert opened.attributes["ctxd.circuit_breaker.failure_rate"] == pytest.approx(1.0)
    assert opened.attributes["ctxd.circuit_breaker.window.calls"] == 4
    assert opened.attributes["error.type"] == "ConnectionError"
    assert half_open.parent_span_id == ""  # root, linked to the opening
    assert [(link.trace_id, link.span_id) for link in half_open.links] == [
        (opened.trace_id, opened.span_id)
    ]
    assert "ctxd.circuit_breaker.failure_rate" not in half_open.attributes
    assert closed.attributes["ctxd.circuit_breaker.failure_rate"] == pytest.approx(0.0)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["circuit breaker opened"]

    metrics = receiver.wait_for_metrics(
        lambda m: (
            {"ctxd.circuit_breaker.transitions", "ctxd.circuit_breaker.state"}
            <= {x.name for x in m}
        )
    )
    counted = [m for m in metrics if m.name == "ctxd.circuit_breaker.transitions"][-1]
    assert sum(int(p.value or 0) for p in counted.points) == 3
    state = [m for m in metrics if m.name == "ctxd.circuit_breaker.state"][-1]
    assert state.data_type == "gauge"
    now = {p.attributes["ctxd.circuit_breaker.state"]: p.value for p in state.points}
    assert now == {"closed": 1, "open": 0, "half_open": 0, "forced_open": 0}
    calls = [m for m in metrics if m.name == "ctxd.circuit_breaker.calls"][-1]
    outcomes = {p.attributes["ctxd.circuit_breaker.outcome"]: p.value for p in calls.points}
    assert outcomes == {"failure": 4, "not_permitted": 1, "success": 1}


async def test_actor_restarts_are_counted(receiver: OtlpReceiver) -> None:
    crashed = False
    recovered = anyio.Event()

    async def worker(task_status: TaskStatus[None]) -> None:
        nonlocal crashed
        task_status.started()
        if not crashed:
            crashed = True
            raise RuntimeError("boom")
        recovered.set()
        await anyio.sleep_forever()

    with open_telemetry(_settings(receiver), set_global=False) as telemetry:
        supervisor = Supervisor(
            "analysis",
            [ChildSpec("analysis-0", worker)],
            SupervisorConfig(backoff_initial=0.0, jitter=0.0),
            on_restart=actor_restarts(telemetry.instruments),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            with anyio.fail_after(10):
                await recovered.wait()
            tg.cancel_scope.cancel()
        await anyio.to_thread.run_sync(telemetry.force_flush)

    metrics = receiver.wait_for_metrics(lambda m: "ctxd.actor.restarts" in {x.name for x in m})
    restarts = [m for m in metrics if m.name == "ctxd.actor.restarts"][-1]
    assert [(dict(p.attributes), p.value) for p in restarts.points] == [
        ({"ctxd.actor.kind": "analysis", "error.type": "RuntimeError"}, 1)
    ]
