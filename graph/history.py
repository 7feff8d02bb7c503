"""Time travel over a workflow's checkpoints: the latest one, the history, forks.

LangGraph keeps every checkpoint a run writes (with durability ``exit``, one per run),
so rollback points come for free: a rollback *forks* — it copies an older checkpoint
as the newest of the thread, and the history stays as it was. The same fork is the
recovery when the integrity hash shows that something outside the graph changed the
state: the workflow goes back to the newest checkpoint whose values still match their
hash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import StateSnapshot

from graph.errors import WorkflowError, exception_chain
from graph.state import JSON, integrity_hash, state_problems

if TYPE_CHECKING:
    from graph.workflow import ContextualGraph

__all__ = [
    "CheckpointInfo",
    "checkpoint_history",
    "checkpoint_ids",
    "fork_checkpoint",
    "inspect_checkpoint",
    "is_intact",
    "is_store_failure",
    "last_good_checkpoint",
    "latest_checkpoint_id",
    "thread_config",
]

_SEARCHED = 200  # checkpoints looked at for a good one, newest first
_STORE_MODULES = ("redis", "redisvl", "psycopg")


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
        values: the state values (empty when the checkpoint could not be decoded).
        problems: where it does not fit the schema (:func:`graph.state.state_problems`),
            or why it could not be decoded; empty for a sound checkpoint.
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
    problems: tuple[str, ...] = ()


def _checkpoint_id(config: Mapping[str, JSON] | None) -> str | None:
    if not config:
        return None
    configurable = config.get("configurable")
    value = configurable.get("checkpoint_id") if isinstance(configurable, dict) else None
    return str(value) if value else None


def is_intact(values: Mapping[str, JSON]) -> bool:
    """The integrity fields match the hash the graph stored (no hash yet counts as intact)."""
    stored = values.get("integrity_hash")
    return not stored or integrity_hash(values) == stored


def _info(snapshot: StateSnapshot, problems: list[str] | None = None) -> CheckpointInfo:
    values = cast(Mapping[str, JSON], snapshot.values or {})
    metadata = cast(Mapping[str, JSON], snapshot.metadata or {})
    found = state_problems(values) if problems is None else problems
    step = metadata.get("step", -1)
    events = values.get("events_processed")
    return CheckpointInfo(
        checkpoint_id=str(_checkpoint_id(cast(Mapping[str, JSON], snapshot.config))),
        parent_id=_checkpoint_id(cast(Mapping[str, JSON], snapshot.parent_config)),
        created_at=snapshot.created_at,
        source=str(metadata.get("source", "")),
        step=step if isinstance(step, int) else -1,
        events_processed=events if isinstance(events, int) and not isinstance(events, bool) else 0,
        intact=_safely_intact(values),
        paused=bool(snapshot.interrupts),
        values=values,
        problems=tuple(found),
    )


def _safely_intact(values: Mapping[str, JSON]) -> bool:
    """:func:`is_intact`, False for values the hash cannot even be computed over."""
    try:
        return is_intact(values)
    except (TypeError, ValueError):
        return False


def _undecodable(checkpoint_id: str, problems: list[str]) -> CheckpointInfo:
    return CheckpointInfo(
        checkpoint_id=checkpoint_id,
        parent_id=None,
        created_at=None,
        source="?",
        step=-1,
        events_processed=0,
        intact=False,
        paused=False,
        values={},
        problems=tuple(problems),
    )


async def latest_checkpoint_id(graph: ContextualGraph, workflow_id: str) -> str | None:
    """The workflow's current checkpoint id, or None for a workflow never run."""
    snapshot = await graph.aget_state(thread_config(workflow_id))
    return _checkpoint_id(cast(Mapping[str, JSON], snapshot.config))


async def checkpoint_history(
    graph: ContextualGraph, workflow_id: str, *, limit: int | None = None
) -> list[CheckpointInfo]:
    """The workflow's checkpoints, newest first; those that do not fit say why.

    One undecodable checkpoint fails LangGraph's whole listing, so then each
    checkpoint is loaded on its own (``ctxd state --history`` shows every one).
    """
    if not hasattr(graph.checkpointer, "checkpoints_index"):
        # The Redis saver's listing searches a case-insensitive tag (``acme`` would list
        # ``ACME``'s checkpoints too): it is read by exact ids below instead.
        try:
            return [
                _info(snapshot)
                async for snapshot in graph.aget_state_history(
                    thread_config(workflow_id), limit=limit
                )
            ]
        except Exception as exc:
            if is_store_failure(exc):
                raise
    infos: list[CheckpointInfo] = []
    for checkpoint_id in await checkpoint_ids(graph, workflow_id, limit=limit or _SEARCHED):
        snapshot, problems = await inspect_checkpoint(graph, workflow_id, checkpoint_id)
        infos.append(
            _info(snapshot, problems) if snapshot else _undecodable(checkpoint_id, problems)
        )
    return infos


async def fork_checkpoint(graph: ContextualGraph, workflow_id: str, checkpoint_id: str) -> str:
    """Make ``checkpoint_id`` the workflow's current state (a copy; history is kept).

    Returns:
        The new checkpoint's id.

    Raises:
        WorkflowError: the workflow has no such checkpoint.
    """
    config = thread_config(workflow_id, checkpoint_id)
    # The memory saver hands the config back as given, and the fork's put needs the ns.
    config["configurable"]["checkpoint_ns"] = ""
    snapshot = await graph.aget_state(config)
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


async def last_good_checkpoint(
    graph: ContextualGraph, workflow_id: str, *, skip: str | None = None
) -> str | None:
    """The newest finished checkpoint that decodes, fits the schema and matches its hash.

    Args:
        graph: the compiled workflow.
        workflow_id: the thread id.
        skip: a checkpoint known to be bad (not loaded again).
    """
    for checkpoint_id in await checkpoint_ids(graph, workflow_id):
        if checkpoint_id == skip:
            continue
        snapshot, problems = await inspect_checkpoint(graph, workflow_id, checkpoint_id)
        values = cast(Mapping[str, JSON], snapshot.values if snapshot else {})
        if snapshot is None or problems or snapshot.next or not values:
            continue
        if _safely_intact(values):
            return checkpoint_id
    return None


# -- checkpoints that may not decode ------------------------------------------------


def is_store_failure(exc: BaseException) -> bool:
    """The store was unreachable (an outage, not bad data): the caller retries later.

    Anything else raised while loading a checkpoint means its data could not be
    decoded. A Redis ``WRONGTYPE`` reply is data too: the key holds something else.
    """
    for current in exception_chain(exc):
        module = type(current).__module__.split(".")[0]
        if "WRONGTYPE" in str(current)[:40]:
            return False
        if isinstance(current, OSError) or module in _STORE_MODULES:
            return True
    return False


def _bounded(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:199] + "…"


async def inspect_checkpoint(
    graph: ContextualGraph, workflow_id: str, checkpoint_id: str | None = None
) -> tuple[StateSnapshot | None, list[str]]:
    """Load one checkpoint (the current one by default) and say what does not fit.

    Returns:
        The snapshot (None when it could not be decoded) and the problems found.

    Raises:
        Exception: the store is unreachable (:func:`is_store_failure`).
    """
    try:
        snapshot = await graph.aget_state(thread_config(workflow_id, checkpoint_id))
    except Exception as exc:
        if is_store_failure(exc):
            raise
        return None, [f"checkpoint could not be decoded ({_bounded(exc)})"]
    return snapshot, state_problems(cast(Mapping[str, object], snapshot.values or {}))


async def checkpoint_ids(
    graph: ContextualGraph, workflow_id: str, *, limit: int = _SEARCHED
) -> list[str]:
    """The workflow's checkpoint ids, newest first, without decoding any checkpoint.

    Listing the history decodes every checkpoint, and one undecodable write fails the
    whole listing; this reads ids only (the Redis saver's search index, the PostgreSQL
    saver's table, the memory saver's dict), so the good checkpoints behind a bad one
    stay reachable.
    """
    saver: Any = graph.checkpointer
    if isinstance(saver, InMemorySaver):
        return sorted(saver.storage.get(workflow_id, {}).get("", {}), reverse=True)[:limit]
    if hasattr(saver, "checkpoints_index"):  # AsyncRedisSaver
        return await _redis_checkpoint_ids(saver, workflow_id, limit)
    if type(saver).__module__.startswith("langgraph.checkpoint.postgres"):
        async with saver._cursor() as cur:  # AsyncPostgresSaver: its own connection
            await cur.execute(
                "SELECT checkpoint_id FROM checkpoints WHERE thread_id = %s"
                " AND checkpoint_ns = '' ORDER BY checkpoint_id DESC LIMIT %s",
                (workflow_id, limit),
            )
            return [str(row["checkpoint_id"]) for row in await cur.fetchall()]
    ids: list[str] = []  # another saver: its listing, as far as it decodes
    try:
        async for item in saver.alist(thread_config(workflow_id), limit=limit):
            ids.append(str(item.config["configurable"]["checkpoint_id"]))
    except Exception as exc:
        if is_store_failure(exc):
            raise
    return ids


_PAGE = 500
_TAG_SPECIAL = re.compile(r"([^A-Za-z0-9\x80-\U0010ffff])")


def thread_tag_filter(thread_id: str) -> str:
    """A RediSearch filter on the ``thread_id`` tag with every ASCII punctuation escaped.

    Tags match without regard to case, so callers still keep only the documents whose
    ``thread_id`` is exactly theirs.
    """
    return "@thread_id:{" + _TAG_SPECIAL.sub(r"\\\1", thread_id) + "}"


async def _redis_checkpoint_ids(saver: Any, workflow_id: str, limit: int) -> list[str]:
    """The Redis saver's checkpoint ids of exactly ``workflow_id``, newest first.

    Its search index holds ``thread_id`` as a tag, which RediSearch matches without
    regard to case, and LangGraph's query leaves ``_`` unescaped (``@thread_id:{_}`` is
    a syntax error). Every ASCII punctuation character is escaped here, and the ids
    found are kept only when their ``thread_id`` is exactly this workflow's, page by
    page, so a busy ``ACME`` cannot crowd ``acme``'s checkpoints out of the search.
    """
    from langgraph.checkpoint.redis.util import from_storage_safe_id, to_storage_safe_id
    from redisvl.query import FilterQuery

    thread_id = to_storage_safe_id(workflow_id)
    query = FilterQuery(
        filter_expression=thread_tag_filter(thread_id),
        return_fields=["thread_id", "checkpoint_id", "checkpoint_ns"],
        num_results=_PAGE,
        sort_by=("checkpoint_id", "DESC"),
    )
    ids: list[str] = []
    offset = 0
    while len(ids) < limit:
        query.paging(offset, _PAGE)
        found = await saver.checkpoints_index.search(query)
        ids += [
            str(from_storage_safe_id(doc["checkpoint_id"]))
            for doc in found.docs
            if doc["thread_id"] == thread_id and doc["checkpoint_ns"] in ("", "__empty__")
        ]
        offset += _PAGE
        if len(found.docs) < _PAGE:
            break
    return ids[:limit]
