"""Thin span helpers with ctxd's span names, kinds and attributes.

Messaging spans follow the OpenTelemetry messaging conventions with
``messaging.system=redis`` (there is no registered value for Redis Streams; ``redis``
matches ``db.system.name``). The GenAI ``invoke_workflow`` span wraps a LangGraph run.
Routing decisions and breaker transitions have no convention, so their names are ctxd's
own (``ctxd.`` prefix) and they carry attributes only, never span events.

Actor request/response over streams needs no helpers of its own: the asker wraps the
``XADD`` to ``ctxd:actor:{kind}`` in :func:`send_span` (a PRODUCER ``send
ctxd:actor:{kind}``) and puts :func:`telemetry.inject_fields` into the request; the
worker handles it in :func:`process_span` with the extracted context as parent (a
CONSUMER ``process ctxd:actor:{kind}``), and its reply ``XADD`` is another
:func:`send_span`.

Exceptions leaving a span helper mark the span: status ERROR with the exception's
type and message, ``error.type`` set to the exception's type name, and the exception
recorded. Cancellation (a ``BaseException``) is not an error and leaves the status unset.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

__all__ = [
    "node_span",
    "process_span",
    "record_breaker_transition",
    "record_error",
    "record_route",
    "send_span",
    "set_message_id",
    "workflow_span",
]

_MESSAGING_SYSTEM = "redis"


def record_error(span: Span, error: Exception) -> None:
    """Mark ``span`` as failed by ``error`` (status, ``error.type``, the exception).

    The span helpers do this for exceptions that leave them; call it yourself when you
    handle a failure without re-raising it (dead-lettering an entry, say).

    Args:
        span: the span to mark.
        error: the failure.
    """
    span.set_attribute("error.type", _error_type(error))
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def _error_type(error: Exception) -> str:
    cls = type(error)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


@contextmanager
def _span(
    tracer: Tracer,
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue],
    context: Context | None = None,
    links: Sequence[Link] = (),
) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as error:
            record_error(span, error)
            raise


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


@contextmanager
def process_span(
    tracer: Tracer,
    *,
    stream: str,
    group: str,
    consumer: str,
    message_id: str | bytes,
    workflow_id: str | None,
    delivery_count: int,
    parent: Context | None,
) -> Iterator[Span]:
    """Open the CONSUMER span ``process {stream}`` for handling one stream entry.

    ctxd makes the producer's span the parent (so Jaeger shows one trace per event)
    and also links to it, as the messaging conventions do by default. An entry without
    a valid ``traceparent`` starts a new trace: the span is a root, never a child of
    whatever the consuming task happens to have as current span.

    Args:
        tracer: the tracer to use.
        stream: the stream key (``messaging.destination.name``).
        group: the consumer group.
        consumer: the consumer's name (``messaging.client.id``).
        message_id: the entry id as redis-py returns it.
        workflow_id: the workflow the entry belongs to, when known
            (``messaging.message.conversation_id``).
        delivery_count: how many times the entry has been delivered, this time included.
        parent: the context extracted from the entry (:func:`telemetry.extract_context`).

    Yields:
        The span, current for the duration of the block.
    """
    producer = (
        trace.get_current_span(parent).get_span_context()
        if parent is not None
        else trace.INVALID_SPAN_CONTEXT
    )
    attributes: dict[str, AttributeValue] = {
        "messaging.system": _MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": stream,
        "messaging.consumer.group.name": group,
        "messaging.client.id": consumer,
        "messaging.message.id": _text(message_id),
        "ctxd.delivery_count": delivery_count,
    }
    if workflow_id is not None:
        attributes["messaging.message.conversation_id"] = workflow_id
    if producer.is_valid:
        context, links = parent, [Link(producer)]
    else:
        context, links = Context(), []
    with _span(
        tracer,
        f"process {stream}",
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        context=context,
        links=links,
    ) as span:
        yield span


@contextmanager
def send_span(tracer: Tracer, *, stream: str, workflow_id: str | None = None) -> Iterator[Span]:
    """Open the PRODUCER span ``send {stream}`` around one ``XADD``.

    Inject the context inside the block so the consumer continues this span::

        with send_span(tracer, stream=key, workflow_id=wid) as span:
            entry_id = await redis.xadd(key, {**fields, **inject_fields()})
            set_message_id(span, entry_id)

    Args:
        tracer: the tracer to use.
        stream: the stream key.
        workflow_id: the workflow the entry belongs to, when there is one.

    Yields:
        The span, current for the duration of the block.
    """
    attributes: dict[str, AttributeValue] = {
        "messaging.system": _MESSAGING_SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": stream,
    }
    if workflow_id is not None:
        attributes["messaging.message.conversation_id"] = workflow_id
    with _span(tracer, f"send {stream}", kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield span


def set_message_id(span: Span, message_id: str | bytes) -> None:
    """Set ``messaging.message.id`` once ``XADD`` has returned the entry id.

    Args:
        span: the ``send`` span.
        message_id: the id as redis-py returns it (bytes or text).
    """
    span.set_attribute("messaging.message.id", _text(message_id))


@contextmanager
def workflow_span(
    tracer: Tracer, *, conversation_id: str, name: str = "contextual"
) -> Iterator[Span]:
    """Open the INTERNAL span ``invoke_workflow {name}`` around one workflow run.

    Args:
        tracer: the tracer to use.
        conversation_id: the LangGraph thread id, i.e. the workflow id.
        name: the workflow's name.

    Yields:
        The span, current for the duration of the block.
    """
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.workflow.name": name,
        "gen_ai.conversation.id": conversation_id,
    }
    with _span(
        tracer, f"invoke_workflow {name}", kind=SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield span


@contextmanager
def node_span(tracer: Tracer, node: str, step: int) -> Iterator[Span]:
    """Open the INTERNAL span named after a workflow node, around one run of it.

    Args:
        tracer: the tracer to use.
        node: the node's name (``context_analyzer``…).
        step: the graph step the node runs in.

    Yields:
        The span, current for the duration of the block.
    """
    attributes: dict[str, AttributeValue] = {"ctxd.graph.node": node, "ctxd.graph.step": step}
    with _span(tracer, node, kind=SpanKind.INTERNAL, attributes=attributes) as span:
        yield span


def record_route(
    tracer: Tracer,
    *,
    policy: str,
    factors: Mapping[str, float | int | str | bool],
    scores: Mapping[str, float],
    viable: Sequence[str],
    target: str,
    reason: str,
    margin: float,
    score: float | None,
) -> SpanContext:
    """Record one routing decision as the INTERNAL span ``route {policy}``.

    The span is a child of the current span and carries the whole explanation as
    attributes: ``ctxd.routing.factor.<name>`` per input factor,
    ``ctxd.routing.score.<candidate>`` per scored candidate, ``ctxd.routing.viable``,
    and ``ctxd.routing.result.target``/``.reason``/``.margin``/``.score``. Its status
    stays unset: a fallback or breaker-forced route is a decision, not an error.

    Args:
        tracer: the tracer to use.
        policy: the routing policy (``analyzer``, ``decision``…).
        factors: the inputs the decision was made from; keep this to a few dozen.
        scores: every candidate's score.
        viable: the candidates that were allowed.
        target: the chosen route.
        reason: why (``score_max|fallback|override|breaker_open|default|error``).
        margin: the chosen score minus the runner-up's.
        score: the chosen candidate's score, when it had one.

    Returns:
        The recorded span's context (to link to it, say).
    """
    attributes: dict[str, AttributeValue] = {"ctxd.routing.policy": policy}
    attributes.update({f"ctxd.routing.factor.{k}": v for k, v in factors.items()})
    attributes.update({f"ctxd.routing.score.{k}": float(v) for k, v in scores.items()})
    attributes["ctxd.routing.viable"] = tuple(viable)
    attributes["ctxd.routing.result.target"] = target
    attributes["ctxd.routing.result.reason"] = reason
    attributes["ctxd.routing.result.margin"] = float(margin)
    if score is not None:
        attributes["ctxd.routing.result.score"] = float(score)
    span = tracer.start_span(f"route {policy}", kind=SpanKind.INTERNAL, attributes=attributes)
    span.end()
    return span.get_span_context()


def record_breaker_transition(
    tracer: Tracer,
    *,
    name: str,
    from_state: str,
    to_state: str,
    trigger: str,
    failure_rate: float | None,
    window_calls: int | None,
    error_type: str | None = None,
    link: SpanContext | None = None,
) -> SpanContext:
    """Record a circuit-breaker transition as ``circuit_breaker.transition {name}``.

    Called from inside the call that caused it, the span is that call's child.
    Called with no current span (a timer moving ``open`` to ``half_open``), it is
    the root of a new trace; either way it links to ``link``, usually the span that
    opened the breaker.

    Args:
        tracer: the tracer to use.
        name: the breaker's name.
        from_state: ``closed|open|half_open|forced_open``.
        to_state: ``closed|open|half_open|forced_open``.
        trigger: ``failure_rate|slow_call_rate|break_elapsed|probe_succeeded|
            probe_failed|manual``.
        failure_rate: the window's failure rate (0..1), when there is one.
        window_calls: the calls in the window, when there is one.
        error_type: the type of the failure that tripped it, if any.
        link: a span to link to.

    Returns:
        The recorded span's context, to pass as ``link`` to the next transition.
    """
    attributes: dict[str, AttributeValue] = {
        "ctxd.circuit_breaker.name": name,
        "ctxd.circuit_breaker.state.from": from_state,
        "ctxd.circuit_breaker.state.to": to_state,
        "ctxd.circuit_breaker.trigger": trigger,
    }
    if failure_rate is not None:
        attributes["ctxd.circuit_breaker.failure_rate"] = float(failure_rate)
    if window_calls is not None:
        attributes["ctxd.circuit_breaker.window.calls"] = window_calls
    if error_type is not None:
        attributes["error.type"] = error_type
    current = trace.get_current_span().get_span_context()
    span = tracer.start_span(
        f"circuit_breaker.transition {name}",
        # An explicit empty context makes the timer-driven case a root span.
        context=None if current.is_valid else Context(),
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        links=[Link(link)] if link is not None and link.is_valid else (),
    )
    span.end()
    return span.get_span_context()
