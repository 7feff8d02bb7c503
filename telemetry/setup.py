"""Building, installing and shutting down the tracer and meter providers.

:func:`open_telemetry` builds both providers from :class:`~telemetry.TelemetrySettings`
and returns a :class:`Telemetry`, a context manager (``with`` or ``async with``). Entering
it installs the providers as the process-wide (global) ones; leaving it flushes and shuts
them down. That exit is how a SIGTERM flushes the batch span processor: the daemon traps
the signal, unwinds, and leaves the context. The SDK's ``atexit`` hook alone would not run
on an unhandled SIGTERM.

OpenTelemetry lets the global providers be set **once per process**; a second attempt
is ignored with a warning. Tests therefore use ``set_global=False`` and take the tracer
and meter from the :class:`Telemetry` object (or run the global case in a subprocess).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import TYPE_CHECKING, Final

import anyio
from opentelemetry import metrics, trace
from opentelemetry.metrics import Meter, MeterProvider, NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider, Tracer, TracerProvider

from telemetry.metrics import DURATION_BUCKETS, Instruments
from telemetry.settings import SignalExport, TelemetrySettings

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

__all__ = ["INSTRUMENTATION_NAME", "SCHEMA_URL", "Telemetry", "open_telemetry"]

_logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME: Final = "ctxd"
"""The instrumentation scope of ctxd's tracer and meter."""

SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.44.0"
"""The semantic-conventions version ctxd's names follow (opentelemetry-semantic-conventions
0.66b2). Messaging and GenAI conventions are still in development, so the version is
pinned on the tracer and meter."""


def _scope_version() -> str | None:
    try:
        return version("ctxd")
    except PackageNotFoundError:
        return None


class Telemetry:
    """ctxd's tracer, meter and instruments, and the providers behind them.

    Use it as a context manager (``with`` or ``async with``): entering installs the
    providers globally when asked to, leaving flushes and shuts them down. With the SDK
    disabled everything is a no-op and still usable.

    Attributes:
        settings: what it was built from.
        tracer: ctxd's tracer (schema URL :data:`SCHEMA_URL`).
        meter: ctxd's meter.
        instruments: ctxd's metric instruments, created on :attr:`meter`.
        tracer_provider: the provider behind :attr:`tracer`.
        meter_provider: the provider behind :attr:`meter`.
    """

    def __init__(
        self,
        settings: TelemetrySettings,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        *,
        set_global: bool,
        shutdown_timeout: float,
    ) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        scope_version = _scope_version()
        self.tracer: Tracer = tracer_provider.get_tracer(
            INSTRUMENTATION_NAME, scope_version, schema_url=SCHEMA_URL
        )
        self.meter: Meter = meter_provider.get_meter(
            INSTRUMENTATION_NAME, scope_version, schema_url=SCHEMA_URL
        )
        self.instruments = Instruments.create(self.meter)
        self._set_global = set_global
        self._shutdown_timeout = shutdown_timeout
        self._is_global = False
        self._closed = False

    @property
    def is_global(self) -> bool:
        """Whether the providers were installed as the process-wide ones."""
        return self._is_global

    def install_global(self) -> bool:
        """Install the providers as the global ones (done on entering the context).

        The global providers can be set once per process; a later attempt leaves the
        earlier ones in place and logs a warning. Nothing is installed when the SDK
        is disabled (the API's defaults are no-ops already).

        Returns:
            Whether this object's providers are now the global ones.
        """
        if self.settings.disabled:
            return False
        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self._is_global = (
            trace.get_tracer_provider() is self.tracer_provider
            and metrics.get_meter_provider() is self.meter_provider
        )
        if not self._is_global:
            _logger.warning(
                "global OpenTelemetry providers were already set in this process; "
                "ctxd's telemetry stays local to its Telemetry object"
            )
        return self._is_global

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Export everything buffered now.

        Args:
            timeout: seconds to wait, for spans and metrics each.

        Returns:
            Whether both providers flushed in time and without error.
        """
        flush_spans = getattr(self.tracer_provider, "force_flush", None)
        flush_metrics = getattr(self.meter_provider, "force_flush", None)
        ok = True
        for flush in (flush_spans, flush_metrics):
            if flush is None:
                continue
            try:
                ok = bool(flush(timeout_millis=int(timeout * 1000))) and ok
            except Exception:  # the SDK raises a bare Exception on reader errors
                _logger.warning("telemetry flush failed", exc_info=True)
                ok = False
        return ok

    def shutdown(self) -> None:
        """Flush, then shut both providers down; later calls do nothing.

        Never raises: a failing exporter must not hide the error that ended the
        service. Failures are logged.
        """
        if self._closed:
            return
        self._closed = True
        self.force_flush(self._shutdown_timeout)
        for provider in (self.tracer_provider, self.meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is None:
                continue
            try:
                shutdown()
            except Exception:  # see the docstring
                _logger.warning("telemetry shutdown failed", exc_info=True)

    def __enter__(self) -> Telemetry:
        if self._set_global:
            self.install_global()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    async def __aenter__(self) -> Telemetry:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Flushing blocks on network I/O: do it off the event loop, and finish it even
        # when the surrounding scope is being cancelled (that is the SIGTERM path).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.shutdown)


def open_telemetry(
    settings: TelemetrySettings,
    *,
    set_global: bool = True,
    shutdown_timeout: float = 10.0,
) -> Telemetry:
    """Build ctxd's tracer and meter providers from ``settings``.

    * Traces: an SDK ``TracerProvider`` with the configured sampler and resource, and a
      ``BatchSpanProcessor`` feeding the OTLP gRPC or HTTP exporter (or the console
      one). With no exporter, spans are still created with valid ids, so log lines
      and outputs carry trace ids, but they are not recorded (sampler ``always_off``).
    * Metrics: an SDK ``MeterProvider`` with a ``PeriodicExportingMetricReader`` when
      metrics are exported, and a view giving every histogram in seconds the bucket
      boundaries :data:`telemetry.DURATION_BUCKETS`. Temporality is the exporter's
      default (cumulative unless ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``).
    * Disabled SDK: the API's no-op providers.

    Args:
        settings: usually ``TelemetrySettings.from_env(os.environ)``.
        set_global: install the providers globally on entering the context. Do this
            once per process (the daemon); tests pass ``False``.
        shutdown_timeout: seconds the final flush may take, per signal.

    Returns:
        The telemetry, not yet entered.
    """
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    if settings.disabled:
        tracer_provider, meter_provider = NoOpTracerProvider(), NoOpMeterProvider()
    else:
        tracer_provider, meter_provider = _sdk_providers(settings)
    return Telemetry(
        settings,
        tracer_provider,
        meter_provider,
        set_global=set_global,
        shutdown_timeout=shutdown_timeout,
    )


def _sdk_providers(settings: TelemetrySettings) -> tuple[TracerProvider, MeterProvider]:
    # Imported here so a disabled SDK costs nothing more than the API.
    from opentelemetry.sdk.metrics import Histogram
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace import sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Explicit attributes win over what Resource.create detects from os.environ.
    resource = Resource.create(
        {**settings.resource_attributes, SERVICE_NAME: settings.service_name}
    )
    span_exporter = _span_exporter(settings.traces)
    # With nowhere to send spans, recording them is pure cost (~1 ms per event,
    # docs/performance.md): spans still get valid ids, so log lines and outputs carry
    # a trace_id and the context still travels to the actors, but nothing is recorded.
    sampler = _sampler(settings) if span_exporter is not None else sampling.ALWAYS_OFF
    tracer_provider = SdkTracerProvider(sampler=sampler, resource=resource)
    if span_exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))

    readers: list[MetricReader] = []
    metric_exporter = _metric_exporter(settings.metrics)
    if metric_exporter is not None:
        readers.append(
            PeriodicExportingMetricReader(
                metric_exporter,
                export_interval_millis=settings.metric_export_interval * 1000,
                export_timeout_millis=settings.metric_export_timeout * 1000,
            )
        )
    seconds_histograms = View(
        instrument_type=Histogram,
        instrument_unit="s",
        aggregation=ExplicitBucketHistogramAggregation(list(DURATION_BUCKETS)),
    )
    meter_provider = SdkMeterProvider(
        metric_readers=readers, resource=resource, views=[seconds_histograms]
    )
    return tracer_provider, meter_provider


def _sampler(settings: TelemetrySettings) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    ratio = 1.0 if settings.sampler_arg is None else settings.sampler_arg
    samplers: dict[str, Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.DEFAULT_ON,
        "parentbased_always_off": sampling.DEFAULT_OFF,
    }
    if settings.sampler == "traceidratio":
        return sampling.TraceIdRatioBased(ratio)
    if settings.sampler == "parentbased_traceidratio":
        return sampling.ParentBasedTraceIdRatio(ratio)
    return samplers[settings.sampler]


def _span_exporter(export: SignalExport) -> SpanExporter | None:
    if export.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if export.exporter == "none" or export.endpoint is None:
        return None
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=export.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=export.endpoint)


def _metric_exporter(export: SignalExport) -> MetricExporter | None:
    if export.exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if export.exporter == "none" or export.endpoint is None:
        return None
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter(endpoint=export.endpoint)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=export.endpoint)
