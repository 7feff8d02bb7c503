"""The graph's :class:`~graph.work.Dispatch` over actors: asks behind circuit breakers.

:class:`ActorDispatch` sends each node's request to its actor kind with
:meth:`Mailbox.ask <actors.runtime.mailbox.Mailbox.ask>`, through that kind's
:class:`~actors.runtime.breaker.CircuitBreaker`, with at most ``max_asks_in_flight`` asks
outstanding (a semaphore: callers wait rather than pile requests into Redis). Its
:meth:`~ActorDispatch.health` feeds the routing context: breaker state per kind, the
error rate over recent asks, and a performance score from latency against the ask
timeout and rejections. :meth:`~ActorDispatch.reading_allowed` is the ingress's
backpressure hook: no new input is read while a breaker is open.

:func:`actors.runtime.telemetry_hooks.breaker_transitions` is the transition listener every
breaker gets: a
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
from opentelemetry import trace
from opentelemetry.trace import Tracer

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, RedisUnavailableError, is_outage
from actors.runtime.breaker import (
    BreakerConfig,
    BreakerState,
    CallNotPermittedError,
    CircuitBreaker,
)
from actors.runtime.mailbox import Mailbox
from actors.runtime.telemetry_hooks import breaker_calls, breaker_transitions
from graph.state import JSON
from graph.work import DispatchHealth, WorkKind
from telemetry.metrics import Instruments

__all__ = ["ActorDispatch", "breaker_config"]

_log = structlog.get_logger("ctxd.breaker")
_RECENT = 100  # asks behind error_rate and performance_score
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
        # A Redis outage or a full connection pool says nothing about the actors.
        record_error=lambda error: not is_outage(error),
    )


class ActorDispatch:
    """Node work as asks to actor kinds, each behind its circuit breaker.

    Args:
        mailbox: the asking side (its :meth:`~actors.runtime.mailbox.Mailbox.run` must be running).
        settings: ask timeout, in-flight bound, breaker settings.
        clock: monotonic clock of the breakers (inject a fake one in tests).
        tracer: for the breaker transition spans.
        instruments: metrics, when telemetry is set up.
        availability: the process's Redis monitor: an ask that meets an outage waits
            it out and is sent again (never a breaker failure, never a degraded answer).
    """

    def __init__(
        self,
        mailbox: Mailbox,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        tracer: Tracer | None = None,
        instruments: Instruments | None = None,
        availability: RedisAvailability | None = None,
    ) -> None:
        self._mailbox = mailbox
        self._availability = availability
        self._timeout = settings.ask_timeout
        self._limit = anyio.Semaphore(settings.max_asks_in_flight)
        config = breaker_config(settings)
        listener = breaker_transitions(tracer or trace.get_tracer("ctxd.actors"), instruments)
        self.breakers: Mapping[str, CircuitBreaker] = {
            kind.value: CircuitBreaker(f"actor.{kind.value}", config, clock=clock)
            for kind in WorkKind
        }
        for breaker in self.breakers.values():
            breaker.add_listener(listener)
            if instruments is not None:
                breaker.add_call_listener(breaker_calls(instruments))
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
            while True:
                started = time.monotonic()
                try:
                    reply = await breaker.call(lambda: self._ask(kind, payload))
                except CallNotPermittedError:
                    recent.add(ok=False, seconds=None)
                    raise
                except Exception as exc:
                    if self._availability is not None and is_outage(exc):
                        # Redis was away: not the actor's fault; ask again once it is back.
                        self._availability.report(exc)
                        await self._availability.wait_available()
                        continue
                    recent.add(ok=False, seconds=time.monotonic() - started)
                    raise
                recent.add(ok=True, seconds=time.monotonic() - started)
                return reply

    async def _ask(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        availability = self._availability
        generation = availability.generation if availability is not None else 0
        try:
            return await self._mailbox.ask(kind.value, payload, self._timeout)
        except TimeoutError as exc:
            if availability is not None and availability.disturbed_since(generation):
                # The reply could not come back while Redis was away.
                raise RedisUnavailableError(
                    f"no reply from the {kind.value} actors within {self._timeout:g} s "
                    "while Redis was unavailable"
                ) from exc
            if str(exc):
                raise
            # The event's output names this; a bare "TimeoutError:" says too little.
            raise TimeoutError(
                f"no reply from the {kind.value} actors within {self._timeout:g}s"
                " (CTXD_ASK_TIMEOUT): are its workers running, and keeping up?"
            ) from exc

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
