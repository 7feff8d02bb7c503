"""Trace context through stream fields, including redis-py's bytes."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from telemetry.propagation import extract_context, inject_fields
from telemetry.spans import process_span, send_span
from telemetry.testing import capture_spans

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _span_context(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


def test_inject_outside_a_span_gives_no_fields() -> None:
    assert inject_fields() == {}


def test_inject_gives_the_current_span_and_omits_empty_tracestate() -> None:
    with capture_spans() as capture, capture.tracer.start_as_current_span("send") as span:
        fields = inject_fields()
    context = span.get_span_context()
    assert set(fields) == {"traceparent"}
    version, trace_id, span_id, flags = fields["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    )
    assert int(flags, 16) == context.trace_flags


def test_inject_carries_tracestate_and_unsampled_parents() -> None:
    remote = SpanContext(
        TRACE_ID,
        SPAN_ID,
        is_remote=True,
        trace_flags=TraceFlags(0),
        trace_state=TraceState([("vendor", "value")]),
    )
    context = trace.set_span_in_context(NonRecordingSpan(remote))
    assert inject_fields(context) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "tracestate": "vendor=value",
    }


def test_extract_reads_redis_py_bytes_fields() -> None:
    """redis-py returns bytes; the global propagate.extract silently gets nothing from them."""
    fields = {
        b"workflow_id": b"wf-1",
        b"payload": b'{"x": 1}',
        b"traceparent": TRACEPARENT.encode(),
        b"tracestate": b"vendor=value",
    }
    assert not _span_context(propagate.extract(fields)).is_valid  # the pitfall

    span_context = _span_context(extract_context(fields))
    assert span_context.is_valid
    assert span_context.is_remote
    assert (span_context.trace_id, span_context.span_id) == (TRACE_ID, SPAN_ID)
    assert span_context.trace_flags.sampled
    assert span_context.trace_state == TraceState([("vendor", "value")])


def test_extract_reads_text_fields() -> None:
    span_context = _span_context(extract_context({"traceparent": TRACEPARENT}))
    assert (span_context.trace_id, span_context.span_id) == (TRACE_ID, SPAN_ID)


def test_extract_without_or_with_a_bad_traceparent_is_empty_not_the_current_span() -> None:
    with capture_spans() as capture, capture.tracer.start_as_current_span("consumer loop"):
        assert not _span_context(extract_context({b"workflow_id": b"wf"})).is_valid
        assert not _span_context(extract_context({b"traceparent": b"00-zz-yy-01"})).is_valid
        assert not _span_context(extract_context({b"traceparent": b"\xff\xfe"})).is_valid


def test_round_trip_through_bytes_makes_process_the_child_of_send() -> None:
    """XADD with inject_fields, read back as bytes, process: one trace, parent and link."""
    with capture_spans() as capture:
        with send_span(capture.tracer, stream="ctxd:in") as sent:
            entry = {"workflow_id": "wf-1", **inject_fields()}
        as_redis_returns_it = {k.encode(): v.encode() for k, v in entry.items()}
        with process_span(
            capture.tracer,
            stream="ctxd:in",
            group="ctxd",
            consumer="c",
            message_id=b"1-0",
            workflow_id="wf-1",
            delivery_count=1,
            parent=extract_context(as_redis_returns_it),
        ) as processed:
            pass
    send_context = sent.get_span_context()
    process = capture.named("process ctxd:in")
    assert processed.get_span_context().trace_id == send_context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == send_context.span_id
    assert [link.context.span_id for link in process.links] == [send_context.span_id]
