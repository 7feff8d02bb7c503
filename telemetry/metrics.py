"""ctxd's metric instruments, created once from a Meter.

Names follow the OpenTelemetry messaging conventions where they exist and use the
``ctxd.`` prefix otherwise; units are UCUM, counters carry no ``_total`` suffix, and no
attribute ever holds a per-message value (message or workflow ids), which would make one
series per message.

Two kinds of gauges, chosen by where the value lives:

* ``ctxd.circuit_breaker.state`` is a synchronous gauge. A breaker's state changes only
  at transitions, which the breaker reports anyway, so it records 1 for the new state
  and 0 for the others at that moment (:meth:`Instruments.record_breaker_state`). No
  callback reads breaker objects from the metrics thread, and the series are exact.
* ``ctxd.stream.pending`` and ``ctxd.stream.lag`` are observable gauges. Their values
  come from Redis (``XPENDING``, ``XINFO GROUPS``), which must not be queried from the
  SDK's export thread: the daemon measures them on its own schedule, keeps the latest
  readings, and registers a function that returns them
  (:meth:`Instruments.register_stream_gauges`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    ObservableGauge,
    Observation,
)

# The synchronous gauge is stable in the specification; the Python API still exports it
# under a private-looking name.
from opentelemetry.metrics import _Gauge as Gauge

__all__ = [
    "BREAKER_STATES",
    "DURATION_BUCKETS",
    "Instruments",
    "StreamReading",
]

_logger = logging.getLogger(__name__)

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""Histogram boundaries in seconds, as the messaging conventions suggest.

The SDK's default boundaries are sized for milliseconds and would put every ctxd
duration in the first few buckets.
"""

BREAKER_STATES: Final[tuple[str, ...]] = ("closed", "open", "half_open", "forced_open")
"""Every state ``ctxd.circuit_breaker.state`` reports, one series each."""


@dataclass(frozen=True)
class StreamReading:
    """The latest measured backlog of one consumer group on one stream.

    Attributes:
        stream: the stream key.
        group: the consumer group.
        pending: entries delivered to the group and not yet acknowledged (``XPENDING``).
        lag: entries not yet delivered to the group (``XINFO GROUPS`` ``lag``);
            ``None`` when Redis cannot tell.
    """

    stream: str
    group: str
    pending: int
    lag: int | None = None


StreamSource = Callable[[], Iterable[StreamReading]]


class _StreamSources:
    """The registered reading functions; read from the SDK's export thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[StreamSource] = []

    def add(self, source: StreamSource) -> Callable[[], None]:
        with self._lock:
            self._sources.append(source)

        def unregister() -> None:
            with self._lock:
                if source in self._sources:
                    self._sources.remove(source)

        return unregister

    def readings(self) -> list[StreamReading]:
        with self._lock:
            sources = list(self._sources)
        readings: list[StreamReading] = []
        for source in sources:
            try:
                readings.extend(source())
            except Exception:  # one broken source must not hide the others
                _logger.warning("stream gauge source %r failed", source, exc_info=True)
        return readings

    def pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(r.pending, _stream_attributes(r)) for r in self.readings()]

    def lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(r.lag, _stream_attributes(r)) for r in self.readings() if r.lag is not None
        ]


def _stream_attributes(reading: StreamReading) -> dict[str, str]:
    return {
        "messaging.system": "redis",
        "messaging.destination.name": reading.stream,
        "messaging.consumer.group.name": reading.group,
    }


@dataclass(frozen=True)
class Instruments:
    """The instruments ctxd records; build with :meth:`create`.

    Attributes to use (all low-cardinality):

    * ``messaging.process.duration`` (s), ``messaging.client.consumed.messages``,
      ``messaging.client.sent.messages``: ``messaging.system``,
      ``messaging.destination.name``, ``messaging.consumer.group.name``, and
      ``error.type`` on failures; ctxd adds ``ctxd.outcome`` and ``ctxd.decision``.
    * ``ctxd.graph.node.duration`` (s): ``ctxd.graph.node``, ``error.type``.
    * ``ctxd.routing.decisions``: ``ctxd.routing.policy``,
      ``ctxd.routing.result.target``, ``ctxd.routing.result.reason``.
    * ``ctxd.circuit_breaker.transitions``: ``ctxd.circuit_breaker.name``,
      ``ctxd.circuit_breaker.state.from``, ``ctxd.circuit_breaker.state.to``,
      ``ctxd.circuit_breaker.trigger``.
    * ``ctxd.circuit_breaker.calls``: ``ctxd.circuit_breaker.name``,
      ``ctxd.circuit_breaker.outcome`` (``success|failure|ignored|not_permitted``).
    * ``ctxd.actor.restarts``: ``ctxd.actor.kind``.

    Attributes:
        process_duration: ``messaging.process.duration``, histogram in seconds.
        consumed_messages: ``messaging.client.consumed.messages``, counter.
        sent_messages: ``messaging.client.sent.messages``, counter.
        node_duration: ``ctxd.graph.node.duration``, histogram in seconds.
        routing_decisions: ``ctxd.routing.decisions``, counter.
        breaker_transitions: ``ctxd.circuit_breaker.transitions``, counter.
        breaker_state: ``ctxd.circuit_breaker.state``, gauge; use
            :meth:`record_breaker_state`.
        breaker_calls: ``ctxd.circuit_breaker.calls``, counter.
        actor_restarts: ``ctxd.actor.restarts``, counter.
        stream_pending: ``ctxd.stream.pending``, observable gauge.
        stream_lag: ``ctxd.stream.lag``, observable gauge.
    """

    process_duration: Histogram
    consumed_messages: Counter
    sent_messages: Counter
    node_duration: Histogram
    routing_decisions: Counter
    breaker_transitions: Counter
    breaker_state: Gauge
    breaker_calls: Counter
    actor_restarts: Counter
    stream_pending: ObservableGauge
    stream_lag: ObservableGauge
    _stream_sources: _StreamSources = field(repr=False, compare=False)

    @classmethod
    def create(cls, meter: Meter) -> Instruments:
        """Create every instrument on ``meter``.

        Call it once per meter: the stream gauges' callbacks belong to the instance.

        Args:
            meter: usually :attr:`telemetry.Telemetry.meter`; a no-op meter works too.

        Returns:
            The instruments.
        """
        sources = _StreamSources()
        return cls(
            process_duration=meter.create_histogram(
                "messaging.process.duration",
                unit="s",
                description="Duration of processing one stream entry.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
            consumed_messages=meter.create_counter(
                "messaging.client.consumed.messages",
                unit="{message}",
                description="Stream entries handed to ctxd's consumers.",
            ),
            sent_messages=meter.create_counter(
                "messaging.client.sent.messages",
                unit="{message}",
                description="Stream entries ctxd appended.",
            ),
            node_duration=meter.create_histogram(
                "ctxd.graph.node.duration",
                unit="s",
                description="Duration of one workflow node run.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            ),
            routing_decisions=meter.create_counter(
                "ctxd.routing.decisions",
                unit="{decision}",
                description="Routing decisions made, by policy, target and reason.",
            ),
            breaker_transitions=meter.create_counter(
                "ctxd.circuit_breaker.transitions",
                unit="{transition}",
                description="Circuit-breaker state transitions.",
            ),
            breaker_state=meter.create_gauge(
                "ctxd.circuit_breaker.state",
                unit="1",
                description="1 for a breaker's current state, 0 for its other states.",
            ),
            breaker_calls=meter.create_counter(
                "ctxd.circuit_breaker.calls",
                unit="{call}",
                description="Calls through a circuit breaker, by outcome.",
            ),
            actor_restarts=meter.create_counter(
                "ctxd.actor.restarts",
                unit="{restart}",
                description="Actor restarts by their supervisor.",
            ),
            stream_pending=meter.create_observable_gauge(
                "ctxd.stream.pending",
                callbacks=[sources.pending],
                unit="{message}",
                description="Entries delivered to a consumer group and not yet acknowledged.",
            ),
            stream_lag=meter.create_observable_gauge(
                "ctxd.stream.lag",
                callbacks=[sources.lag],
                unit="{message}",
                description="Entries in a stream not yet delivered to a consumer group.",
            ),
            _stream_sources=sources,
        )

    def record_breaker_state(self, name: str, state: str) -> None:
        """Set ``ctxd.circuit_breaker.state`` to 1 for ``state`` and 0 for the others.

        Call it when the breaker is created and at every transition.

        Args:
            name: the breaker's name.
            state: one of :data:`BREAKER_STATES`.

        Raises:
            ValueError: ``state`` is not one of :data:`BREAKER_STATES`.
        """
        if state not in BREAKER_STATES:
            raise ValueError(
                f"circuit-breaker state {state!r} is unknown; "
                f"use one of {', '.join(BREAKER_STATES)}"
            )
        for candidate in BREAKER_STATES:
            self.breaker_state.set(
                1 if candidate == state else 0,
                {"ctxd.circuit_breaker.name": name, "ctxd.circuit_breaker.state": candidate},
            )

    def register_stream_gauges(
        self, source: Callable[[], Iterable[StreamReading]]
    ) -> Callable[[], None]:
        """Feed ``ctxd.stream.pending`` and ``ctxd.stream.lag`` from ``source``.

        ``source`` is called from the SDK's export thread at every collection, so it must
        only return values measured earlier (no I/O, no event-loop objects that are not
        thread-safe to read); a reading function that raises is logged and skipped.

        Args:
            source: returns the latest readings, one per stream and group.

        Returns:
            A function that unregisters ``source``; calling it twice is harmless.
        """
        return self._stream_sources.add(source)

    def stream_readings(self) -> Sequence[StreamReading]:
        """The readings the registered sources return now (what the next export sees)."""
        return self._stream_sources.readings()
