"""A stored state that does not fit the schema is refused on load, and recovered from.

A checkpoint is data: anyone who can write the store can change it, and older versions
wrote other shapes. A value the nodes cannot use (``window`` = 5), a missing field, or
a checkpoint the strict serializer refuses to decode (a pickled write) would otherwise
fail every run of the workflow, and every later event would end in the DLQ as poison.

So before a batch runs, the workflow's current checkpoint is loaded once and checked
(:func:`graph.state.state_problems`; about 0.1 ms). When it does not fit, the workflow
is rolled back to its **last good checkpoint** — the newest finished one that decodes,
fits the schema and matches its integrity hash — by a LangGraph fork
(``aupdate_state(config_of_good, None, as_node="__copy__")``); when there is none, a
**fresh context segment** is written on top of the bad checkpoint. Either way the bad
checkpoints stay in the history for inspection, and the batch then runs normally; the
first event's result carries the recovery in its ``error``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import structlog
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointMetadata
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import StateSnapshot

from graph.errors import WorkflowError
from graph.history import (
    checkpoint_ids,
    fork_checkpoint,
    inspect_checkpoint,
    last_good_checkpoint,
    thread_config,
)
from graph.state import JSON, integrity_hash

if TYPE_CHECKING:
    from graph.workflow import ContextualGraph

__all__ = ["CheckedState", "StateRecovery", "load_checked_state"]

_log = structlog.get_logger("ctxd.recovery")
_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class StateRecovery:
    """What was done about a checkpoint that did not fit the schema.

    Attributes:
        bad_checkpoint_id: the refused checkpoint (None when even its id was unreadable).
        problems: what did not fit, field by field (bounded).
        restored_from: the last good checkpoint forked; None for a fresh segment.
        checkpoint_id: the workflow's new current checkpoint.
    """

    bad_checkpoint_id: str | None
    problems: tuple[str, ...]
    restored_from: str | None
    checkpoint_id: str

    def message(self) -> str:
        """One bounded line for the event's ``error`` and the log."""
        what = "; ".join(self.problems) or "unknown problem"
        if len(what) > _MESSAGE_CHARS:
            what = what[: _MESSAGE_CHARS - 1] + "…"
        done = (
            f"rolled back to checkpoint {self.restored_from}"
            if self.restored_from
            else "no good checkpoint left: started a fresh context segment"
        )
        return (
            f"stored state of checkpoint {self.bad_checkpoint_id or '?'} "
            f"did not fit the schema ({what}); {done}"
        )


@dataclass(frozen=True)
class CheckedState:
    """The workflow's current state after the load check.

    Attributes:
        snapshot: the current state (after a recovery, the recovered one).
        recovery: what was done when the stored state did not fit; None when it did.
    """

    snapshot: StateSnapshot
    recovery: StateRecovery | None

    @property
    def checkpoint_id(self) -> str | None:
        """The current checkpoint's id (None for a workflow never run)."""
        value = (self.snapshot.config.get("configurable") or {}).get("checkpoint_id")
        return str(value) if value else None


def _snapshot_id(snapshot: StateSnapshot) -> str | None:
    value = (snapshot.config.get("configurable") or {}).get("checkpoint_id")
    return str(value) if value else None


async def load_checked_state(graph: ContextualGraph, workflow_id: str) -> CheckedState:
    """The workflow's current state, checked against the schema and recovered if needed.

    Raises:
        Exception: the store is unreachable (the caller retries; nothing was changed).
    """
    snapshot, problems = await inspect_checkpoint(graph, workflow_id)
    if not problems and snapshot is not None:
        return CheckedState(snapshot, None)
    bad_id = _snapshot_id(snapshot) if snapshot is not None else None
    if bad_id is None:
        newest = await checkpoint_ids(graph, workflow_id, limit=1)
        bad_id = newest[0] if newest else None
    recovery = await _recover(graph, workflow_id, bad_id, problems, snapshot)
    _log.warning(
        "stored state did not fit the schema; recovered",
        workflow_id=workflow_id,
        checkpoint_id=bad_id,
        problems=list(recovery.problems),
        restored_from=recovery.restored_from,
        new_checkpoint_id=recovery.checkpoint_id,
    )
    current, still = await inspect_checkpoint(graph, workflow_id)
    if current is None or still:  # pragma: no cover - the recovery wrote a fitting state
        raise WorkflowError(
            f"workflow {workflow_id!r}: the recovered state does not fit either ({still[:2]})"
        )
    return CheckedState(current, recovery)


async def _recover(
    graph: ContextualGraph,
    workflow_id: str,
    bad_id: str | None,
    problems: list[str],
    bad: StateSnapshot | None,
) -> StateRecovery:
    good = await last_good_checkpoint(graph, workflow_id, skip=bad_id)
    if good is not None:
        # The LangGraph fork, as `ctxd rollback` does: aupdate_state(..., "__copy__").
        forked = await fork_checkpoint(graph, workflow_id, good)
        return StateRecovery(
            bad_checkpoint_id=bad_id,
            problems=tuple(problems),
            restored_from=good,
            checkpoint_id=forked,
        )
    new_id = await _write_fresh_segment(graph, workflow_id, bad_id, bad)
    return StateRecovery(
        bad_checkpoint_id=bad_id, problems=tuple(problems), restored_from=None, checkpoint_id=new_id
    )


def _fresh_values(workflow_id: str, bad_id: str | None, old: Mapping[str, JSON]) -> dict[str, JSON]:
    """A new, empty context segment; the counters go on when they were sound."""

    def counter(name: str, step: int = 0) -> int:
        value = old.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value + step
        return 0

    values: dict[str, JSON] = {
        "workflow_id": workflow_id,
        "window": [],
        "segment": counter("segment", 1),
        "segments": [],
        "analysis": "",
        "analysis_fields": {},
        "quality": 0.0,
        "events_processed": counter("events_processed"),
        "error_count": counter("error_count"),
        "decisions": [],
        "health": {},
        "outbox": {},
        "inbox": [],
        "run_size": 0,
        "event": None,
        "iteration": 0,
        "passes": 0,
        "drift": 0.0,
        "monitored": False,
        "decided": False,
        "retry_requested": False,
        "segment_rotated": False,
        "research": {},
        "route": [],
        "errors": [],
        "decision": None,
        "route_reason": "",
        "next_route": "processing_complete",
        "analysis_stale": False,
        "base_checkpoint_id": bad_id,
    }
    values["integrity_hash"] = integrity_hash(values)
    return values


async def _write_fresh_segment(
    graph: ContextualGraph, workflow_id: str, bad_id: str | None, bad: StateSnapshot | None
) -> str:
    """Write a fresh state as the workflow's newest checkpoint, a child of the bad one.

    The bad checkpoint may not decode, so LangGraph cannot build on it
    (``aupdate_state`` loads it first). The new checkpoint is built by the same graph
    on a scratch in-memory saver and stored through the real saver's ``aput``.
    """
    old = cast(Mapping[str, JSON], bad.values if bad is not None else {}) or {}
    scratch_saver = InMemorySaver()
    scratch = graph.copy(update={"checkpointer": scratch_saver})
    config = thread_config(workflow_id)
    await scratch.aupdate_state(
        config, _fresh_values(workflow_id, bad_id, old), as_node="context_analyzer"
    )
    built = await scratch_saver.aget_tuple(config)
    saver = graph.checkpointer
    if built is None or saver is None or isinstance(saver, bool):  # pragma: no cover
        raise WorkflowError(f"workflow {workflow_id!r}: no checkpointer to write a fresh state")
    parent: RunnableConfig = {
        "configurable": {"thread_id": workflow_id, "checkpoint_ns": ""}
        | ({"checkpoint_id": bad_id} if bad_id else {})
    }
    metadata: CheckpointMetadata = {**built.metadata, "source": "update", "parents": {}}
    stored = await saver.aput(
        parent, built.checkpoint, metadata, dict(built.checkpoint["channel_versions"])
    )
    return str(stored["configurable"]["checkpoint_id"])
