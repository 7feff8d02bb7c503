"""The five seed nodes of the contextual loop, and the research workers.

Each node reads the state, asks a worker kind for the heavy part through the
:class:`~graph.work.Dispatch`, and returns only the channels it changed (never the
whole state). The analyzer is the hub: it takes events from the run's inbox, keeps the
per-event features and chooses the next node; every other node loops back to it.
"""

from __future__ import annotations

import json
import time
from collections import ChainMap
from collections.abc import Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import cast

from langgraph.types import Send, interrupt

from graph.errors import PluginError
from graph.features import (
    AnalyzerFeatures,
    AnalyzerPolicy,
    AnalyzerRoute,
    choose_route,
    context_drift,
)
from graph.json_values import as_float, as_int, as_list, as_object, as_objects, as_str, is_object
from graph.payloads import (
    AnalysisPayload,
    DecisionContext,
    DecisionReply,
    MonitoringPayload,
    ResearchPayload,
    as_json,
)
from graph.quality import quality_score
from graph.research import needs_research
from graph.routing import RoutingDecision
from graph.state import INTEGRITY_FIELDS, JSON, ContextState, integrity_hash
from graph.tracing import begin_event, record_route
from graph.work import (
    Dispatch,
    request_analysis,
    request_decision,
    request_health,
    request_research,
    request_summary,
)

__all__ = ["RESEARCH_WORKERS", "ContextualNodes", "event_status", "summarize_errors"]

RESEARCH_WORKERS = {
    "technical": "technical_research_worker",
    "market": "market_research_worker",
    "competitive": "competitive_research_worker",
}
_WINDOW_EVENTS = 8
_WINDOW_CHARS = 4096
_SEGMENTS_KEPT = 20
_DECISIONS_KEPT = 20
_OUTBOX_KEPT = 128
_ERROR_CHARS = 500  # an output's ``error``
_STEP_ERROR_CHARS = 300  # one step's message as kept in the state
_RESEARCH_UNAVAILABLE = "unavailable: "
"""Prefix of a research finding whose worker failed; the rest is ``Type: message``."""

_State = Mapping[str, JSON]


def _resealed(before: ContextState, changes: dict[str, JSON]) -> dict[str, JSON]:
    """Seal a node's changes to the integrity fields with a fresh hash.

    Only a state that still matches its stored hash is resealed: when something outside
    the graph changed the integrity fields, the stale hash stays so that
    ``continuous_monitor`` sees the breach (the seed recomputed the hash before checking
    it, which hid every change).
    """
    if not any(name in changes for name in INTEGRITY_FIELDS):
        return changes
    old = cast(Mapping[str, JSON], before)
    stored = old.get("integrity_hash")
    if stored and integrity_hash(old) != stored:
        return changes
    changes["integrity_hash"] = integrity_hash(ChainMap(changes, dict(old)))
    return changes


def _history_entry(record: Mapping[str, JSON]) -> dict[str, JSON]:
    """A decision as kept in the bounded history: no raw scores, no copied context.

    The current ``decision`` keeps the full record; the history is for people, resumes
    and rollbacks, and a lean one keeps every checkpoint write cheap (docs/performance.md).
    """
    kept = ("event_id", "decision", "scores", "reason", "margin", "resolution")
    return {k: record[k] for k in kept if k in record}


def event_status(
    decision: str | None,
    errors: int,
    budget_exhausted: bool,
    *,
    resolved: bool = False,
    integrity: str = "valid",
    analyzed: bool = True,
) -> str:
    """The output ``status`` for a finished event (docs/graph.md, "Status and error").

    The first rule that holds wins:

    1. the state failed its integrity check → ``error``;
    2. an unresolved ``escalation_required`` → ``escalated`` (a person looks at it,
       whatever the input was);
    3. no decision, and the budget ran out, a step failed or the event was never
       analysed → ``error``: nothing usable came out;
    4. the event's analysis never succeeded → ``fallback``: the decision was made from
       degraded input (no analysis of this event, quality 0);
    5. ``fallback_processing`` or ``circuit_breaker_mode`` → ``fallback``;
    6. otherwise ``ok`` (a person's resolution of an escalation included).

    Args:
        decision: the decision engine's last decision, if any.
        errors: errors recorded for the event.
        budget_exhausted: the iteration budget ended the event.
        resolved: a person resumed the escalation (its decision stands resolved).
        integrity: the monitor's ``state_integrity``; ``corrupted`` makes it an error.
        analyzed: at least one analysis of the event succeeded.
    """
    if integrity == "corrupted":
        return "error"
    if decision == "escalation_required" and not resolved:
        return "escalated"
    if decision is None:
        return "error" if budget_exhausted or errors or not analyzed else "ok"
    if not analyzed:
        return "fallback"
    if decision in ("fallback_processing", "circuit_breaker_mode"):
        return "fallback"
    return "ok"


def summarize_errors(errors: Sequence[Mapping[str, JSON]]) -> str:
    """An output's ``error``: the first failed step as ``Type: message``, and a count.

    Empty when nothing failed; at most 500 characters.

    Args:
        errors: the event's failed steps, oldest first (``type`` and ``message`` each).
    """
    if not errors:
        return ""
    first = errors[0]
    text = f"{first.get('type') or 'Error'}: {first.get('message') or ''}".rstrip()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    room = _ERROR_CHARS - len(more)
    if len(text) > room:
        text = text[: room - 1] + "…"
    return text + more


def _event_analyzed(view: _State) -> bool:
    """Whether an analysis of the event in progress succeeded.

    Events taken before this flag existed (a paused event in an older checkpoint) count
    as analysed unless an analysis error was recorded for them.
    """
    event = as_object(view.get("event"))
    if "analyzed" in event:
        return bool(event["analyzed"])
    return not any(e.get("kind") == "analysis" for e in as_objects(view.get("errors")))


def _event_quality(view: _State) -> float:
    """The quality of the event's analysis: 0 when none of its analyses succeeded (the
    stored ``analysis`` is then an older window's, and its quality is not this event's)."""
    return as_float(view.get("quality")) if _event_analyzed(view) else 0.0


def _step_errors(view: _State) -> list[dict[str, JSON]]:
    """The event's failed steps: recorded errors, then failed research workers."""
    failed = as_objects(view.get("errors"))
    for domain, finding in sorted(as_object(view.get("research")).items()):
        if isinstance(finding, str) and finding.startswith(_RESEARCH_UNAVAILABLE):
            kind, _, message = finding.removeprefix(_RESEARCH_UNAVAILABLE).partition(": ")
            failed.append({"kind": f"research.{domain}", "type": kind, "message": message})
    return failed


def _resolved(record: Mapping[str, JSON], answer: JSON) -> dict[str, JSON]:
    """The escalated decision after a person answered.

    An answer that is an object naming one of the six decisions (``{"decision":
    "standard_quality_path"}``) overrides the decision; any other answer resolves the
    escalation as it stands. ``control_event_id`` names the resume entry, which makes
    a redelivered resume recognisable.
    """
    resolved = {**record, "resolution": answer}
    if isinstance(answer, dict):
        value = answer.get("value")
        override = value.get("decision") if isinstance(value, dict) else None
        if isinstance(override, str) and override in {str(d) for d in RoutingDecision}:
            resolved.update(decision=override, reason="human")
    return resolved


class ContextualNodes:
    """The loop's node functions, bound to a dispatch and a policy.

    Args:
        dispatch: where node work is sent (actors over Redis, or in-process).
        policy: the analyzer's thresholds and iteration budget.
        escalation_pauses: when True, ``escalation_required`` interrupts the workflow
            until a person resumes it.
    """

    def __init__(
        self, dispatch: Dispatch, policy: AnalyzerPolicy, *, escalation_pauses: bool = False
    ) -> None:
        self._dispatch = dispatch
        self._policy = policy
        self._escalation_pauses = escalation_pauses

    # -- context_analyzer ------------------------------------------------------------

    async def context_analyzer(self, state: ContextState) -> dict[str, JSON]:
        """Take the next event if needed, refresh the analysis, choose the next node."""
        return _resealed(state, await self._context_analyzer(state))

    async def _context_analyzer(self, state: ContextState) -> dict[str, JSON]:
        changes: dict[str, JSON] = {}
        view: ChainMap[str, JSON] = ChainMap(changes, cast(dict[str, JSON], state))
        outbox = as_object(view.get("outbox"))
        while True:
            if view.get("event") is None:
                inbox = as_objects(view.get("inbox"))
                if not inbox:
                    changes["next_route"] = AnalyzerRoute.PROCESSING_COMPLETE.value
                    return changes
                event = inbox.pop(0)
                changes["inbox"] = list[JSON](inbox)
                if str(event["event_id"]) in outbox:
                    continue  # a redelivered event whose result is already durable
                begin_event(event)  # node spans from here on belong to this event's trace
                self._take_event(event, view, changes)
            if view.get("analysis_stale"):
                await self._analyze(view, changes, pass_number=0)
            changes["iteration"] = as_int(view.get("iteration")) + 1
            changes["route"] = [*as_list(view.get("route")), "context_analyzer"]
            choice = choose_route(self._features(view), self._policy)
            self._trace_route(view, choice.route.value, choice.reason)
            changes["route_reason"] = choice.reason
            if choice.route is not AnalyzerRoute.PROCESSING_COMPLETE:
                changes["next_route"] = choice.route.value
                return changes
            # One JSON string per result: the checkpoint serializer walks every nested
            # value, and the outbox was most of the state (docs/performance.md).
            outbox[str(as_object(view["event"])["event_id"])] = json.dumps(
                self._result(view, choice.budget_exhausted), separators=(",", ":")
            )
            # Never evict a result the ingress has yet to read: this run's, and on a
            # redelivery the previous run's (the newest 2 x run_size entries hold both).
            kept = max(_OUTBOX_KEPT, 2 * as_int(view.get("run_size")))
            while len(outbox) > kept:
                outbox.pop(next(iter(outbox)))
            changes["outbox"] = outbox
            changes["event"] = None

    def _take_event(
        self, event: Mapping[str, JSON], view: _State, changes: MutableMapping[str, JSON]
    ) -> None:
        content = str(event["content"])
        window = [str(text) for text in as_list(view.get("window"))]
        changes["drift"] = context_drift(content, window)
        window = [*window, content[:_WINDOW_CHARS]][-_WINDOW_EVENTS:]
        changes.update(
            event={**event, "started_at": time.time(), "analyzed": False},
            window=list[JSON](window),
            workflow_id=as_str(view.get("workflow_id")) or as_str(event.get("workflow_id")),
            events_processed=as_int(view.get("events_processed")) + 1,
            iteration=0,
            passes=0,
            monitored=False,
            decided=False,
            retry_requested=False,
            segment_rotated=False,
            analysis_stale=True,
            research={},
            route=[],
            errors=[],
            decision=None,
        )

    async def _analyze(
        self, view: _State, changes: MutableMapping[str, JSON], *, pass_number: int
    ) -> None:
        research = as_object(view.get("research"))
        payload: AnalysisPayload = {
            "workflow_id": str(view.get("workflow_id", "")),
            "window": [str(text) for text in as_list(view.get("window"))],
            "previous_analysis": as_str(view.get("analysis")),
            "pass_number": pass_number,
            "research": {domain: str(finding) for domain, finding in research.items()},
        }
        changes["analysis_stale"] = False
        try:
            reply = await request_analysis(self._dispatch, payload)
        except PluginError:
            raise  # not a step failure: the run fails (CTXD_DISPATCH=local), see PluginError
        except Exception as exc:  # noqa: BLE001 - recorded in state; the loop routes on it
            self._record_error(view, changes, "analysis", exc)
            return
        analysis = str(reply.get("analysis", ""))
        changes["analysis"] = analysis
        changes["analysis_fields"] = dict(reply.get("fields") or {})
        changes["quality"] = quality_score(analysis)
        event = view.get("event")
        if is_object(event) and not event.get("analyzed"):
            changes["event"] = {**event, "analyzed": True}

    def _features(self, view: _State) -> AnalyzerFeatures:
        health = self._dispatch.health()
        errors = as_list(view.get("errors"))
        iteration = as_int(view.get("iteration"), 1)
        return AnalyzerFeatures(
            quality=_event_quality(view),
            drift=as_float(view.get("drift")),
            passes=as_int(view.get("passes")),
            iteration=iteration,
            errors=len(errors),
            error_rate=min(1.0, max(len(errors) / max(iteration, 1), health.error_rate)),
            open_breakers=health.open_breakers,
            segment_rotated=bool(view.get("segment_rotated")),
            monitored=bool(view.get("monitored")),
            decided=bool(view.get("decided")),
            retry_requested=bool(view.get("retry_requested")),
        )

    def _trace_route(self, view: _State, target: str, reason: str) -> None:
        features = self._features(view)
        record_route(
            policy="context_analyzer",
            factors={
                "quality": features.quality,
                "drift": features.drift,
                "passes": features.passes,
                "iteration": features.iteration,
                "errors": features.errors,
                "error_rate": features.error_rate,
                "open_breakers": ",".join(features.open_breakers),
            },
            scores={},
            viable=[r.value for r in AnalyzerRoute],
            target=target,
            reason=reason,
            margin=0.0,
            score=None,
        )

    def _result(self, view: _State, budget_exhausted: bool) -> dict[str, JSON]:
        event = as_object(view["event"])
        decision = as_object(view.get("decision"))
        raw_name = decision.get("decision")
        name = None if raw_name is None else str(raw_name)
        errors = as_list(view.get("errors"))
        health = as_object(view.get("health")) if view.get("monitored") else {}
        integrity = as_str(health.get("state_integrity"), "valid")
        analyzed = _event_analyzed(view)
        status = event_status(
            name,
            len(errors),
            budget_exhausted,
            resolved=bool(decision and "resolution" in decision),
            integrity=integrity,
            analyzed=analyzed,
        )
        return {
            "workflow_id": view.get("workflow_id", ""),
            "event_id": event["event_id"],
            "source_id": event.get("source_id", ""),
            "status": status,
            "state_integrity": integrity,
            "decision": name or "",
            "route": as_list(view.get("route")),
            "quality_score": round(_event_quality(view), 6),
            "scores": as_object(decision.get("scores")),
            "error": summarize_errors(_step_errors(view)),
        }

    @staticmethod
    def _record_error(
        view: _State, changes: MutableMapping[str, JSON], kind: str, exc: Exception
    ) -> None:
        message = " ".join(str(exc).split())[:_STEP_ERROR_CHARS]
        error: JSON = {"kind": kind, "type": type(exc).__name__, "message": message}
        changes["errors"] = [*as_list(view.get("errors")), error]
        changes["error_count"] = as_int(view.get("error_count")) + 1

    @staticmethod
    def next_route(state: ContextState) -> str:
        """The analyzer's conditional edge: the route it chose."""
        return str(state.get("next_route") or AnalyzerRoute.PROCESSING_COMPLETE.value)

    # -- adaptive_processor and research workers -------------------------------------

    async def adaptive_processor(self, state: ContextState) -> dict[str, JSON]:
        """Deepen the analysis of the window by one pass, folding in research."""
        changes: dict[str, JSON] = {}
        view: ChainMap[str, JSON] = ChainMap(changes, cast(dict[str, JSON], state))
        passes = as_int(view.get("passes")) + 1
        changes.update(passes=passes, retry_requested=False)
        changes["route"] = [*as_list(view.get("route")), "adaptive_processor"]
        await self._analyze(view, changes, pass_number=passes)
        return _resealed(state, changes)

    def fan_out(self, state: ContextState) -> list[Send] | str:
        """The orchestrator-worker step: research workers for domains the event calls for."""
        event = state.get("event") or {}
        done = set((state.get("research") or {}).keys())
        domains = [d for d in needs_research(str(event.get("content", ""))) if d.value not in done]
        if not domains:
            return "context_analyzer"
        return [
            Send(
                RESEARCH_WORKERS[d.value],
                {
                    "domain": d.value,
                    "task_id": f"{event.get('event_id')}:{d.value}:{state.get('passes', 0)}",
                    "text": str(event.get("content", "")),
                },
            )
            for d in domains
        ]

    async def research_worker(self, task: Mapping[str, JSON]) -> dict[str, JSON]:
        """One research worker: findings for its domain, merged into ``research``."""
        try:
            payload: ResearchPayload = {
                "op": "research",
                "domain": str(task["domain"]),
                "task_id": str(task["task_id"]),
                "text": str(task["text"]),
            }
            reply = await request_research(self._dispatch, payload)
        except Exception as exc:  # noqa: BLE001 - a missing finding is not fatal
            # Kept as the finding (parallel workers cannot all write ``errors``); the
            # event's ``error`` names it (_step_errors).
            message = " ".join(str(exc).split())[:_STEP_ERROR_CHARS]
            failure = f"{_RESEARCH_UNAVAILABLE}{type(exc).__name__}: {message}"
            return {"research": {str(task["domain"]): failure}}
        return {"research": {str(reply["domain"]): reply["findings"]}}

    # -- context_updater --------------------------------------------------------------

    async def context_updater(self, state: ContextState) -> dict[str, JSON]:
        """Close the current segment (summary kept, rollback point recorded), open a new one."""
        changes: dict[str, JSON] = {}
        view: ChainMap[str, JSON] = ChainMap(changes, cast(dict[str, JSON], state))
        window = [str(text) for text in as_list(view.get("window"))]
        closing, newest = window[:-1], window[-1:]
        try:
            reply = await request_summary(self._dispatch, {"window": closing})
            summary = str(reply.get("summary", ""))
        except Exception as exc:  # noqa: BLE001 - keep going with a plain summary
            self._record_error(view, changes, "update", exc)
            summary = f"{len(closing)} event(s); summary unavailable"
        segment = as_int(view.get("segment"))
        record: JSON = {
            "segment": segment,
            "summary": summary,
            "events": len(closing),
            "checkpoint_id": view.get("base_checkpoint_id"),
            "closed_at": datetime.now(UTC).isoformat(),
        }
        changes.update(
            segments=[*as_list(view.get("segments")), record][-_SEGMENTS_KEPT:],
            segment=segment + 1,
            window=list[JSON](newest),
            segment_rotated=True,
            analysis_stale=True,
            route=[*as_list(view.get("route")), "context_updater"],
        )
        return _resealed(state, changes)

    # -- continuous_monitor -----------------------------------------------------------

    async def continuous_monitor(self, state: ContextState) -> dict[str, JSON]:
        """The seed's state health check: integrity, error rate, duration, breakers."""
        changes: dict[str, JSON] = {}
        view: ChainMap[str, JSON] = ChainMap(changes, cast(dict[str, JSON], state))
        event = as_object(view.get("event"))
        payload: MonitoringPayload = {
            "values": {name: view.get(name) for name in INTEGRITY_FIELDS},
            "stored_hash": as_str(view.get("integrity_hash")),
            "errors": as_objects(view.get("errors")),
            "iterations": as_int(view.get("iteration"), 1),
            "duration": time.time() - as_float(event.get("started_at"), time.time()),
            "breakers": dict(self._dispatch.health().breaker_states),
        }
        health: JSON
        try:
            health = as_json(await request_health(self._dispatch, payload))
        except Exception as exc:  # noqa: BLE001 - a failed check is itself a finding
            self._record_error(view, changes, "monitoring", exc)
            health = {"state_integrity": "unknown", "recovery_actions": []}
        changes.update(
            health=health,
            monitored=True,
            route=[*as_list(view.get("route")), "continuous_monitor"],
        )
        return changes

    # -- decision_engine --------------------------------------------------------------

    async def decision_engine(self, state: ContextState) -> dict[str, JSON]:
        """The seed's routing engine on the state, the event's constraints and live health."""
        changes: dict[str, JSON] = {}
        view: ChainMap[str, JSON] = ChainMap(changes, cast(dict[str, JSON], state))
        event = as_object(view.get("event"))
        health = self._dispatch.health()
        errors = as_list(view.get("errors"))
        iteration = as_int(view.get("iteration"), 1)
        window_chars = sum(len(str(t)) for t in as_list(view.get("window")))
        deadline = event.get("deadline")
        context: DecisionContext = {
            "quality_score": _event_quality(view),
            "performance_score": health.performance_score,
            "error_rate": min(1.0, max(len(errors) / max(iteration, 1), health.error_rate)),
            "resource_utilization": min(1.0, window_chars / (_WINDOW_EVENTS * _WINDOW_CHARS)),
            "business_priority": as_str(event.get("priority"), "standard"),
            "execution_deadline": None if deadline is None else str(deadline),
            "cost_constraints": (
                {"max_cost": as_float(event["max_cost"])}
                if event.get("max_cost") is not None
                else {}
            ),
        }
        try:
            outcome: DecisionReply = await request_decision(
                self._dispatch,
                {"context": context, "iteration_count": as_int(view.get("passes"))},
            )
        except Exception as exc:  # noqa: BLE001 - the seed's safest option, recorded
            self._record_error(view, changes, "decision", exc)
            outcome = {
                "decision": "fallback_processing",
                "scores": {},
                "viable": [],
                "reason": "error",
                "margin": 0.0,
            }
        scores = dict(outcome.get("scores") or {})
        record_route(
            policy="enterprise_routing",
            factors={k: v for k, v in context.items() if isinstance(v, int | float | str)},
            scores=scores,
            viable=list(outcome.get("viable") or []),
            target=str(outcome["decision"]),
            reason=str(outcome.get("reason", "score_max")),
            margin=float(outcome.get("margin") or 0.0),
            score=scores.get(str(outcome["decision"])),
        )
        decision = str(outcome["decision"])
        record = {
            "event_id": event.get("event_id"),
            **as_json(outcome),
            "context": as_json(context),
        }
        retry = decision == "retry_with_improvements"
        history = [*as_list(view.get("decisions")), _history_entry(record)][-_DECISIONS_KEPT:]
        changes.update(
            decision=record,
            decisions=history,
            decided=not retry,
            retry_requested=retry,
            route=[*as_list(view.get("route")), "decision_engine"],
        )
        if decision == "escalation_required" and self._escalation_pauses:
            # The pause's own result travels with the interrupt, so the escalated event
            # gets its output (status=escalated) while the workflow waits. On resume
            # LangGraph runs this node again from its start and interrupt() returns
            # the person's answer.
            paused = self._result(view, budget_exhausted=False)
            answer = interrupt({"event_id": event.get("event_id"), "result": paused})
            resolved = _resolved(record, answer)
            changes["decision"] = resolved
            changes["decisions"] = [*as_list(view.get("decisions"))[:-1], _history_entry(resolved)]
            retry = resolved["decision"] == "retry_with_improvements"
            changes.update(decided=not retry, retry_requested=retry)
        return changes
