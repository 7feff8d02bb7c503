"""The graph's :class:`~graph.work.Dispatch` over actors: asks behind circuit breakers.

:class:`ActorDispatch` sends each node's request to its actor kind with
:meth:`Mailbox.ask <actors.mailbox.Mailbox.ask>`, through that kind's
:class:`~actors.breaker.CircuitBreaker`, with at most ``max_asks_in_flight`` asks
outstanding (a semaphore: callers wait rather than pile requests into Redis). Its
:meth:`~ActorDispatch.health` feeds the routing context: breaker state per kind, the
error rate over recent asks, and a performance score from latency against the ask
timeout and rejections. :meth:`~ActorDispatch.reading_allowed` is the ingress's
backpressure hook: no new input is read while a breaker is open.

:func:`breaker_telemetry` is the transition listener every breaker gets: a
``circuit_breaker.transition`` span per transition (child of the current span, or a
linked root for the timer-driven ones), an error log line when a breaker opens, and
the ``ctxd.circuit_breaker.state`` gauge.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

import anyio
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanContext, Tracer

from actors.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CallNotPermittedError,
    CircuitBreaker,
)
from actors.config import Settings
from actors.mailbox import Mailbox
from graph.state import JSON
from graph.work import DispatchHealth, WorkKind
from telemetry.metrics import Instruments
from telemetry.spans import record_breaker_transition

__all__ = ["ActorDispatch", "breaker_config", "breaker_telemetry"]

_log = structlog.get_logger("ctxd.breaker")
_RECENT = 100  # asks behind error_rate and performance_score
_TIMER_TRIGGERS = ("break_elapsed", "half_open_timeout")
_REJECTING = (BreakerState.OPEN, BreakerState.FORCED_OPEN)


def breaker_config(settings: Settings) -> BreakerConfig:
    """The breaker configuration of the ``CTXD_BREAKER_*`` settings."""
    return BreakerConfig(
        window_size=settings.breaker_window,
        minimum_calls=settings.breaker_minimum_calls,
        failure_rate_threshold=settings.breaker_failure_rate,
        slow_call_duration=settings.ask_timeout,
        open_wait=settings.breaker_open_wait,
        max_open_wait=max(settings.breaker_open_wait, 300.0),
        half_open_permitted_calls=settings.breaker_half_open_calls,
        max_half_open_wait=max(60.0, settings.ask_timeout * 4),
    )


def breaker_telemetry(
    tracer: Tracer, instruments: Instruments | None = None
) -> Callable[[BreakerTransition], None]:
    """A transition listener recording spans, log lines and the state gauge."""
    last_span: dict[str, SpanContext] = {}

    def on_transition(change: BreakerTransition) -> None:
        token = None
        if change.trigger in _TIMER_TRIGGERS:
            # Time moved the breaker, not the call that happened to notice: a root span.
            token = otel_context.attach(otel_context.Context())
        try:
            last_span[change.name] = record_breaker_transition(
                tracer,
                name=change.name,
                from_state=change.from_state.value,
                to_state=change.to_state.value,
                trigger=change.trigger,
                failure_rate=change.failure_rate if change.failure_rate >= 0 else None,
                window_calls=change.window_calls or None,
                error_type=change.error_type,
                link=last_span.get(change.name),
            )
        finally:
            if token is not None:
                otel_context.detach(token)
        if instruments is not None:
            instruments.record_breaker_state(change.name, change.to_state.value)
            instruments.breaker_transitions.add(
                1,
                {
                    "ctxd.circuit_breaker.name": change.name,
                    "ctxd.circuit_breaker.state.from": change.from_state.value,
                    "ctxd.circuit_breaker.state.to": change.to_state.value,
                    "ctxd.circuit_breaker.trigger": change.trigger,
                },
            )
        fields = {
            "breaker": change.name,
            "from_state": change.from_state.value,
            "to_state": change.to_state.value,
            "trigger": change.trigger,
            "failure_rate": change.failure_rate,
            "error_type": change.error_type,
        }
        if change.to_state in _REJECTING:
            _log.error("circuit breaker opened", **fields)
        else:
            _log.info("circuit breaker transition", **fields)

    return on_transition


class ActorDispatch:
    """Node work as asks to actor kinds, each behind its circuit breaker.

    Args:
        mailbox: the asking side (its :meth:`~actors.mailbox.Mailbox.run` must be running).
        settings: ask timeout, in-flight bound, breaker settings.
        clock: monotonic clock of the breakers (inject a fake one in tests).
        tracer: for the breaker transition spans.
        instruments: metrics, when telemetry is set up.
    """

    def __init__(
        self,
        mailbox: Mailbox,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        tracer: Tracer | None = None,
        instruments: Instruments | None = None,
    ) -> None:
        self._mailbox = mailbox
        self._timeout = settings.ask_timeout
        self._limit = anyio.Semaphore(settings.max_asks_in_flight)
        config = breaker_config(settings)
        listener = breaker_telemetry(tracer or trace.get_tracer("ctxd.actors"), instruments)
        self.breakers: Mapping[str, CircuitBreaker] = {
            kind.value: CircuitBreaker(f"actor.{kind.value}", config, clock=clock)
            for kind in WorkKind
        }
        for breaker in self.breakers.values():
            breaker.add_listener(listener)
            if instruments is not None:
                instruments.record_breaker_state(breaker.name, breaker.state.value)
        self._recent = {kind.value: _Recent(self._timeout) for kind in WorkKind}

    async def __call__(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        """Ask ``kind`` for ``payload``'s answer through its breaker.

        Raises:
            CallNotPermittedError: the kind's breaker is open; nothing was sent.
            TimeoutError: no answer within the ask timeout.
            ActorError: the actor answered with an error.
        """
        breaker = self.breakers[kind.value]
        recent = self._recent[kind.value]
        async with self._limit:
            started = time.monotonic()
            try:
                reply = await breaker.call(
                    lambda: self._mailbox.ask(kind.value, payload, self._timeout)
                )
            except CallNotPermittedError:
                recent.add(ok=False, seconds=None)
                raise
            except Exception:
                recent.add(ok=False, seconds=time.monotonic() - started)
                raise
            recent.add(ok=True, seconds=time.monotonic() - started)
            return reply

    def reading_allowed(self) -> bool:
        """False while any kind's breaker rejects calls (the ingress stops reading)."""
        return not any(b.state in _REJECTING for b in self.breakers.values())

    def health(self) -> DispatchHealth:
        """Breaker states, and error rate and performance over each kind's last asks.

        The loop needs every kind, so the worst kind speaks for all: ``error_rate`` is
        the highest per-kind share of failed or rejected asks, ``performance_score``
        the lowest per-kind mean of ``1 - latency/timeout`` (0 for a failed or
        rejected ask).
        """
        states = {kind: b.state.value for kind, b in self.breakers.items()}
        error_rate, performance = 0.0, 1.0
        for recent in self._recent.values():
            if recent.count:
                error_rate = max(error_rate, min(1.0, recent.failed / recent.count))
                performance = min(performance, max(0.0, recent.score / recent.count))
        return DispatchHealth(
            breaker_states=states, error_rate=error_rate, performance_score=performance
        )


class _Recent:
    """The last asks of one kind, with running totals (health() runs per node)."""

    __slots__ = ("count", "failed", "outcomes", "score", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.outcomes: deque[tuple[bool, float]] = deque()  # (failed, score)
        self.count = 0
        self.failed = 0
        self.score = 0.0

    def add(self, *, ok: bool, seconds: float | None) -> None:
        score = max(0.0, 1.0 - seconds / self.timeout) if ok and seconds is not None else 0.0
        if len(self.outcomes) == _RECENT:
            old_failed, old_score = self.outcomes.popleft()
            self.failed -= old_failed
            self.score -= old_score
        self.outcomes.append((not ok, score))
        self.failed += not ok
        self.score += score
        self.count = len(self.outcomes)
