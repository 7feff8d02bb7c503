"""How ctxd is seen: OpenTelemetry tracing and metrics, trace-context propagation
through stream fields, and structlog set-up.

``telemetry`` depends on neither ``graph`` nor ``actors``; they use it through the span
helpers and instruments re-exported here. Test helpers live in :mod:`telemetry.testing`.
"""

from __future__ import annotations

from telemetry.logging import add_trace_context, configure_logging, redact_url
from telemetry.metrics import BREAKER_STATES, DURATION_BUCKETS, Instruments, StreamReading
from telemetry.propagation import StreamFields, extract_context, inject_fields
from telemetry.settings import (
    ExporterKind,
    OtlpProtocol,
    SignalExport,
    TelemetryConfigError,
    TelemetrySettings,
)
from telemetry.setup import INSTRUMENTATION_NAME, SCHEMA_URL, Telemetry, open_telemetry
from telemetry.spans import (
    node_span,
    process_span,
    record_breaker_transition,
    record_error,
    record_route,
    send_span,
    set_message_id,
    workflow_span,
)

__all__ = [
    "BREAKER_STATES",
    "DURATION_BUCKETS",
    "INSTRUMENTATION_NAME",
    "SCHEMA_URL",
    "ExporterKind",
    "Instruments",
    "OtlpProtocol",
    "SignalExport",
    "StreamFields",
    "StreamReading",
    "Telemetry",
    "TelemetryConfigError",
    "TelemetrySettings",
    "add_trace_context",
    "configure_logging",
    "extract_context",
    "inject_fields",
    "node_span",
    "open_telemetry",
    "process_span",
    "record_breaker_transition",
    "record_error",
    "record_route",
    "redact_url",
    "send_span",
    "set_message_id",
    "workflow_span",
]
