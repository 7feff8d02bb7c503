"""Outputs say what went wrong: the ``error`` of a result, and no ``ok`` without analysis.

In-process graph runs (in-memory checkpointer) with dispatches that fail one kind of
work; the plug-in boundary's conversion of BaseException subclasses to PluginError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import anyio
import pytest
from langgraph.checkpoint.memory import InMemorySaver

from actors.runtime.breaker import BreakerState, CallNotPermittedError
from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer
from graph.checkpointer import strict_serializer
from graph.errors import CtxdError, PluginError
from graph.json_values import as_float
from graph.nodes import event_status, summarize_errors
from graph.state import JSON
from graph.work import DispatchHealth, LocalDispatch, WorkHandlers, WorkKind
from graph.workflow import ContextualGraph, build_contextual_workflow, run_events
from tests_support import MARKET, TECH


class FailingDispatch:
    """LocalDispatch, except that the kinds (or ops) in ``failing`` raise ``error``."""

    def __init__(self, failing: Mapping[str, BaseException]) -> None:
        self.inner = LocalDispatch()
        self.failing = dict(failing)

    async def __call__(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        key = "research" if payload.get("op") == "research" else kind.value
        if key in self.failing:
            raise self.failing[key]
        return await self.inner(kind, payload)

    def health(self) -> DispatchHealth:
        return self.inner.health()


def _graph(dispatch: object) -> ContextualGraph:
    return build_contextual_workflow(
        cast(LocalDispatch, dispatch), InMemorySaver(serde=strict_serializer())
    )


async def test_a_normal_event_has_an_empty_error() -> None:
    run = await run_events(_graph(LocalDispatch()), "w", [{"event_id": "e1", "content": TECH}])
    assert run.results["e1"]["error"] == ""
    assert run.results["e1"]["status"] == "ok"


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("no reply from the analysis actor within 10s"),
        CallNotPermittedError(
            "circuit breaker actor.analysis is open",
            breaker="actor.analysis",
            state=BreakerState.OPEN,
            next_probe_at=None,
            retry_after=None,
        ),
        ConnectionError("analysis backend unreachable"),
    ],
)
async def test_failed_analysis_is_never_ok_and_the_error_names_it(error: Exception) -> None:
    """The analysis ask fails every time: a decision from degraded input is a fallback,
    with the exception type and message in ``error`` and no quality pretended."""
    graph = _graph(FailingDispatch({"analysis": error}))
    run = await run_events(graph, "w", [{"event_id": "e1", "content": TECH}])
    result = run.results["e1"]
    assert result["status"] == "fallback"
    assert result["decision"]  # the decision engine still decided, from degraded input
    assert str(result["error"]).startswith(f"{type(error).__name__}: {error}")
    assert result["quality_score"] == 0.0


async def test_failed_analysis_after_a_good_event_does_not_reuse_its_quality() -> None:
    """The previous event's analysis is not this event's: its quality is not reported."""
    dispatch = FailingDispatch({})
    graph = _graph(dispatch)
    first = await run_events(graph, "w", [{"event_id": "e1", "content": MARKET}])
    assert as_float(first.results["e1"]["quality_score"]) > 0.0
    dispatch.failing["analysis"] = TimeoutError("no reply")
    second = await run_events(graph, "w", [{"event_id": "e2", "content": MARKET + " More."}])
    assert second.results["e2"]["status"] == "fallback"
    assert second.results["e2"]["quality_score"] == 0.0
    assert str(second.results["e2"]["error"]).startswith("TimeoutError: no reply")


async def test_a_failed_research_worker_is_named_and_the_status_stands() -> None:
    """A research worker's failure shows in ``error``; the analysis and the decision
    succeeded, so the status is what it is without the failure."""
    normal = await run_events(_graph(LocalDispatch()), "w", [{"event_id": "e1", "content": MARKET}])
    graph = _graph(FailingDispatch({"research": TimeoutError("research timed out")}))
    run = await run_events(graph, "w", [{"event_id": "e1", "content": MARKET}])
    result = run.results["e1"]
    assert normal.results["e1"]["error"] == ""
    assert result["status"] == normal.results["e1"]["status"]
    assert str(result["error"]).startswith("TimeoutError: research timed out")


async def test_a_failed_decision_ask_is_a_fallback_naming_the_error() -> None:
    graph = _graph(FailingDispatch({"decision": TimeoutError("decision actor silent")}))
    run = await run_events(graph, "w", [{"event_id": "e1", "content": TECH}])
    assert run.results["e1"]["status"] == "fallback"
    assert run.results["e1"]["decision"] == "fallback_processing"
    assert run.results["e1"]["error"] == "TimeoutError: decision actor silent"


def test_event_status_rules() -> None:
    """The rule table of docs/graph.md, "What an output's status means"."""
    assert event_status("standard_quality_path", 0, False) == "ok"
    assert event_status("standard_quality_path", 0, False, analyzed=False) == "fallback"
    assert event_status("escalation_required", 1, False, analyzed=False) == "escalated"
    assert event_status("escalation_required", 0, False, resolved=True) == "ok"
    assert (
        event_status("escalation_required", 1, False, resolved=True, analyzed=False) == "fallback"
    )
    assert event_status(None, 1, False, analyzed=False) == "error"
    assert event_status(None, 0, True) == "error"
    assert event_status("circuit_breaker_mode", 1, False) == "fallback"
    assert event_status("standard_quality_path", 0, False, integrity="corrupted") == "error"


def test_summarize_errors_is_bounded_and_counts_the_rest() -> None:
    errors: list[dict[str, JSON]] = [
        {"kind": "analysis", "type": "TimeoutError", "message": "x" * 2000},
        {"kind": "update", "type": "RuntimeError", "message": "no"},
        {"kind": "decision", "type": "OSError", "message": "gone"},
    ]
    text = summarize_errors(errors)
    assert text.startswith("TimeoutError: xxx")
    assert text.endswith("(and 2 more)")
    assert len(text) <= 500
    assert summarize_errors([]) == ""


# -- the plug-in boundary -----------------------------------------------------------


class Boom(BaseException):
    """What a careless plug-in might raise: not an Exception."""


async def _booming(request: AnalysisRequest) -> AnalysisResult:
    if "boom" in request.window[-1]:
        raise Boom("the plug-in blew up")
    return await heuristic_analyzer(request)


def _analysis_payload(text: str) -> dict[str, JSON]:
    return {"workflow_id": "w", "window": [text], "pass_number": 0}


async def test_a_plugin_base_exception_becomes_a_plugin_error() -> None:
    handlers = WorkHandlers(analyzer=_booming)
    with pytest.raises(PluginError) as caught:
        await handlers.handle(WorkKind.ANALYSIS, _analysis_payload("boom now"))
    assert isinstance(caught.value, CtxdError)
    assert isinstance(caught.value.__cause__, Boom)
    assert "Boom: the plug-in blew up" in str(caught.value)
    fine = await handlers.handle(WorkKind.ANALYSIS, _analysis_payload("all quiet"))
    assert fine["analysis"]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_a_plugins_process_exit_is_a_plugin_error(exc_type: type[BaseException]) -> None:
    """A plug-in's own sys.exit() or KeyboardInterrupt crashes only its actor (signals
    reach ctxd as signals, not as exceptions inside a plug-in)."""

    async def exiting(request: AnalysisRequest) -> AnalysisResult:
        raise exc_type()

    with pytest.raises(PluginError, match=exc_type.__name__):
        await WorkHandlers(analyzer=exiting).handle(WorkKind.ANALYSIS, _analysis_payload("x"))


async def test_generator_exit_passes_through_the_plugin_boundary() -> None:
    async def closing(request: AnalysisRequest) -> AnalysisResult:
        raise GeneratorExit

    with pytest.raises(GeneratorExit):
        await WorkHandlers(analyzer=closing).handle(WorkKind.ANALYSIS, _analysis_payload("x"))


async def test_cancellation_passes_through_the_plugin_boundary() -> None:
    started = anyio.Event()

    async def waiting(request: AnalysisRequest) -> AnalysisResult:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    handlers = WorkHandlers(analyzer=waiting)
    async with anyio.create_task_group() as tg:
        tg.start_soon(handlers.handle, WorkKind.ANALYSIS, _analysis_payload("x"))
        await started.wait()
        tg.cancel_scope.cancel()  # a PluginError here would escape the task group


async def test_with_local_dispatch_a_plugin_error_fails_the_run() -> None:
    """Not recorded as a step error: the run fails (retried, then poison)."""
    graph = _graph(LocalDispatch(WorkHandlers(analyzer=_booming)))
    with pytest.raises(PluginError):
        await run_events(graph, "w", [{"event_id": "e1", "content": "boom"}])
