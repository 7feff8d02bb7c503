"""Spans and metrics of the contextual workflow, one trace per event.

The ingress hands a run several events of one workflow, but every event keeps its own
trace. Each event dict carries the W3C ``traceparent`` (and ``tracestate``) of its
``process`` span; when the analyzer takes an event (:func:`begin_event`), the run opens
``invoke_workflow contextual`` for that event as a child of that context, and every node
span from then on, until the next event is taken, is a child of it. Routing spans
(:func:`record_route`) are children of the node span that decided.

Three context variables connect the pieces without globals:

* :func:`run_scope` (entered by :func:`graph.workflow.run_events`) holds the run's
  current event span; LangGraph's node tasks copy the caller's context, so every node
  of the run sees the same holder.
* :func:`traced_node` (the wrapper :func:`graph.workflow.build_contextual_workflow` puts
  around every node) holds the node's span and the tracer and instruments to use.
* ``structlog`` context variables bound by the caller (``workflow_id``) reach the nodes
  the same way.

Cost per node run: one span and one histogram record; per event one more span; no
state is ever copied into attributes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog
from langchain_core.runnables import RunnableConfig
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer

from telemetry.metrics import Instruments
from telemetry.propagation import extract_context, inject_fields
from telemetry.setup import INSTRUMENTATION_NAME, SCHEMA_URL
from telemetry.spans import record_error
from telemetry.spans import record_route as _record_route_span

__all__ = [
    "GraphTelemetry",
    "TracedNode",
    "begin_event",
    "event_trace_fields",
    "record_route",
    "run_scope",
    "traced_node",
]

_S = TypeVar("_S")
_R = TypeVar("_R")
_S_contra = TypeVar("_S_contra", contravariant=True)
_R_co = TypeVar("_R_co", covariant=True)


class TracedNode(Protocol[_S_contra, _R_co]):
    """A node function taking LangGraph's run config, as :func:`traced_node` returns."""

    def __call__(self, state: _S_contra, config: RunnableConfig) -> Awaitable[_R_co]:
        """Run the node on ``state``."""
        ...


_log = structlog.get_logger("ctxd.graph")


@dataclass(frozen=True)
class GraphTelemetry:
    """The tracer and instruments the workflow records with.

    Attributes:
        tracer: usually :attr:`telemetry.Telemetry.tracer`.
        instruments: ``ctxd.graph.node.duration`` and ``ctxd.routing.decisions`` are
            recorded on these; ``None`` records no metrics.
    """

    tracer: Tracer
    instruments: Instruments | None = None

    @classmethod
    def from_global(cls) -> GraphTelemetry:
        """The global tracer (a proxy until a provider is installed), no metrics."""
        return cls(trace.get_tracer(INSTRUMENTATION_NAME, schema_url=SCHEMA_URL))


class _RunTrace:
    """One run's current event: its ``invoke_workflow`` span and that span's context."""

    __slots__ = ("base", "context", "event_id", "span", "workflow_id")

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.base = otel_context.get_current()
        self.event_id: str | None = None
        self.span: Span | None = None
        self.context: Context | None = None

    def begin(self, tracer: Tracer, event: Mapping[str, object]) -> None:
        self.end()
        parent = extract_context(_carrier(event))
        if not trace.get_current_span(parent).get_span_context().is_valid:
            parent = self.base  # no trace given: whatever the caller had (often a root)
        event_id = str(event.get("event_id") or "")
        self.event_id = event_id
        self.span = tracer.start_span(
            "invoke_workflow contextual",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "invoke_workflow",
                "gen_ai.workflow.name": "contextual",
                "gen_ai.conversation.id": self.workflow_id,
                "ctxd.event_id": event_id,
            },
        )
        self.context = trace.set_span_in_context(self.span, parent)
        _log.debug("event started", event_id=event_id, **_ids(self.span))

    def fail(self, error: Exception) -> None:
        if self.span is not None:
            record_error(self.span, error)

    def end(self) -> None:
        if self.span is None:
            return
        _log.debug("event finished", event_id=self.event_id, **_ids(self.span))
        self.span.end()
        self.span = self.context = self.event_id = None


def _ids(span: Span) -> dict[str, str]:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def _carrier(event: Mapping[str, object]) -> dict[str, str]:
    return {k: str(v) for k in ("traceparent", "tracestate") if (v := event.get(k))}


class _NodeScope:
    """The span of one node run; re-opened under the next event when the analyzer
    moves on to it within the same run of the node."""

    __slots__ = ("_token", "name", "span", "step", "telemetry")

    def __init__(self, telemetry: GraphTelemetry, name: str, step: int) -> None:
        self.telemetry = telemetry
        self.name = name
        self.step = step
        self.span: Span | None = None
        self._token: object | None = None

    def open(self, parent: Context | None) -> None:
        self.close()
        self.span = self.telemetry.tracer.start_span(
            self.name,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={"ctxd.graph.node": self.name, "ctxd.graph.step": self.step},
        )
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def close(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        if self.span is not None:
            self.span.end()
            self.span = None


_RUN: ContextVar[_RunTrace | None] = ContextVar("ctxd_graph_run", default=None)
_NODE: ContextVar[_NodeScope | None] = ContextVar("ctxd_graph_node", default=None)


@contextmanager
def run_scope(workflow_id: str) -> Iterator[None]:
    """Track the current event of one run (used by :func:`graph.workflow.run_events`).

    The last event's ``invoke_workflow`` span ends with the scope; an exception leaving
    the scope marks it as failed.

    Args:
        workflow_id: the run's thread id (``gen_ai.conversation.id``).
    """
    run = _RunTrace(workflow_id)
    token = _RUN.set(run)
    try:
        yield
    except Exception as exc:
        run.fail(exc)
        raise
    finally:
        _RUN.reset(token)
        run.end()


def begin_event(event: Mapping[str, object]) -> None:
    """The analyzer took ``event``: from here on, node spans belong to its trace.

    Ends the previous event's ``invoke_workflow`` span, opens this event's (a child of
    the context in the event's ``traceparent``), and moves the running node's span under
    it. Does nothing outside a traced node of a run.

    Args:
        event: the event dict as the ingress built it (``event_id``, ``traceparent``…).
    """
    run, scope = _RUN.get(), _NODE.get()
    if run is None or scope is None:
        return
    scope.close()
    run.begin(scope.telemetry.tracer, event)
    scope.open(run.context)


def event_trace_fields(span: Span) -> dict[str, str]:
    """The ``traceparent``/``tracestate`` entries to put in an event dict for ``span``.

    Args:
        span: the event's ``process`` span.

    Returns:
        The fields; empty when the span is not valid (tracing off).
    """
    return inject_fields(trace.set_span_in_context(span, Context()))


def traced_node(
    name: str, fn: Callable[[_S], Awaitable[_R]], telemetry: GraphTelemetry
) -> TracedNode[_S, _R]:
    """Wrap a node function so every run of it is a span and a duration measurement.

    The span is a child of the run's current event span (see :func:`begin_event`); the
    analyzer's span opens only once it has an event. ``ctxd.graph.node.duration`` is
    recorded per run with ``ctxd.graph.node`` (and ``error.type`` when it raised).

    Args:
        name: the node's name, also the span's.
        fn: the node function.
        telemetry: the tracer and instruments.

    Returns:
        The node function to register with LangGraph (it takes the run's config).
    """
    instruments = telemetry.instruments

    async def node(state: _S, config: RunnableConfig) -> _R:
        metadata = config.get("metadata") or {}
        scope = _NodeScope(telemetry, name, int(metadata.get("langgraph_step", 0)))
        run = _RUN.get()
        if run is not None and run.span is None and isinstance(state, Mapping):
            event = state.get("event")
            if isinstance(event, Mapping):  # resuming an event begun in an earlier run
                run.begin(telemetry.tracer, event)
        if run is None or run.context is not None:
            scope.open(run.context if run is not None else None)
        token = _NODE.set(scope)
        started = time.perf_counter()
        error_type: str | None = None
        try:
            return await fn(state)
        except Exception as exc:
            error_type = type(exc).__name__
            if scope.span is not None:
                record_error(scope.span, exc)
            raise
        finally:
            _NODE.reset(token)
            scope.close()
            if instruments is not None:
                attributes = {"ctxd.graph.node": name}
                if error_type is not None:
                    attributes["error.type"] = error_type
                instruments.node_duration.record(time.perf_counter() - started, attributes)

    node.__name__ = name
    node.__qualname__ = name
    return node


def record_route(
    *,
    policy: str,
    factors: Mapping[str, float | int | str | bool],
    scores: Mapping[str, float],
    viable: Sequence[str],
    target: str,
    reason: str,
    margin: float,
    score: float | None,
) -> None:
    """Record one routing decision: the ``route {policy}`` span and the counter.

    The span is a child of the running node's span. Outside a traced node (a node
    called directly), the global tracer is used and nothing is counted.

    Args:
        policy: ``context_analyzer`` or ``enterprise_routing``.
        factors: the inputs of the decision.
        scores: every candidate's score.
        viable: the candidates that were allowed.
        target: the chosen route.
        reason: why it was chosen.
        margin: the chosen score minus the runner-up's.
        score: the chosen candidate's score, if it had one.
    """
    scope = _NODE.get()
    telemetry = scope.telemetry if scope is not None else GraphTelemetry.from_global()
    _record_route_span(
        telemetry.tracer,
        policy=policy,
        factors=factors,
        scores=scores,
        viable=viable,
        target=target,
        reason=reason,
        margin=margin,
        score=score,
    )
    if telemetry.instruments is not None:
        telemetry.instruments.routing_decisions.add(
            1,
            {
                "ctxd.routing.policy": policy,
                "ctxd.routing.result.target": target,
                "ctxd.routing.result.reason": reason,
            },
        )
