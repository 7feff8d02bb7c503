"""Retention of checkpoints: prune a workflow's history, or delete all of it.

LangGraph keeps every checkpoint a run writes, and at 25-28 KB each a service meant to
run for months fills its store in days. :func:`prune_workflow` keeps the newest
``retain`` checkpoints of a workflow **plus every checkpoint a guarantee needs**:

- the current one (a paused escalation waits in it, with its interrupt writes);
- the rollback points the state's closed segments name (``segments[*].checkpoint_id``);
- the last good checkpoint (the newest finished one whose values match their integrity
  hash), which integrity recovery forks from when the current one was changed outside
  the graph.

A pruned checkpoint goes with everything stored for it, so nothing is left orphaned:
on Redis its JSON document (and so its search-index entry), its pending writes and the
write registry's sorted set, in one ``MULTI``; on PostgreSQL its row, its writes and
the channel blobs no remaining checkpoint refers to, in one transaction.
:func:`delete_workflow_state` removes a workflow's whole history (``ctxd forget``).

The stores are reached through :func:`checkpoint_store`, one small adapter per saver
ctxd offers (Redis, PostgreSQL, memory), because the savers' own ``aprune`` only knows
"keep the latest N" and cannot keep the checkpoints above.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver

from graph.errors import ConfigError
from graph.history import is_intact, last_good_checkpoint, thread_config, thread_tag_filter
from graph.state import JSON

if TYPE_CHECKING:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from langgraph.checkpoint.redis.aio import AsyncRedisSaver

    from graph.workflow import ContextualGraph

__all__ = [
    "CheckpointStore",
    "checkpoint_store",
    "delete_workflow_state",
    "protected_checkpoints",
    "prune_workflow",
]

_PAGE = 1000
"""Checkpoints fetched per index query; pruning keeps far fewer than this."""


class CheckpointStore(Protocol):
    """What pruning needs from a checkpoint saver: list ids, delete some, delete all."""

    async def checkpoint_ids(self, thread_id: str) -> list[tuple[str, str]]:
        """The thread's checkpoints as ``(checkpoint_ns, checkpoint_id)``, any order."""
        ...

    async def delete_checkpoints(self, thread_id: str, ns: str, ids: Sequence[str]) -> None:
        """Delete these checkpoints of one namespace with their writes and blobs."""
        ...

    async def delete_thread(self, thread_id: str) -> int:
        """Delete every checkpoint, write and blob of the thread; return how many
        checkpoints went."""
        ...


def checkpoint_store(saver: BaseCheckpointSaver[str]) -> CheckpointStore:
    """The pruning adapter of ``saver`` (the savers :func:`open_checkpointer` makes).

    Raises:
        ConfigError: a saver ctxd does not make.
    """
    if isinstance(saver, InMemorySaver):
        return _MemoryStore(saver)
    name = type(saver).__mro__
    if any(c.__name__ == "AsyncRedisSaver" for c in name):
        return _RedisStore(cast("AsyncRedisSaver", saver))
    if any(c.__name__ == "AsyncPostgresSaver" for c in name):
        return _PostgresStore(cast("AsyncPostgresSaver", saver))
    raise ConfigError(f"no retention support for checkpointer {type(saver).__name__!r}")


async def protected_checkpoints(graph: ContextualGraph, workflow_id: str) -> set[str]:
    """The checkpoints pruning must keep whatever their age (see the module's docstring)."""
    snapshot = await graph.aget_state(thread_config(workflow_id))
    configurable = snapshot.config.get("configurable") or {}
    head = configurable.get("checkpoint_id")
    if head is None:
        return set()
    kept = {str(head)}
    values = cast(Mapping[str, JSON], snapshot.values or {})
    segments = values.get("segments")
    for segment in segments if isinstance(segments, list) else []:
        if isinstance(segment, Mapping) and segment.get("checkpoint_id"):
            kept.add(str(segment["checkpoint_id"]))
    if snapshot.next or not values or not is_intact(values):
        good = await last_good_checkpoint(graph, workflow_id)
        if good is not None:
            kept.add(good)
    return kept


async def prune_workflow(
    graph: ContextualGraph,
    store: CheckpointStore,
    workflow_id: str,
    retain: int,
    *,
    before_delete: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Keep the newest ``retain`` checkpoints of the workflow plus the protected ones.

    Args:
        graph: the compiled workflow (reads the current state).
        store: :func:`checkpoint_store` of the graph's saver.
        workflow_id: the thread.
        retain: checkpoints to keep per namespace; 0 keeps everything.
        before_delete: awaited just before anything is deleted (the partition-lease
            check: only the workflow's owner prunes it); raising stops the prune.

    Returns:
        How many checkpoints were deleted.
    """
    if retain <= 0:
        return 0
    by_ns: dict[str, list[str]] = defaultdict(list)
    for ns, checkpoint_id in await store.checkpoint_ids(workflow_id):
        by_ns[ns].append(checkpoint_id)
    if all(len(ids) <= retain for ids in by_ns.values()):
        return 0
    protected = await protected_checkpoints(graph, workflow_id)
    doomed: dict[str, list[str]] = {}
    for ns, ids in by_ns.items():
        newest_first = sorted(ids, reverse=True)  # ids are time-ordered (uuid6)
        keep = set(newest_first[:retain]) | (protected if ns == "" else set())
        evict = [i for i in newest_first if i not in keep]
        if evict:
            doomed[ns] = evict
    if not doomed:
        return 0
    if before_delete is not None:
        await before_delete()
    for ns, evict in doomed.items():
        await store.delete_checkpoints(workflow_id, ns, evict)
    return sum(len(evict) for evict in doomed.values())


async def delete_workflow_state(saver: BaseCheckpointSaver[str], workflow_id: str) -> int:
    """Delete every checkpoint of the workflow with its writes, blobs and index entries.

    Returns:
        How many checkpoints were deleted.
    """
    return await checkpoint_store(saver).delete_thread(workflow_id)


# -- Redis ------------------------------------------------------------------------------


class _RedisStore:
    """langgraph-checkpoint-redis: JSON documents found through its search indexes."""

    def __init__(self, saver: AsyncRedisSaver) -> None:
        self._saver = saver

    async def checkpoint_ids(self, thread_id: str) -> list[tuple[str, str]]:
        from langgraph.checkpoint.redis.util import from_storage_safe_str, to_storage_safe_id
        from redisvl.query import FilterQuery

        safe = to_storage_safe_id(thread_id)
        query = FilterQuery(
            filter_expression=thread_tag_filter(safe),
            return_fields=["thread_id", "checkpoint_ns", "checkpoint_id"],
            num_results=_PAGE,
        )
        found: list[tuple[str, str]] = []
        offset = 0
        while True:
            query.paging(offset, _PAGE)
            docs = (await self._saver.checkpoints_index.search(query)).docs
            found += [  # tags ignore case: keep this workflow's own
                (from_storage_safe_str(str(d.checkpoint_ns)), str(d.checkpoint_id))
                for d in docs
                if str(d.thread_id) == safe
            ]
            if len(docs) < _PAGE:
                return found
            offset += _PAGE

    async def _write_keys(self, thread_id: str, ids: set[str] | None) -> list[str]:
        """The keys of the thread's pending writes (of checkpoints ``ids``; all if None)."""
        from langgraph.checkpoint.redis.util import from_storage_safe_str, to_storage_safe_id
        from redisvl.query import FilterQuery

        safe = to_storage_safe_id(thread_id)
        query = FilterQuery(
            filter_expression=thread_tag_filter(safe),
            return_fields=["thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx"],
            num_results=_PAGE,
        )
        keys: list[str] = []
        offset = 0
        while True:
            query.paging(offset, _PAGE)
            docs = (await self._saver.checkpoint_writes_index.search(query)).docs
            for d in docs:
                if str(d.thread_id) != safe:  # tags ignore case
                    continue
                if ids is None or str(d.checkpoint_id) in ids:
                    keys.append(
                        self._saver._make_redis_checkpoint_writes_key(
                            safe,
                            from_storage_safe_str(str(d.checkpoint_ns)),
                            str(d.checkpoint_id),
                            str(d.task_id),
                            int(d.idx),
                        )
                    )
            if len(docs) < _PAGE:
                return keys
            offset += _PAGE

    async def delete_checkpoints(self, thread_id: str, ns: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        saver = self._saver
        keys = await self._write_keys(thread_id, set(ids))
        for checkpoint_id in ids:
            if saver._key_registry is not None:
                keys.append(
                    saver._key_registry.make_write_keys_zset_key(thread_id, ns, checkpoint_id)
                )
            keys.append(saver._make_redis_checkpoint_key(thread_id, ns, checkpoint_id))
        if saver.cluster_mode:  # keys of many slots unless the prefix has a hash tag
            for key in keys:
                await saver._redis.delete(key)
            return
        # One MULTI: a cancelled or failed prune leaves a checkpoint whole or gone.
        async with saver._redis.pipeline(transaction=True) as pipe:
            for start in range(0, len(keys), 500):
                pipe.delete(*keys[start : start + 500])
            await pipe.execute()

    async def delete_thread(self, thread_id: str) -> int:
        deleted = 0
        namespaces: set[str] = set()
        while ids := await self.checkpoint_ids(thread_id):
            by_ns: dict[str, list[str]] = defaultdict(list)
            for ns, checkpoint_id in ids:
                by_ns[ns].append(checkpoint_id)
            for ns, chunk in by_ns.items():
                await self.delete_checkpoints(thread_id, ns, chunk)
                namespaces.add(ns)
            deleted += len(ids)
        leftover = await self._write_keys(thread_id, None)  # of a checkpoint never saved
        latest = [
            self._saver._make_redis_checkpoint_latest_key(thread_id, ns) for ns in namespaces | {""}
        ]
        for key in [*leftover, *latest]:  # one by one: valid on a cluster too
            await self._saver._redis.delete(key)
        return deleted


# -- PostgreSQL -------------------------------------------------------------------------

_PG_IDS = "SELECT checkpoint_ns, checkpoint_id FROM checkpoints WHERE thread_id = %s"
_PG_DELETE_WRITES = """
DELETE FROM checkpoint_writes
WHERE thread_id = %s AND checkpoint_ns = %s AND checkpoint_id = ANY(%s)
"""
_PG_DELETE_CHECKPOINTS = """
DELETE FROM checkpoints
WHERE thread_id = %s AND checkpoint_ns = %s AND checkpoint_id = ANY(%s)
RETURNING checkpoint -> 'channel_versions' AS versions
"""
# The kept checkpoints whose parent went: LangGraph reads no parent for current
# checkpoints (format v4), and a dangling id would only mislead a person.
_PG_ORPHAN_PARENTS = """
UPDATE checkpoints SET parent_checkpoint_id = NULL
WHERE thread_id = %s AND checkpoint_ns = %s AND parent_checkpoint_id = ANY(%s)
"""
_PG_REFERENCED = """
SELECT DISTINCT v.key AS channel, v.value AS version
FROM checkpoints c CROSS JOIN LATERAL jsonb_each_text(c.checkpoint -> 'channel_versions') AS v
WHERE c.thread_id = %s AND c.checkpoint_ns = %s
"""
_PG_DELETE_BLOBS = """
DELETE FROM checkpoint_blobs
WHERE thread_id = %s AND checkpoint_ns = %s AND channel = %s AND version = ANY(%s)
"""


class _PostgresStore:
    """langgraph-checkpoint-postgres: checkpoints, checkpoint_writes, checkpoint_blobs."""

    def __init__(self, saver: AsyncPostgresSaver) -> None:
        self._saver = saver

    async def checkpoint_ids(self, thread_id: str) -> list[tuple[str, str]]:
        async with self._saver._cursor() as cur:
            await cur.execute(_PG_IDS, (thread_id,))
            rows = await cur.fetchall()
        return [(str(r["checkpoint_ns"]), str(r["checkpoint_id"])) for r in rows]

    async def delete_checkpoints(self, thread_id: str, ns: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        doomed = list(ids)
        async with self._saver._cursor() as cur, cur.connection.transaction():
            await cur.execute(_PG_DELETE_WRITES, (thread_id, ns, doomed), prepare=False)
            await cur.execute(_PG_DELETE_CHECKPOINTS, (thread_id, ns, doomed), prepare=False)
            freed: dict[str, set[str]] = defaultdict(set)
            for row in await cur.fetchall():
                for channel, version in cast(dict[str, Any], row["versions"] or {}).items():
                    freed[channel].add(str(version))
            await cur.execute(_PG_ORPHAN_PARENTS, (thread_id, ns, doomed), prepare=False)
            await cur.execute(_PG_REFERENCED, (thread_id, ns), prepare=False)
            for row in await cur.fetchall():
                freed[str(row["channel"])].discard(str(row["version"]))
            for channel, versions in freed.items():
                if versions:
                    await cur.execute(
                        _PG_DELETE_BLOBS, (thread_id, ns, channel, sorted(versions)), prepare=False
                    )

    async def delete_thread(self, thread_id: str) -> int:
        count = len(await self.checkpoint_ids(thread_id))
        await self._saver.adelete_thread(thread_id)
        return count


# -- memory -----------------------------------------------------------------------------


class _MemoryStore:
    """LangGraph's ``InMemorySaver`` (one process; tests and demos)."""

    def __init__(self, saver: InMemorySaver) -> None:
        self._saver = saver

    async def checkpoint_ids(self, thread_id: str) -> list[tuple[str, str]]:
        namespaces = self._saver.storage.get(thread_id, {})
        return [(ns, cid) for ns, checkpoints in namespaces.items() for cid in checkpoints]

    async def delete_checkpoints(self, thread_id: str, ns: str, ids: Sequence[str]) -> None:
        saver = self._saver
        checkpoints = saver.storage.get(thread_id, {}).get(ns, {})
        for checkpoint_id in ids:
            checkpoints.pop(checkpoint_id, None)
            saver.writes.pop((thread_id, ns, checkpoint_id), None)
        referenced = {
            (channel, version)
            for stored, _, _ in checkpoints.values()
            for channel, version in saver.serde.loads_typed(stored)
            .get("channel_versions", {})
            .items()
        }
        for key in [k for k in saver.blobs if k[0] == thread_id and k[1] == ns]:
            if (key[2], key[3]) not in referenced:
                del saver.blobs[key]

    async def delete_thread(self, thread_id: str) -> int:
        count = len(await self.checkpoint_ids(thread_id))
        await self._saver.adelete_thread(thread_id)
        return count
