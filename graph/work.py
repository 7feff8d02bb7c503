"""The work the loop's nodes hand out, and the seam through which they hand it out.

Nodes decide; they do not do the heavy lifting themselves. Each node sends a request
of one *kind* — analysis, update, monitoring, decision — through a :class:`Dispatch`
and gets a plain-JSON reply. In production the dispatch is actors/'s ``ask`` over Redis
streams (so the work can run in other processes or hosts, behind circuit breakers);
in tests and demos it is :class:`LocalDispatch`, which calls :class:`WorkHandlers`
in-process. Both sides speak the same JSON payloads, so the handlers below are also
what the actors run.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol, cast

import anyio

from graph.analysis import AnalysisRequest, AnalysisResult, Analyzer, heuristic_analyzer
from graph.errors import PluginError, WorkflowError
from graph.features import terms
from graph.payloads import (
    AnalysisPayload,
    AnalysisReply,
    DecisionPayload,
    DecisionReply,
    MonitoringPayload,
    MonitoringReply,
    ResearchPayload,
    ResearchReply,
    UpdatePayload,
    UpdateReply,
    as_json,
)
from graph.research import ResearchDomain, research_task, run_research
from graph.routing import RoutingConfig, RoutingContext, RoutingEngine
from graph.state import JSON, integrity_hash

__all__ = [
    "Dispatch",
    "DispatchHealth",
    "LocalDispatch",
    "WorkHandlers",
    "WorkKind",
    "request_analysis",
    "request_decision",
    "request_health",
    "request_research",
    "request_summary",
]


class WorkKind(StrEnum):
    """The four actor kinds; each has its own mailbox stream ``ctxd:actor:{kind}``."""

    ANALYSIS = "analysis"
    UPDATE = "update"
    MONITORING = "monitoring"
    DECISION = "decision"


@dataclass(frozen=True)
class DispatchHealth:
    """What the routing context needs to know about the workers.

    Attributes:
        breaker_states: breaker state per kind (``closed|open|half_open|forced_open``).
        error_rate: failed asks over recent asks, all kinds, in [0, 1].
        performance_score: 1.0 when asks are fast, falling towards 0 as they approach
            their timeout or are refused by open breakers, in [0, 1].
    """

    breaker_states: Mapping[str, str] = field(default_factory=dict)
    error_rate: float = 0.0
    performance_score: float = 1.0

    @property
    def open_breakers(self) -> tuple[str, ...]:
        """Kinds whose breaker does not let calls through."""
        return tuple(
            sorted(k for k, s in self.breaker_states.items() if s in ("open", "forced_open"))
        )


class Dispatch(Protocol):
    """Sends one request of a kind and returns its reply (both plain JSON)."""

    async def __call__(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        """Do the work of ``kind`` for ``payload``; raise on failure or timeout."""
        ...

    def health(self) -> DispatchHealth:
        """Breaker states and error figures, for the routing context."""
        ...


class WorkHandlers:
    """The work itself, one handler per kind, on plain-JSON payloads.

    Args:
        analyzer: the analysis plug-in (the deterministic heuristic by default).
        routing: the decision engine's configuration (the seed's numbers by default).
    """

    def __init__(
        self, analyzer: Analyzer = heuristic_analyzer, routing: RoutingConfig | None = None
    ) -> None:
        self._analyzer = analyzer
        self._engine = RoutingEngine(routing)

    async def handle(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        """Run the handler of ``kind`` on a payload of its shape (:mod:`graph.payloads`).

        The payload comes off the wire: the handlers convert each value they read
        (``str``, ``int``, ``float``), so a payload of the wrong shape fails its request
        with a ``KeyError``/``TypeError``/``ValueError``, not later.
        """
        # The casts name the shape each handler reads; they check nothing themselves.
        if kind is WorkKind.ANALYSIS:
            if payload.get("op") == "research":
                return as_json(await self._research(cast(ResearchPayload, payload)))
            return as_json(await self._analyze(cast(AnalysisPayload, payload)))
        if kind is WorkKind.UPDATE:
            return as_json(self._summarize(cast(UpdatePayload, payload)))
        if kind is WorkKind.MONITORING:
            return as_json(self._check_health(cast(MonitoringPayload, payload)))
        if kind is WorkKind.DECISION:
            return as_json(self._decide(cast(DecisionPayload, payload)))
        raise WorkflowError(f"unknown work kind {kind!r}")

    async def _analyze(self, payload: AnalysisPayload) -> AnalysisReply:
        request = AnalysisRequest(
            workflow_id=str(payload["workflow_id"]),
            window=tuple(str(t) for t in payload["window"]),
            previous_analysis=str(payload.get("previous_analysis", "")),
            pass_number=int(payload.get("pass_number", 0)),
            research={str(k): str(v) for k, v in dict(payload.get("research") or {}).items()},
        )
        result = await self._call_analyzer(request)
        return _checked_result(result)

    async def _call_analyzer(self, request: AnalysisRequest) -> AnalysisResult:
        """The plug-in boundary: the one place a plug-in's ``BaseException`` is caught.

        An ``Exception`` goes on as it is (the asker gets it as a failed step). Any other
        ``BaseException`` a plug-in raises (``class Boom(BaseException)``) would tear
        through every task group up to the process; it becomes a :class:`PluginError`
        here, so only the actor running the plug-in crashes. Cancellation,
        ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` pass unchanged.
        """
        try:
            return await self._analyzer(request)
        except Exception:
            raise
        except BaseException as exc:  # re-raised: as itself, or as a PluginError (see above)
            if _passes_through(exc) and not _stray_cancellation(exc):
                raise
            message = " ".join(str(exc).split())[:_PLUGIN_MESSAGE_CHARS]
            raise PluginError(
                f"the analyzer plug-in raised {type(exc).__name__}: {message} "
                "(a BaseException, not an Exception): its actor is restarted; make the "
                "plug-in raise Exception subclasses"
            ) from exc

    async def _research(self, payload: ResearchPayload) -> ResearchReply:
        domain = ResearchDomain(str(payload["domain"]))
        task = research_task(domain, str(payload["task_id"]))
        findings = await run_research(task, str(payload["text"]))
        return {"domain": domain.value, "findings": findings}

    def _summarize(self, payload: UpdatePayload) -> UpdateReply:
        window = [str(t) for t in payload["window"]]
        top = [term for term, _ in terms(" ".join(window)).most_common(8)]
        first = window[0].split(".")[0][:160] if window else ""
        summary = f"{len(window)} event(s) about {', '.join(top) or 'nothing'}; began: {first}"
        return {"summary": summary}

    def _check_health(self, payload: MonitoringPayload) -> MonitoringReply:
        # The seed's _monitor_state_health, with its defect fixed: the hash is compared
        # against the one the graph stored, never recomputed before the check.
        values = dict(payload["values"])
        stored = str(payload.get("stored_hash") or "")
        integrity_valid = not stored or integrity_hash(values) == stored
        iterations = max(int(payload.get("iterations", 1)), 1)
        error_rate = len(list(payload.get("errors") or [])) / iterations
        duration = float(payload.get("duration", 0.0))
        breakers = dict(payload.get("breakers") or {})
        actions: list[str] = []
        if error_rate > 0.3 or any(s in ("open", "forced_open") for s in breakers.values()):
            actions.append("enable_circuit_breaker")
        if not integrity_valid:
            actions.append("initiate_state_recovery")
        if duration > 1800:
            actions.append("create_checkpoint")
        return {
            "state_integrity": "valid" if integrity_valid else "corrupted",
            "error_rate": error_rate,
            "execution_duration": duration,
            "worker_health": breakers,
            "recovery_actions": actions,
        }

    def _decide(self, payload: DecisionPayload) -> DecisionReply:
        ctx = payload["context"]
        deadline = ctx.get("execution_deadline")
        cost = dict(ctx.get("cost_constraints") or {})
        context = RoutingContext(
            quality_score=float(ctx["quality_score"]),
            performance_score=float(ctx["performance_score"]),
            error_rate=float(ctx["error_rate"]),
            resource_utilization=float(ctx["resource_utilization"]),
            business_priority=str(ctx["business_priority"]),
            execution_deadline=datetime.fromisoformat(str(deadline)) if deadline else None,
            cost_constraints={str(k): float(v) for k, v in cost.items()},
        )
        now = payload.get("now")
        outcome = self._engine.decide(
            context,
            iteration_count=int(payload.get("iteration_count", 0)),
            now=datetime.fromisoformat(str(now)) if now else None,
        )
        return {
            "decision": outcome.decision.value,
            "scores": {d.value: s for d, s in outcome.scores.items()},
            "raw_scores": {d.value: s for d, s in outcome.raw_scores.items()},
            "viable": [d.value for d in outcome.viable],
            "reason": outcome.reason,
            "margin": outcome.margin,
        }


_PLUGIN_MESSAGE_CHARS = 300


def _passes_through(exc: BaseException) -> bool:
    """Cancellation and generator closing, also inside an exception group.

    ``SystemExit`` and ``KeyboardInterrupt`` raised by a plug-in are the plug-in's own
    (issue 11: any exception but cancellation crashes only its actor): a person's
    Ctrl-C and the service manager's SIGTERM reach ctxd as signals it receives itself,
    never as exceptions raised inside a plug-in's coroutine.
    """
    kinds = (GeneratorExit, anyio.get_cancelled_exc_class())
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(kinds) is not None
    return isinstance(exc, kinds)


def _checked_result(result: object) -> AnalysisReply:
    """A plug-in's result as the reply, or ``TypeError``/``ValueError`` naming what is
    outside the contract (a failed analysis step, not a run that fails on every retry).

    The analysis must be text Redis can store (no lone surrogate), the fields a mapping
    of names to ``str|int|float|bool`` (finite floats, 64-bit integers, valid text).
    """
    if not isinstance(result, AnalysisResult):
        raise TypeError(
            f"the analyzer plug-in returned {type(result).__name__}, not an AnalysisResult"
        )
    if not isinstance(result.analysis, str):
        raise TypeError(
            "the analyzer plug-in returned an analysis of type "
            f"{type(result.analysis).__name__}: it must be str"
        )
    try:
        result.analysis.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            "the analyzer plug-in returned an analysis that is not valid text (a lone "
            f"surrogate at character {exc.start}): return valid Unicode"
        ) from None
    if not isinstance(result.fields, Mapping):
        raise TypeError(
            f"the analyzer plug-in returned fields of type {type(result.fields).__name__}: "
            "they must be a mapping"
        )
    fields: dict[str, JSON] = {}
    for name, value in result.fields.items():
        fine = isinstance(value, str | int | float | bool) and isinstance(name, str)
        if isinstance(value, float) and not math.isfinite(value):
            fine = False
        if isinstance(value, int) and not -(2**63) <= value < 2**63:  # what checkpoints store
            fine = False
        try:
            json.dumps([name, value], allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError):
            fine = False
        if not fine:
            raise TypeError(
                f"the analyzer plug-in returned field {str(name)[:60]!r} = "
                f"{type(value).__name__} {str(value)[:60]!r}: fields must map text to "
                "str, int (64-bit), float (finite) or bool"
            )
        fields[name] = value
    return {"analysis": result.analysis, "fields": fields}


def _stray_cancellation(exc: BaseException) -> bool:
    """A ``CancelledError`` the plug-in raised itself, with nothing cancelling this task.

    A client library's own timeout or closed session can leak one; passed on, it ended
    the worker silently, the request came back and the restarts exhausted the root
    supervisor. A real cancellation (a deadline, shutdown) has asked the task to cancel
    first: ``Task.cancelling()`` counts those requests (asyncio, which ctxd runs on).
    """
    if not isinstance(exc, anyio.get_cancelled_exc_class()):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio
        return False
    return task is not None and task.cancelling() == 0


class LocalDispatch:
    """In-process dispatch: calls the handlers directly (tests, demos, one process)."""

    def __init__(self, handlers: WorkHandlers | None = None) -> None:
        self._handlers = handlers or WorkHandlers()

    async def __call__(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        """Run the handler of ``kind`` in this process."""
        return await self._handlers.handle(kind, payload)

    def health(self) -> DispatchHealth:
        """Local calls have no breakers: all closed, no errors."""
        return DispatchHealth(breaker_states={k.value: "closed" for k in WorkKind})


# -- typed requests -----------------------------------------------------------------
#
# What nodes call: each sends its kind's payload and reads the reply as its kind's shape.
# The reply was written by these handlers (in this process or a worker's); the cast is
# that trust, stated once per kind.


async def request_analysis(dispatch: Dispatch, payload: AnalysisPayload) -> AnalysisReply:
    """Ask for an analysis of the window."""
    return cast(AnalysisReply, await dispatch(WorkKind.ANALYSIS, as_json(payload)))


async def request_research(dispatch: Dispatch, payload: ResearchPayload) -> ResearchReply:
    """Ask one research worker for its domain's findings."""
    return cast(ResearchReply, await dispatch(WorkKind.ANALYSIS, as_json(payload)))


async def request_summary(dispatch: Dispatch, payload: UpdatePayload) -> UpdateReply:
    """Ask for the summary of a closing segment."""
    return cast(UpdateReply, await dispatch(WorkKind.UPDATE, as_json(payload)))


async def request_health(dispatch: Dispatch, payload: MonitoringPayload) -> MonitoringReply:
    """Ask for the state health check."""
    return cast(MonitoringReply, await dispatch(WorkKind.MONITORING, as_json(payload)))


async def request_decision(dispatch: Dispatch, payload: DecisionPayload) -> DecisionReply:
    """Ask the decision engine for a decision."""
    return cast(DecisionReply, await dispatch(WorkKind.DECISION, as_json(payload)))
