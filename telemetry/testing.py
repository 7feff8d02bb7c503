"""Test helpers for code that uses ctxd's telemetry, as structlog ships ``structlog.testing``.

* :func:`capture_spans`: a private tracer whose finished spans are kept in memory.
* :func:`capture_metrics`: a private meter and ctxd's instruments, read on demand.
* :class:`OtlpReceiver`: a real OTLP endpoint in the test process (gRPC and HTTP), to
  point the real exporters at and read back what they sent, decoded into
  :class:`ReceivedSpan` and :class:`ReceivedMetric` records.

Nothing here touches the global providers, so tests can run in any order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from telemetry._otlp_receiver import MetricsPredicate, OtlpReceiver, SpansPredicate
from telemetry._otlp_records import (
    ReceivedLink,
    ReceivedMetric,
    ReceivedPoint,
    ReceivedSpan,
    ReceivedValue,
    Transport,
)
from telemetry.metrics import Instruments
from telemetry.setup import INSTRUMENTATION_NAME, SCHEMA_URL

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.sdk.metrics.export import DataPointT
    from opentelemetry.sdk.trace.sampling import Sampler

__all__ = [
    "MetricCapture",
    "MetricsPredicate",
    "OtlpReceiver",
    "ReceivedLink",
    "ReceivedMetric",
    "ReceivedPoint",
    "ReceivedSpan",
    "ReceivedValue",
    "SpanCapture",
    "SpansPredicate",
    "Transport",
    "capture_metrics",
    "capture_spans",
]


@dataclass(frozen=True)
class SpanCapture:
    """What :func:`capture_spans` yields.

    Attributes:
        tracer: a tracer on the private provider, with ctxd's scope and schema URL.
        provider: the private provider.
        exporter: the in-memory exporter holding finished spans.
    """

    tracer: Tracer
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self) -> tuple[ReadableSpan, ...]:
        """The finished spans, in the order they ended."""
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> ReadableSpan:
        """The one finished span called ``name``.

        Raises:
            LookupError: there is no such span, or more than one.
        """
        found = [span for span in self.spans() if span.name == name]
        if len(found) != 1:
            names = [span.name for span in self.spans()]
            raise LookupError(f"expected one span named {name!r}, found {len(found)} in {names}")
        return found[0]

    def clear(self) -> None:
        """Forget the spans finished so far."""
        self.exporter.clear()


@contextmanager
def capture_spans(*, sampler: Sampler | None = None) -> Iterator[SpanCapture]:
    """Give a tracer whose finished spans are kept in memory, synchronously.

    Args:
        sampler: the provider's sampler; the SDK default (parent-based, always on) if
            omitted. ``ALWAYS_OFF`` gives valid but unsampled spans.

    Yields:
        The capture; the provider is shut down on exit.
    """
    from opentelemetry.sdk.trace.sampling import DEFAULT_ON

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler or DEFAULT_ON, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer(INSTRUMENTATION_NAME, schema_url=SCHEMA_URL)
    try:
        yield SpanCapture(tracer=tracer, provider=provider, exporter=exporter)
    finally:
        provider.shutdown()


@dataclass(frozen=True)
class MetricCapture:
    """What :func:`capture_metrics` yields.

    Attributes:
        meter: a meter on the private provider.
        instruments: ctxd's instruments on that meter.
        reader: the in-memory reader.
    """

    meter: Meter
    instruments: Instruments
    reader: InMemoryMetricReader

    def points(self, name: str) -> list[DataPointT]:
        """Collect now and return the data points of the metric called ``name``."""
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource_metrics in data.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@contextmanager
def capture_metrics() -> Iterator[MetricCapture]:
    """Give ctxd's instruments on a private meter read by an in-memory reader.

    Yields:
        The capture; the provider is shut down on exit.
    """
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = provider.get_meter(INSTRUMENTATION_NAME, schema_url=SCHEMA_URL)
    try:
        yield MetricCapture(meter=meter, instruments=Instruments.create(meter), reader=reader)
    finally:
        provider.shutdown()
