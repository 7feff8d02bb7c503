"""The retention policy at work in the service (docs/operations.md, "Retention").

- **Checkpoints**: after a workflow's commit, every few runs, its owner prunes its
  history to ``CTXD_RETAIN_CHECKPOINTS`` plus what the guarantees need
  (:func:`graph.retention.prune_workflow`). It runs in the workflow's own drain task,
  between two of its batches, so it never races the workflow's runs and never holds up
  another workflow; the partition lease is checked just before anything is deleted, so
  only the owner prunes.
- **Idle workflows**: every commit stamps the workflow in ``{prefix}:workflows:{n}``
  (a sorted set per partition, score = last commit time). The owner of partition ``n``
  sweeps it every ``CTXD_TRIM_INTERVAL`` seconds and deletes the state of workflows idle
  longer than ``CTXD_IDLE_WORKFLOW_TTL`` — never one that is in flight, paused for a
  person or holding parked events.
- **Streams**: the owner of partition 0 trims ``ctxd:out`` and the DLQ to
  ``CTXD_OUTPUT_MAXLEN`` / ``CTXD_DLQ_MAXLEN`` entries; on a cluster every owner trims its
  partitions' output streams and DLQs to their share
  (:func:`actors.service.streams.trim_bounded_streams`, from actors/service/router.py);
  reply and parked streams are bounded where they are written (actors/runtime/pool.py,
  actors/service/parking.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from typing import cast

import anyio
import structlog
from langgraph.checkpoint.base import BaseCheckpointSaver
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.availability import is_outage
from actors.runtime.redis_io import text
from actors.runtime.scripts import call_script
from actors.service.parking import parked_stream
from actors.service.partitions import partition_key, partition_lease, partition_of
from graph.errors import ConfigError, FencedError
from graph.retention import (
    CheckpointStore,
    checkpoint_store,
    prune_workflow,
)
from graph.workflow import ContextualGraph, paused_event_id

__all__ = [
    "Retention",
    "workflows_key",
]

_log = structlog.get_logger("ctxd.retention")

_SWEEP_BATCH = 100
"""Idle workflows deleted per partition per sweep: a sweep stays short."""

_COUNTERS_KEPT = 100_000
"""Workflows whose runs since their last prune are counted in memory (then reset)."""


def workflows_key(settings: Settings, partition: int) -> str:
    """Partition ``partition``'s workflows by last commit time: ``{prefix}:{p<n>}:workflows``."""
    return partition_key(settings, partition, "workflows")


class Retention:
    """Pruning after commits and the idle-workflow sweep of one ingress.

    Args:
        redis: the client.
        settings: the retention bounds.
        graph: the compiled workflow (its checkpointer is pruned).
        clock: wall-clock seconds (injected by tests).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        graph: ContextualGraph,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._graph = graph
        self._clock = clock
        saver = graph.checkpointer
        self._saver = saver if isinstance(saver, BaseCheckpointSaver) else None
        self._store: CheckpointStore | None = None
        if self._saver is not None:
            try:
                self._store = checkpoint_store(self._saver)
            except ConfigError as exc:  # a saver of someone's own: kept whole
                _log.warning("checkpoints are not pruned", reason=str(exc))
        # Prune every quarter of the bound: at most retain * 1.25 checkpoints between prunes.
        self._every = max(1, settings.retain_checkpoints // 4)
        self._runs: dict[str, int] = {}
        self.pruned = 0
        """Checkpoints deleted by pruning since start."""
        self.expired = 0
        """Idle workflows deleted since start."""

    async def after_commit(self, workflow_id: str, lease: tuple[str, str]) -> None:
        """Stamp the workflow's activity and prune its history when due.

        Failures are logged, never raised: the batch is committed already, and the next
        prune catches up.
        """
        s = self._settings
        n = partition_of(workflow_id, s.partitions)
        try:
            await self._redis.zadd(workflows_key(s, n), {workflow_id: self._clock()})
            if self._store is None or not s.retain_checkpoints:
                return
            # A workflow not counted yet (first run since start) is pruned at once.
            runs = self._runs.pop(workflow_id, self._every - 1) + 1
            if runs < self._every:
                if len(self._runs) >= _COUNTERS_KEPT:
                    self._runs.clear()
                self._runs[workflow_id] = runs
                return
            self.pruned += await prune_workflow(
                self._graph,
                self._store,
                workflow_id,
                s.retain_checkpoints,
                before_delete=lambda: self._check_lease(lease),
            )
        except FencedError:
            _log.info("prune skipped: the partition has a new owner", workflow_id=workflow_id)
        except Exception as exc:  # noqa: BLE001 - the batch is committed; the next prune retries
            if is_outage(exc):  # logged once by the availability monitor
                return
            _log.warning(
                "pruning checkpoints failed; retried after a later run",
                workflow_id=workflow_id,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )

    async def _check_lease(self, lease: tuple[str, str]) -> None:
        current = await self._redis.get(lease[0])
        if current is None or text(current) != lease[1]:
            raise FencedError(f"lease {lease[0]} is not ours any more")

    async def sweep(
        self,
        stopping: anyio.Event,
        owned: Mapping[int, str],
        busy: Container[str],
    ) -> None:
        """Delete idle workflows of the owned partitions every ``CTXD_TRIM_INTERVAL``.

        Args:
            stopping: ends the loop.
            owned: the partitions this instance owns (live), with their lease values.
            busy: the workflows queued or running in this instance (live).
        """
        s = self._settings
        if not s.idle_workflow_ttl or self._store is None:
            return
        interval = s.trim_interval or 60.0
        while not stopping.is_set():
            with anyio.move_on_after(interval):
                await stopping.wait()
            for n, value in list(owned.items()):
                if stopping.is_set():
                    return
                try:
                    await self.sweep_partition(n, value, busy)
                except FencedError:
                    continue
                except Exception as exc:  # noqa: BLE001 - a sweep never stops the service
                    if is_outage(exc):  # the availability monitor logs it, once
                        break
                    _log.warning(
                        "idle sweep failed; tried again next time",
                        partition=n,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                    )

    async def sweep_partition(self, n: int, value: str, busy: Container[str]) -> int:
        """Delete the state of partition ``n``'s workflows idle past the TTL.

        Args:
            n: the partition.
            value: this instance's lease value on it (checked before each deletion).
            busy: the workflows queued or running in this instance.

        Returns:
            How many workflows were deleted.

        Raises:
            FencedError: the partition is not ours any more.
        """
        s = self._settings
        if self._store is None or not s.idle_workflow_ttl:
            return 0
        key = workflows_key(s, n)
        now = self._clock()
        cutoff = now - s.idle_workflow_ttl
        idle = cast(
            list[bytes | str],
            await self._redis.zrangebyscore(key, "-inf", cutoff, start=0, num=_SWEEP_BATCH),
        )
        lease = (partition_lease(s, n)[0], value)
        deleted = 0
        for raw in idle:
            workflow_id = text(raw)
            if workflow_id in busy:
                continue
            if (
                await paused_event_id(self._graph, workflow_id) is not None
                or await self._redis.xlen(parked_stream(s, workflow_id)) > 0
            ):
                # A person's escalation is never expired; look again after another TTL.
                await self._redis.zadd(key, {workflow_id: now})
                continue
            await self._check_lease(lease)
            checkpoints = await self._store.delete_thread(workflow_id)
            # Forgotten only if it did not commit again since its score was read.
            await call_script(
                self._redis, scripts.ZREM_IF_IDLE, keys=[key], args=[workflow_id, cutoff]
            )
            deleted += 1
            self.expired += 1
            _log.info(
                "idle workflow's state deleted",
                workflow_id=workflow_id,
                checkpoints=checkpoints,
                idle_seconds=s.idle_workflow_ttl,
            )
        return deleted
