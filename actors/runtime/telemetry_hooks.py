"""Listeners that turn breaker and supervisor events into spans, metrics and log lines.

Attach them where breakers and supervisors are built::

    breaker.add_listener(breaker_transitions(telemetry.tracer, telemetry.instruments))
    breaker.add_call_listener(breaker_calls(telemetry.instruments))
    Supervisor("analysis", children, on_restart=actor_restarts(telemetry.instruments))

Each breaker transition becomes a ``circuit_breaker.transition {name}`` span (a child of
the call that caused it, or a root linked to the previous transition when the open wait
elapsed with no call running), one ``ctxd.circuit_breaker.transitions`` count and the
``ctxd.circuit_breaker.state`` gauge; an opening is logged at error level.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanContext, Tracer

from actors.runtime.breaker import BreakerCall, BreakerState, BreakerTransition
from actors.runtime.supervisor import RestartEvent
from telemetry.metrics import Instruments
from telemetry.spans import record_breaker_transition

__all__ = ["actor_restarts", "breaker_calls", "breaker_transitions"]

_log = structlog.get_logger("ctxd.breaker")
_TIMER_TRIGGERS = ("break_elapsed", "half_open_timeout")
_REJECTING = (BreakerState.OPEN, BreakerState.FORCED_OPEN)


def breaker_transitions(
    tracer: Tracer, instruments: Instruments | None
) -> Callable[[BreakerTransition], None]:
    """A transition listener recording spans, metrics and log lines.

    Args:
        tracer: the tracer for the transition spans.
        instruments: where the transition counter and state gauge live; None for none.

    Returns:
        The listener for :meth:`actors.runtime.breaker.CircuitBreaker.add_listener`.
    """
    previous: dict[str, SpanContext] = {}

    def on_transition(event: BreakerTransition) -> None:
        failure_rate = event.failure_rate if event.failure_rate >= 0 else None
        # Time moved the breaker, not the call that happened to notice: a root span
        # (linked to the previous transition), not a child of that call.
        token = (
            otel_context.attach(otel_context.Context())
            if event.trigger in _TIMER_TRIGGERS
            else None
        )
        try:
            previous[event.name] = record_breaker_transition(
                tracer,
                name=event.name,
                from_state=event.from_state.value,
                to_state=event.to_state.value,
                trigger=event.trigger,
                failure_rate=failure_rate,
                window_calls=event.window_calls,
                error_type=event.error_type,
                link=previous.get(event.name),
            )
        finally:
            if token is not None:
                otel_context.detach(token)
        if instruments is not None:
            instruments.breaker_transitions.add(
                1,
                {
                    "ctxd.circuit_breaker.name": event.name,
                    "ctxd.circuit_breaker.state.from": event.from_state.value,
                    "ctxd.circuit_breaker.state.to": event.to_state.value,
                    "ctxd.circuit_breaker.trigger": event.trigger,
                },
            )
            instruments.record_breaker_state(event.name, event.to_state.value)
        opened = event.to_state in _REJECTING
        (_log.error if opened else _log.info)(
            "circuit breaker opened" if opened else "circuit breaker transition",
            breaker=event.name,
            to_state=event.to_state.value,
            from_state=event.from_state.value,
            trigger=event.trigger,
            failure_rate=failure_rate,
            window_calls=event.window_calls,
            error_type=event.error_type,
        )

    return on_transition


def breaker_calls(instruments: Instruments) -> Callable[[BreakerCall], None]:
    """A call listener counting ``ctxd.circuit_breaker.calls`` by outcome.

    Args:
        instruments: where the counter lives.

    Returns:
        The listener for :meth:`actors.runtime.breaker.CircuitBreaker.add_call_listener`.
    """

    def on_call(call: BreakerCall) -> None:
        instruments.breaker_calls.add(
            1,
            {"ctxd.circuit_breaker.name": call.name, "ctxd.circuit_breaker.outcome": call.outcome},
        )

    return on_call


def actor_restarts(instruments: Instruments) -> Callable[[RestartEvent], None]:
    """An ``on_restart`` callback counting ``ctxd.actor.restarts``.

    Attributes are the supervisor (one per actor kind) and ``error.type`` when the
    child crashed; child names are not used, so the series stay few.

    Args:
        instruments: where the counter lives.

    Returns:
        The callback for :class:`actors.runtime.supervisor.Supervisor`'s ``on_restart``.
    """

    def on_restart(event: RestartEvent) -> None:
        # Pool supervisors are named actor.{kind}; the kind is the useful label.
        attributes = {"ctxd.actor.kind": event.supervisor.removeprefix("actor.")}
        if event.error_type is not None:
            attributes["error.type"] = event.error_type
        instruments.actor_restarts.add(1, attributes)

    return on_restart
