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

import json
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Durability

from graph.errors import WorkflowError
from graph.features import AnalyzerPolicy, AnalyzerRoute
from graph.nodes import RESEARCH_WORKERS, ContextualNodes
from graph.state import JSON, ContextState
from graph.work import Dispatch

__all__ = ["ContextualGraph", "RunResult", "build_contextual_workflow", "thread_config"]

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


def thread_config(workflow_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    """The LangGraph config addressing one workflow (optionally one of its checkpoints)."""
    configurable: dict[str, str] = {"thread_id": workflow_id}
    if checkpoint_id:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


def build_contextual_workflow(
    dispatch: Dispatch,
    checkpointer: BaseCheckpointSaver[str] | None,
    *,
    policy: AnalyzerPolicy | None = None,
    escalation_pauses: bool = False,
) -> ContextualGraph:
    """Build and compile the contextual workflow.

    Args:
        dispatch: where the nodes send their work.
        checkpointer: the durable store (AsyncRedisSaver by default); None for no memory.
        policy: the analyzer's thresholds and iteration budget.
        escalation_pauses: interrupt on ``escalation_required`` until resumed.
    """
    nodes = ContextualNodes(
        dispatch, policy or AnalyzerPolicy(), escalation_pauses=escalation_pauses
    )
    builder = StateGraph(ContextState)
    builder.add_node("context_analyzer", nodes.context_analyzer)
    builder.add_node("adaptive_processor", nodes.adaptive_processor)
    builder.add_node("context_updater", nodes.context_updater)
    builder.add_node("continuous_monitor", nodes.continuous_monitor)
    builder.add_node("decision_engine", nodes.decision_engine)
    for worker in RESEARCH_WORKERS.values():
        builder.add_node(worker, nodes.research_worker)  # type: ignore[arg-type]
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
        results: the result of every event of the run, by event id.
        checkpoint_id: the checkpoint that holds them (None without a checkpointer).
        interrupted: the run stopped at an interrupt (a paused escalation).
    """

    results: Mapping[str, Mapping[str, JSON]]
    checkpoint_id: str | None
    interrupted: bool


async def run_events(
    graph: ContextualGraph,
    workflow_id: str,
    events: Sequence[Mapping[str, JSON]],
    *,
    base_checkpoint_id: str | None = None,
    durability: Durability = "exit",
    iteration_budget: int = 12,
) -> RunResult:
    """Run the loop over ``events`` (one workflow, in order) and return their results.

    Args:
        graph: the compiled workflow.
        workflow_id: the thread id.
        events: events as :meth:`actors.validation.Event.as_state` gives them.
        base_checkpoint_id: the checkpoint the run starts from, recorded as rollback point.
        durability: LangGraph's durability mode; the caller acknowledges inputs only after
            this function returns, so ``exit`` keeps every guarantee.
        iteration_budget: per-event analyzer visits, to size LangGraph's recursion limit.
    """
    config = thread_config(workflow_id)
    # Every analyzer visit costs at most two super-steps (node + research workers).
    config["recursion_limit"] = max(25, len(events) * (iteration_budget * 2 + 4))
    run_input: dict[str, JSON] = {
        "workflow_id": workflow_id,
        "inbox": [dict(e) for e in events],
        "event": None,
        "base_checkpoint_id": base_checkpoint_id,
    }
    last_values: dict[str, JSON] = {}
    checkpoint_id: str | None = None
    interrupted = False
    async for mode, chunk in graph.astream(
        cast(ContextState, run_input),
        config,
        stream_mode=["values", "checkpoints", "updates"],
        durability=durability,
    ):
        if mode == "values":
            last_values = cast(dict[str, JSON], chunk)
        elif mode == "checkpoints":
            checkpoint_id = cast(dict[str, JSON], chunk)["config"]["configurable"].get(
                "checkpoint_id"
            )
        elif mode == "updates" and "__interrupt__" in cast(dict[str, JSON], chunk):
            interrupted = True
    outbox = cast(dict[str, str | dict[str, JSON]], last_values.get("outbox") or {})
    wanted = [str(e["event_id"]) for e in events]
    results = {event_id: _decoded(outbox[event_id]) for event_id in wanted if event_id in outbox}
    if not interrupted and len(results) != len(wanted):
        missing = sorted(set(wanted) - set(results))
        raise WorkflowError(f"workflow {workflow_id!r}: run ended without results for {missing}")
    return RunResult(results=results, checkpoint_id=checkpoint_id, interrupted=interrupted)


def _decoded(result: str | dict[str, JSON]) -> dict[str, JSON]:
    """An outbox entry: a JSON string (or a dict, as older checkpoints hold them)."""
    return cast(dict[str, JSON], json.loads(result)) if isinstance(result, str) else result
