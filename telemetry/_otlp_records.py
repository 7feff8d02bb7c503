"""OTLP export requests decoded into simple frozen records, for tests.

Used by :class:`telemetry.testing.OtlpReceiver`; import the records from
:mod:`telemetry.testing`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.trace import SpanKind, StatusCode

__all__ = [
    "ReceivedLink",
    "ReceivedMetric",
    "ReceivedPoint",
    "ReceivedSpan",
    "ReceivedValue",
    "Transport",
    "decode_metrics",
    "decode_spans",
]

ReceivedValue: TypeAlias = (
    "str | bool | int | float | bytes | tuple[ReceivedValue, ...] | "
    "Mapping[str, ReceivedValue] | None"
)
Transport: TypeAlias = Literal["grpc", "http"]

_KINDS: Mapping[int, SpanKind] = {
    ProtoSpan.SPAN_KIND_INTERNAL: SpanKind.INTERNAL,
    ProtoSpan.SPAN_KIND_SERVER: SpanKind.SERVER,
    ProtoSpan.SPAN_KIND_CLIENT: SpanKind.CLIENT,
    ProtoSpan.SPAN_KIND_PRODUCER: SpanKind.PRODUCER,
    ProtoSpan.SPAN_KIND_CONSUMER: SpanKind.CONSUMER,
}
_STATUS: Mapping[int, StatusCode] = {0: StatusCode.UNSET, 1: StatusCode.OK, 2: StatusCode.ERROR}


def _value(value: AnyValue) -> ReceivedValue:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bytes_value":
        return value.bytes_value
    if which == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, ReceivedValue]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ReceivedLink:
    """A span link as received. Ids are lowercase hex."""

    trace_id: str
    span_id: str
    attributes: Mapping[str, ReceivedValue]


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as an OTLP receiver saw it, decoded.

    Attributes:
        name: the span name.
        kind: the span kind.
        trace_id: 32 lowercase hex digits.
        span_id: 16 lowercase hex digits.
        parent_span_id: 16 lowercase hex digits, or ``""`` for a root span.
        attributes: the span's attributes.
        links: the span's links.
        status_code: the span's status.
        status_message: the status description.
        resource: the resource's attributes.
        scope_name: the instrumentation scope's name.
        schema_url: the instrumentation scope's schema URL.
        transport: how it arrived, ``grpc`` or ``http``.
    """

    name: str
    kind: SpanKind
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: Mapping[str, ReceivedValue]
    links: tuple[ReceivedLink, ...]
    status_code: StatusCode
    status_message: str
    resource: Mapping[str, ReceivedValue]
    scope_name: str
    schema_url: str
    transport: Transport


@dataclass(frozen=True)
class ReceivedPoint:
    """One data point of a received metric.

    Attributes:
        attributes: the point's attributes.
        value: the value of a sum or gauge point; ``None`` for histograms.
        count: a histogram point's count; ``None`` otherwise.
        total: a histogram point's sum; ``None`` otherwise.
        explicit_bounds: a histogram point's bucket boundaries.
        bucket_counts: a histogram point's bucket counts.
    """

    attributes: Mapping[str, ReceivedValue]
    value: float | int | None = None
    count: int | None = None
    total: float | None = None
    explicit_bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReceivedMetric:
    """A metric as an OTLP receiver saw it in one export, decoded.

    Attributes:
        name: the metric name.
        unit: the unit.
        data_type: ``sum``, ``gauge``, ``histogram``, ``exponential_histogram`` or
            ``summary``.
        points: the data points (sums, gauges and histograms only).
        resource: the resource's attributes.
        scope_name: the instrumentation scope's name.
        transport: how it arrived, ``grpc`` or ``http``.
    """

    name: str
    unit: str
    data_type: str
    points: tuple[ReceivedPoint, ...]
    resource: Mapping[str, ReceivedValue]
    scope_name: str
    transport: Transport


def decode_spans(request: ExportTraceServiceRequest, transport: Transport) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                links = tuple(
                    ReceivedLink(
                        trace_id=link.trace_id.hex(),
                        span_id=link.span_id.hex(),
                        attributes=_attributes(link.attributes),
                    )
                    for link in span.links
                )
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                        links=links,
                        status_code=_STATUS.get(span.status.code, StatusCode.UNSET),
                        status_message=span.status.message,
                        resource=resource,
                        scope_name=scope_spans.scope.name,
                        schema_url=scope_spans.schema_url,
                        transport=transport,
                    )
                )
    return spans


def decode_metrics(
    request: ExportMetricsServiceRequest, transport: Transport
) -> list[ReceivedMetric]:
    metrics: list[ReceivedMetric] = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                data_type = metric.WhichOneof("data") or ""
                points: list[ReceivedPoint] = []
                if data_type in ("sum", "gauge"):
                    number_points = (
                        metric.sum.data_points if data_type == "sum" else metric.gauge.data_points
                    )
                    for point in number_points:
                        number: float | int = (
                            point.as_int
                            if point.WhichOneof("value") == "as_int"
                            else point.as_double
                        )
                        points.append(
                            ReceivedPoint(attributes=_attributes(point.attributes), value=number)
                        )
                elif data_type == "histogram":
                    for hpoint in metric.histogram.data_points:
                        points.append(
                            ReceivedPoint(
                                attributes=_attributes(hpoint.attributes),
                                count=hpoint.count,
                                total=hpoint.sum,
                                explicit_bounds=tuple(hpoint.explicit_bounds),
                                bucket_counts=tuple(hpoint.bucket_counts),
                            )
                        )
                metrics.append(
                    ReceivedMetric(
                        name=metric.name,
                        unit=metric.unit,
                        data_type=data_type,
                        points=tuple(points),
                        resource=resource,
                        scope_name=scope_metrics.scope.name,
                        transport=transport,
                    )
                )
    return metrics
