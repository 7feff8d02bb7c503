"""The seed's ``create_contextual_workflow``, compiled, and one run of it over events.

::

    context_analyzer ─► adaptive_processor ─(Send)─► research workers ─┐
          ▲  │ ├──────► context_updater ─────────────────────────────────┤
          │  │ ├──────► continuous_monitor ──────────────────────────────┤
          │  │ └──────► decision_engine ─────────────────────────────────┤
          │  └──────► END (processing_complete, inbox empty)             │
          └──────────────────────────────────────────────────────────────┘

Thread id = workflow id. A run carries one or more events of one workflow in its
``inbox``; each finished event's result is in the state's ``outbox`` when the run ends,
and the checkpoint written at the end of the run holds them durably.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, Durability, Interrupt

from graph.errors import WorkflowError
from graph.features import AnalyzerPolicy, AnalyzerRoute
from graph.history import fork_checkpoint, last_good_checkpoint, thread_config
from graph.nodes import RESEARCH_WORKERS, ContextualNodes
from graph.recovery import StateRecovery, load_checked_state
from graph.state import JSON, ContextState, outbox_result
from graph.tracing import GraphTelemetry, run_scope, traced_node
from graph.work import Dispatch

__all__ = [
    "ContextualGraph",
    "RunResult",
    "build_contextual_workflow",
    "paused_event_id",
    "resume_workflow",
    "run_events",
    "thread_config",
]

_ROUTES: dict[Hashable, str] = {
    AnalyzerRoute.DEEP_ANALYSIS_NEEDED.value: "adaptive_processor",
    AnalyzerRoute.CONTEXT_SHIFT_DETECTED.value: "context_updater",
    AnalyzerRoute.CONTINUE_MONITORING.value: "continuous_monitor",
    AnalyzerRoute.DECISION_POINT_REACHED.value: "decision_engine",
    AnalyzerRoute.PROCESSING_COMPLETE.value: END,
}

ContextualGraph = CompiledStateGraph[ContextState, None, ContextState, ContextState]


_Route = Hashable | Sequence[Hashable]


def _on_loop(
    route: Callable[[ContextState], _Route],
) -> Callable[[ContextState], Awaitable[_Route]]:
    """A conditional edge as a coroutine function.

    LangGraph runs a plain function edge in a thread pool under ``astream``; for an edge
    that only reads a channel, the hand-off cost more than the whole rest of the step
    (docs/performance.md). As a coroutine it runs on the event loop.
    """

    async def edge(state: ContextState) -> _Route:
        return route(state)

    edge.__name__ = getattr(route, "__name__", "edge")
    return edge


def build_contextual_workflow(
    dispatch: Dispatch,
    checkpointer: BaseCheckpointSaver[str] | None,
    *,
    policy: AnalyzerPolicy | None = None,
    escalation_pauses: bool = False,
    telemetry: GraphTelemetry | None = None,
) -> ContextualGraph:
    """Build and compile the contextual workflow.

    Args:
        dispatch: where the nodes send their work.
        checkpointer: the durable store (AsyncRedisSaver by default); None for no memory.
        policy: the analyzer's thresholds and iteration budget.
        escalation_pauses: interrupt on ``escalation_required`` until resumed.
        telemetry: tracer and instruments for node spans (graph/tracing.py); the
            global tracer and no metrics if None.
    """
    tel = telemetry or GraphTelemetry.from_global()
    nodes = ContextualNodes(
        dispatch, policy or AnalyzerPolicy(), escalation_pauses=escalation_pauses
    )
    builder = StateGraph(ContextState)

    def add(name: str, fn: Callable[[ContextState], Awaitable[dict[str, JSON]]]) -> None:
        builder.add_node(name, traced_node(name, fn, tel))  # a span per node run

    add("context_analyzer", nodes.context_analyzer)
    add("adaptive_processor", nodes.adaptive_processor)
    add("context_updater", nodes.context_updater)
    add("continuous_monitor", nodes.continuous_monitor)
    add("decision_engine", nodes.decision_engine)
    for worker in RESEARCH_WORKERS.values():
        builder.add_node(worker, traced_node(worker, nodes.research_worker, tel))  # type: ignore[type-var]
        builder.add_edge(worker, "context_analyzer")
    builder.add_edge(START, "context_analyzer")
    builder.add_conditional_edges("context_analyzer", _on_loop(nodes.next_route), _ROUTES)
    builder.add_conditional_edges(
        "adaptive_processor",
        _on_loop(nodes.fan_out),
        ["context_analyzer", *RESEARCH_WORKERS.values()],
    )
    for node in ("context_updater", "continuous_monitor", "decision_engine"):
        builder.add_edge(node, "context_analyzer")
    # debug stays off: the seed's debug=True logs every state in production.
    return builder.compile(checkpointer=checkpointer)


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run.

    Attributes:
        results: the result of every event of the run, by event id. An event that
            paused the workflow (an escalation) has its result with ``status=escalated``.
        checkpoint_id: the workflow's current checkpoint after the run (None without a
            checkpointer): the one that holds the results, or the recovery fork.
        interrupted: the run stopped at an interrupt (a paused escalation).
        paused_event_id: the event that paused the workflow, when interrupted.
        recovered_to: the last good checkpoint the workflow was rolled back to, when the
            monitor found the state changed outside the graph.
        recovery: what was done before the run because the stored state did not fit
            the schema (graph/recovery.py); the first event's result has it in ``error``.
    """

    results: Mapping[str, Mapping[str, JSON]]
    checkpoint_id: str | None
    interrupted: bool
    paused_event_id: str | None = None
    recovered_to: str | None = None
    recovery: StateRecovery | None = None


def _recursion_limit(events: int, iteration_budget: int) -> int:
    # Every analyzer visit costs at most two super-steps (node + research workers).
    return max(25, events * (iteration_budget * 2 + 4))


async def _stream(
    graph: ContextualGraph,
    run_input: ContextState | Command[None],
    config: RunnableConfig,
    durability: Durability,
) -> tuple[dict[str, JSON], str | None, dict[str, JSON] | None]:
    """Run the graph; the last values, the final checkpoint id and an interrupt's value."""
    last_values: dict[str, JSON] = {}
    checkpoint_id: str | None = None
    paused: dict[str, JSON] | None = None
    async for mode, chunk in graph.astream(
        run_input,
        config,
        stream_mode=["values", "checkpoints", "updates"],
        durability=durability,
    ):
        if mode == "values":
            last_values = cast(dict[str, JSON], chunk)
        elif mode == "checkpoints":
            written = cast(RunnableConfig, cast(dict[str, object], chunk)["config"])
            checkpoint_id = written.get("configurable", {}).get("checkpoint_id")
        elif mode == "updates" and "__interrupt__" in cast(dict[str, JSON], chunk):
            interrupts = cast(tuple[Interrupt, ...], cast(dict[str, JSON], chunk)["__interrupt__"])
            paused = dict(interrupts[0].value) if interrupts else {}
    return last_values, checkpoint_id, paused


async def _finish(
    graph: ContextualGraph,
    workflow_id: str,
    wanted: Sequence[str],
    streamed: tuple[dict[str, JSON], str | None, dict[str, JSON] | None],
    recovery: StateRecovery | None = None,
) -> RunResult:
    last_values, checkpoint_id, paused = streamed
    outbox = cast(dict[str, JSON], last_values.get("outbox") or {})
    results = {
        event_id: result
        for event_id in wanted
        if (result := outbox_result(outbox, event_id)) is not None
    }
    paused_event_id: str | None = None
    if paused is not None:
        paused_event_id = str(paused.get("event_id"))
        paused_result = paused.get("result")
        if isinstance(paused_result, dict) and paused_event_id in wanted:
            results[paused_event_id] = paused_result
    recovered_to: str | None = None
    if paused is None and any(r.get("state_integrity") == "corrupted" for r in results.values()):
        recovered_to = await last_good_checkpoint(graph, workflow_id)
        if recovered_to is not None:
            checkpoint_id = await fork_checkpoint(graph, workflow_id, recovered_to)
    if paused is None and len(results) != len(wanted):
        missing = sorted(set(wanted) - set(results))
        raise WorkflowError(f"workflow {workflow_id!r}: run ended without results for {missing}")
    if recovery is not None:
        _note_recovery(results, wanted, recovery)
    return RunResult(
        results=results,
        checkpoint_id=checkpoint_id,
        interrupted=paused is not None,
        paused_event_id=paused_event_id,
        recovered_to=recovered_to,
        recovery=recovery,
    )


def _note_recovery(
    results: dict[str, dict[str, JSON]], wanted: Sequence[str], recovery: StateRecovery
) -> None:
    """Put the recovery into the first result's ``error`` (kept with any error it has)."""
    for event_id in wanted:
        result = results.get(event_id)
        if result is not None:
            earlier = str(result.get("error") or "")
            result["error"] = f"{earlier}; {recovery.message()}" if earlier else recovery.message()
            return


async def run_events(
    graph: ContextualGraph,
    workflow_id: str,
    events: Sequence[Mapping[str, JSON]],
    *,
    base_checkpoint_id: str | None = None,
    recovery: StateRecovery | None = None,
    durability: Durability = "exit",
    iteration_budget: int = 12,
) -> RunResult:
    """Run the loop over ``events`` (one workflow, in order) and return their results.

    Without ``base_checkpoint_id`` the workflow's current state is loaded and checked
    against the schema first (:func:`graph.recovery.load_checked_state`): a stored
    state that does not fit is rolled back (or replaced by a fresh segment) before the
    run, and the first event's result says so in ``error``.

    When the monitor finds that the state was changed outside the graph (its integrity
    hash no longer matches), the workflow is rolled back to its last good checkpoint
    after the run (a fork; the history keeps the corrupted checkpoints).

    Args:
        graph: the compiled workflow.
        workflow_id: the thread id.
        events: events as :meth:`actors.service.validation.Event.as_state` gives them.
        base_checkpoint_id: the rollback point recorded when a segment closes; by
            default the workflow's current checkpoint, read and checked at the start of
            the run. A caller that gives it has checked the state itself.
        recovery: a recovery the caller did (its :func:`load_checked_state`), to report
            in the first event's result.
        durability: LangGraph's durability mode; the caller acknowledges inputs only after
            this function returns, so ``exit`` keeps every guarantee.
        iteration_budget: per-event analyzer visits, to size LangGraph's recursion limit.
    """
    config = thread_config(workflow_id)
    config["recursion_limit"] = _recursion_limit(len(events), iteration_budget)
    if base_checkpoint_id is None and graph.checkpointer:
        checked = await load_checked_state(graph, workflow_id)
        base_checkpoint_id = checked.checkpoint_id
        recovery = recovery or checked.recovery
    run_input: dict[str, JSON] = {
        "workflow_id": workflow_id,
        "inbox": [dict(e) for e in events],
        "run_size": len(events),
        "event": None,
        "base_checkpoint_id": base_checkpoint_id,
    }
    with run_scope(workflow_id):  # one invoke_workflow span per event (graph/tracing.py)
        streamed = await _stream(graph, cast(ContextState, run_input), config, durability)
    wanted = [str(e["event_id"]) for e in events]
    return await _finish(graph, workflow_id, wanted, streamed, recovery)


async def paused_event_id(graph: ContextualGraph, workflow_id: str) -> str | None:
    """The event a paused workflow waits on (an escalation), or None when not paused."""
    snapshot = await graph.aget_state(thread_config(workflow_id))
    for pending in snapshot.interrupts:
        value = pending.value
        if isinstance(value, dict) and value.get("event_id") is not None:
            return str(value["event_id"])
    return None


async def resume_workflow(
    graph: ContextualGraph,
    workflow_id: str,
    value: JSON,
    *,
    control_event_id: str,
    durability: Durability = "exit",
    iteration_budget: int = 12,
) -> RunResult:
    """Continue a paused workflow with a person's answer.

    The interrupted ``decision_engine`` runs again and ``interrupt()`` returns
    ``{"value": value, "control_event_id": control_event_id}``; the paused event then
    finishes, and its result is in :attr:`RunResult.results` under its own event id.
    Events that were queued behind it in the same run (still in the state's inbox) are
    processed too; their results land in the state's outbox.

    Raises:
        WorkflowError: the workflow is not paused.
    """
    event_id = await paused_event_id(graph, workflow_id)
    if event_id is None:
        raise WorkflowError(f"workflow {workflow_id!r} is not paused: there is nothing to resume")
    config = thread_config(workflow_id)
    # The run goes on with the events still in the paused run's inbox.
    waiting = (await graph.aget_state(config)).values.get("inbox") or []
    config["recursion_limit"] = _recursion_limit(1 + len(waiting), iteration_budget)
    answer = {"value": value, "control_event_id": control_event_id}
    with run_scope(workflow_id):
        streamed = await _stream(graph, Command(resume=answer), config, durability)
    return await _finish(graph, workflow_id, [event_id], streamed)
