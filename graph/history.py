"""Time travel over a workflow's checkpoints: the latest one, the history, forks.

LangGraph keeps every checkpoint a run writes (with durability ``exit``, one per run),
so rollback points come for free: a rollback *forks* — it copies an older checkpoint
as the newest of the thread, and the history stays as it was. The same fork is the
recovery when the integrity hash shows that something outside the graph changed the
state: the workflow goes back to the newest checkpoint whose values still match their
hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from langchain_core.runnables import RunnableConfig
from langgraph.types import StateSnapshot

from graph.errors import WorkflowError
from graph.state import JSON, integrity_hash

if TYPE_CHECKING:
    from graph.workflow import ContextualGraph

__all__ = [
    "CheckpointInfo",
    "checkpoint_history",
    "fork_checkpoint",
    "is_intact",
    "last_good_checkpoint",
    "latest_checkpoint_id",
    "thread_config",
]


def thread_config(workflow_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    """The LangGraph config addressing one workflow (optionally one of its checkpoints)."""
    configurable: dict[str, str] = {"thread_id": workflow_id}
    if checkpoint_id:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a workflow, as a person needs to see it.

    Attributes:
        checkpoint_id: the id (``ctxd rollback --to`` takes it).
        parent_id: the checkpoint it follows, if any.
        created_at: ISO-8601 time it was written.
        source: LangGraph's ``input|loop|update|fork``.
        step: LangGraph's super-step number.
        events_processed: the workflow's event count at that point.
        intact: its values match their integrity hash.
        paused: it waits for a person (an interrupt).
        values: the state values.
    """

    checkpoint_id: str
    parent_id: str | None
    created_at: str | None
    source: str
    step: int
    events_processed: int
    intact: bool
    paused: bool
    values: Mapping[str, JSON]


def _checkpoint_id(config: Mapping[str, JSON] | None) -> str | None:
    if not config:
        return None
    value = config.get("configurable", {}).get("checkpoint_id")
    return str(value) if value else None


def is_intact(values: Mapping[str, JSON]) -> bool:
    """The integrity fields match the hash the graph stored (no hash yet counts as intact)."""
    stored = values.get("integrity_hash")
    return not stored or integrity_hash(values) == stored


def _info(snapshot: StateSnapshot) -> CheckpointInfo:
    values = cast(Mapping[str, JSON], snapshot.values or {})
    metadata = cast(Mapping[str, JSON], snapshot.metadata or {})
    return CheckpointInfo(
        checkpoint_id=str(_checkpoint_id(cast(Mapping[str, JSON], snapshot.config))),
        parent_id=_checkpoint_id(cast(Mapping[str, JSON], snapshot.parent_config)),
        created_at=snapshot.created_at,
        source=str(metadata.get("source", "")),
        step=int(metadata.get("step", -1)),
        events_processed=int(values.get("events_processed") or 0),
        intact=is_intact(values),
        paused=bool(snapshot.interrupts),
        values=values,
    )


async def latest_checkpoint_id(graph: ContextualGraph, workflow_id: str) -> str | None:
    """The workflow's current checkpoint id, or None for a workflow never run."""
    snapshot = await graph.aget_state(thread_config(workflow_id))
    return _checkpoint_id(cast(Mapping[str, JSON], snapshot.config))


async def checkpoint_history(
    graph: ContextualGraph, workflow_id: str, *, limit: int | None = None
) -> list[CheckpointInfo]:
    """The workflow's checkpoints, newest first."""
    return [
        _info(snapshot)
        async for snapshot in graph.aget_state_history(thread_config(workflow_id), limit=limit)
    ]


async def fork_checkpoint(graph: ContextualGraph, workflow_id: str, checkpoint_id: str) -> str:
    """Make ``checkpoint_id`` the workflow's current state (a copy; history is kept).

    Returns:
        The new checkpoint's id.

    Raises:
        WorkflowError: the workflow has no such checkpoint.
    """
    snapshot = await graph.aget_state(thread_config(workflow_id, checkpoint_id))
    if (
        snapshot.created_at is None
        or _checkpoint_id(cast(Mapping[str, JSON], snapshot.config)) != checkpoint_id
    ):
        raise WorkflowError(
            f"workflow {workflow_id!r} has no checkpoint {checkpoint_id!r}: list them with "
            f"`ctxd state {workflow_id} --history`"
        )
    forked = await graph.aupdate_state(snapshot.config, None, as_node="__copy__")
    new_id = _checkpoint_id(cast(Mapping[str, JSON], forked))
    if new_id is None:  # pragma: no cover - LangGraph always returns the new id
        raise WorkflowError(f"workflow {workflow_id!r}: the fork wrote no checkpoint")
    return new_id


async def last_good_checkpoint(graph: ContextualGraph, workflow_id: str) -> str | None:
    """The newest finished checkpoint whose values match their integrity hash."""
    async for snapshot in graph.aget_state_history(thread_config(workflow_id)):
        values = cast(Mapping[str, JSON], snapshot.values or {})
        if values and not snapshot.next and is_intact(values):
            return _checkpoint_id(cast(Mapping[str, JSON], snapshot.config))
    return None
