"""Settings from OTEL_* variables, and the providers open_telemetry builds from them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from opentelemetry import metrics, trace
from opentelemetry.trace import NonRecordingSpan

from telemetry.settings import SignalExport, TelemetryConfigError, TelemetrySettings
from telemetry.setup import open_telemetry
from telemetry.spans import process_span, record_route


def test_empty_environment_gives_quiet_defaults() -> None:
    """No endpoint, no export: a first run without a collector stays quiet."""
    settings = TelemetrySettings.from_env({})
    assert settings == TelemetrySettings()
    assert settings.disabled is False
    assert settings.service_name == "ctxd"
    assert settings.traces == SignalExport(exporter="none")
    assert settings.metrics == SignalExport(exporter="none")
    assert settings.sampler == "parentbased_always_on"
    assert settings.metric_export_interval == 60.0


def test_empty_values_count_as_unset() -> None:
    settings = TelemetrySettings.from_env(
        {"OTEL_SDK_DISABLED": "", "OTEL_TRACES_EXPORTER": " ", "OTEL_SERVICE_NAME": ""}
    )
    assert settings == TelemetrySettings()


def test_base_endpoint_enables_otlp_grpc_for_both_signals() -> None:
    settings = TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"})
    assert settings.traces == SignalExport("otlp", "grpc", "http://jaeger:4317")
    assert settings.metrics == SignalExport("otlp", "grpc", "http://jaeger:4317")


def test_http_appends_signal_paths_to_the_base_endpoint() -> None:
    settings = TelemetrySettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    )
    assert settings.traces.endpoint == "http://collector:4318/v1/traces"
    assert settings.metrics.endpoint == "http://collector:4318/v1/metrics"


def test_per_signal_endpoint_and_protocol_are_used_as_is() -> None:
    settings = TelemetrySettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example:443/custom",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4317",
        }
    )
    assert settings.traces == SignalExport(
        "otlp", "http/protobuf", "https://traces.example:443/custom"
    )
    assert settings.metrics == SignalExport("otlp", "grpc", "http://metrics:4317")


def test_signal_endpoint_enables_only_that_signal() -> None:
    settings = TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://j:4317"})
    assert settings.traces.exporter == "otlp"
    assert settings.metrics.exporter == "none"


@pytest.mark.parametrize(
    ("protocol", "traces", "metrics_"),
    [
        ("grpc", "http://localhost:4317", "http://localhost:4317"),
        ("http/protobuf", "http://localhost:4318/v1/traces", "http://localhost:4318/v1/metrics"),
    ],
)
def test_explicit_otlp_without_endpoint_uses_the_otlp_default(
    protocol: str, traces: str, metrics_: str
) -> None:
    settings = TelemetrySettings.from_env(
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "OTLP",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        }
    )
    assert settings.traces.endpoint == traces
    assert settings.metrics.endpoint == metrics_


def test_exporter_none_or_console_wins_over_an_endpoint() -> None:
    settings = TelemetrySettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317",
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_METRICS_EXPORTER": "none",
        }
    )
    assert settings.traces == SignalExport(exporter="console")
    assert settings.metrics == SignalExport(exporter="none")


def test_service_name_precedence() -> None:
    from_attributes = TelemetrySettings.from_env(
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=ops"}
    )
    assert from_attributes.service_name == "from-attrs"
    explicit = TelemetrySettings.from_env(
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs", "OTEL_SERVICE_NAME": "svc"}
    )
    assert explicit.service_name == "svc"


def test_resource_attributes_are_percent_decoded() -> None:
    settings = TelemetrySettings.from_env(
        {"OTEL_RESOURCE_ATTRIBUTES": " team = data%20ops , note=a%2Cb%3Dc ,"}
    )
    assert dict(settings.resource_attributes) == {"team": "data ops", "note": "a,b=c"}


def test_sampler_and_ratio() -> None:
    settings = TelemetrySettings.from_env(
        {"OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    )
    assert (settings.sampler, settings.sampler_arg) == ("parentbased_traceidratio", 0.25)
    ignored_arg = TelemetrySettings.from_env(
        {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    )
    assert ignored_arg.sampler_arg is None


def test_metric_interval_is_read_in_milliseconds() -> None:
    settings = TelemetrySettings.from_env(
        {"OTEL_METRIC_EXPORT_INTERVAL": "5000", "OTEL_METRIC_EXPORT_TIMEOUT": "250"}
    )
    assert (settings.metric_export_interval, settings.metric_export_timeout) == (5.0, 0.25)


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc, http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift", "grpc, http/protobuf"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "udp", "grpc, http/protobuf"),
        ("OTEL_TRACES_EXPORTER", "jaeger", "otlp, console, none"),
        ("OTEL_METRICS_EXPORTER", "prometheus", "otlp, console, none"),
        ("OTEL_TRACES_SAMPLER", "xray", "parentbased_always_on"),
        ("OTEL_SDK_DISABLED", "yes", "true or false"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0", ">= 1"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "soon", ">= 1"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "-1", ">= 0"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317", "http://host:port"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc://j:4317", "http://host:port"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team", "key=value"),
    ],
)
def test_bad_values_name_variable_value_and_what_is_allowed(
    variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(TelemetryConfigError) as raised:
        TelemetrySettings.from_env({variable: value})
    message = str(raised.value)
    assert variable in message
    assert repr(value) in message or value in message
    assert allowed in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("arg", ["1.5", "-0.1", "half", "nan"])
def test_bad_sampler_ratio_is_an_error(arg: str) -> None:
    with pytest.raises(TelemetryConfigError, match=r"OTEL_TRACES_SAMPLER_ARG=.*from 0 to 1"):
        TelemetrySettings.from_env(
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": arg}
        )


def test_disabled_sdk_gives_working_no_ops() -> None:
    settings = TelemetrySettings.from_env(
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://nowhere:4317"}
    )
    with open_telemetry(settings) as telemetry:
        assert telemetry.is_global is False
        with process_span(
            telemetry.tracer,
            stream="ctxd:in",
            group="ctxd",
            consumer="c-1",
            message_id=b"1-0",
            workflow_id="wf",
            delivery_count=1,
            parent=None,
        ) as span:
            assert not span.is_recording()
            record_route(
                telemetry.tracer,
                policy="analyzer",
                factors={"error_rate": 0.1},
                scores={"a": 1.0},
                viable=["a"],
                target="a",
                reason="score_max",
                margin=1.0,
                score=1.0,
            )
        telemetry.instruments.consumed_messages.add(1)
        telemetry.instruments.record_breaker_state("analysis", "open")
        assert telemetry.force_flush(1.0)
    assert not isinstance(trace.get_tracer_provider(), type(telemetry.tracer_provider))


def test_non_global_telemetry_leaves_the_global_providers_alone() -> None:
    before = trace.get_tracer_provider(), metrics.get_meter_provider()
    with open_telemetry(_console_traces(), set_global=False) as telemetry:
        assert telemetry.is_global is False
        with telemetry.tracer.start_as_current_span("work") as span:
            assert span.is_recording()
            assert not isinstance(span, NonRecordingSpan)
    assert (trace.get_tracer_provider(), metrics.get_meter_provider()) == before


def _console_traces() -> TelemetrySettings:
    return TelemetrySettings.from_env({"OTEL_TRACES_EXPORTER": "console"})


def test_spans_without_an_exporter_have_ids_but_are_not_recorded() -> None:
    """Nothing would receive them: no recording cost, yet logs and outputs get trace ids."""
    with open_telemetry(TelemetrySettings(), set_global=False) as unexported:
        tracer = unexported.tracer
        with (
            tracer.start_as_current_span("work") as span,
            tracer.start_as_current_span("in") as child,
        ):
            assert not span.is_recording()
            assert span.get_span_context().is_valid
            assert child.get_span_context().trace_id == span.get_span_context().trace_id
    exported = open_telemetry(_console_traces(), set_global=False)
    with exported, exported.tracer.start_as_current_span("work") as span:
        assert span.is_recording()


async def test_async_context_flushes_and_shutdown_is_idempotent() -> None:
    telemetry = open_telemetry(TelemetrySettings(), set_global=False)
    async with telemetry:
        assert telemetry.force_flush(1.0) is True
    telemetry.shutdown()  # a second shutdown is a no-op, not an SDK warning


def test_global_install_happens_once_per_process() -> None:
    """Run in a subprocess: global providers can be set only once per process."""
    script = textwrap.dedent(
        """
        from opentelemetry import metrics, trace
        from telemetry import TelemetrySettings, open_telemetry

        with open_telemetry(TelemetrySettings()) as first:
            assert first.is_global
            assert trace.get_tracer_provider() is first.tracer_provider
            assert metrics.get_meter_provider() is first.meter_provider
            tracer = trace.get_tracer("elsewhere")
            with tracer.start_as_current_span("global") as span:
                assert span.get_span_context().is_valid
        with open_telemetry(TelemetrySettings()) as second:
            assert not second.is_global
            assert trace.get_tracer_provider() is first.tracer_provider
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "already set" in result.stderr
