"""The partition readers: one fenced reader per owned partition, feeding the scheduler.

Every owner of a partition reads it under the fixed consumer name ``owner``, so a new
owner inherits the pending list of the one before and reads it first (cursor ``0``),
then new entries (``>``) — the loop is :func:`~actors.runtime.consumer.consume_group`.
Each read runs in a Lua script that first checks the partition lease
(:class:`~actors.service.gateway.FencedReader`): a paused instance whose lease expired
must not move new entries into the pending list after the new owner has read it.

:class:`PartitionReaders` is one supervised child holding a reader task per partition
that :class:`~actors.service.ownership.Ownership` says to read: it starts and stops them
as partitions come and go. A reader that crashes takes the group down, and its restart
starts every reader again from its pending list; entries already queued or running are
recognised by the scheduler (same partition, same lease) and not admitted twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.consumer import consume_group
from actors.runtime.redis_io import Entry
from actors.runtime.supervisor import crash_unwrapped
from actors.service.fenced_source import FencedGroupSource
from actors.service.gateway import FencedReader
from actors.service.lease import renew_period
from actors.service.ownership import Ownership
from actors.service.partitions import OWNER_CONSUMER, partition_lease, partition_stream
from actors.service.scheduler import Scheduler
from graph.errors import FencedError

__all__ = ["PartitionReaders", "ReadHook"]

_log = structlog.get_logger("ctxd.ingress")  # the ingress's lines, as before the split

ReadHook = Callable[[int, list[Entry]], Awaitable[None]]
"""Test seam: awaited with each batch a partition reader read, before it is admitted
(an exception here is a crash of the reader)."""


@dataclass
class _Running:
    value: str
    epoch: int
    scope: anyio.CancelScope
    ended: bool = False


class PartitionReaders:
    """Runs one reader per partition to read, as ownership and the scheduler say.

    Args:
        redis: the client.
        settings: validated settings.
        ownership: which partitions to read, with which lease value.
        scheduler: where read entries go; its epoch says when to read pending again.
        reading_allowed: asked before each read (False while a breaker is open).
        availability: the process's Redis monitor: reading pauses during an outage.
        stopping: ends every reader once set.
        hook: test seam (:data:`ReadHook`).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        ownership: Ownership,
        scheduler: Scheduler,
        *,
        reading_allowed: Callable[[], bool],
        availability: RedisAvailability,
        stopping: anyio.Event,
        hook: ReadHook | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._ownership = ownership
        self._scheduler = scheduler
        self._reading_allowed = reading_allowed
        self._availability = availability
        self._stopping = stopping
        self._hook = hook
        self._reader = FencedReader(redis, group=settings.group, consumer=OWNER_CONSUMER)
        self._changed = anyio.Event()
        self._running: dict[int, _Running] = {}

    def changed(self) -> None:
        """Partitions came or went, or the scheduler restarted: reconcile the readers."""
        self._changed.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep a reader on every partition to read until stopped.

        A reader's crash ends this task group (and so this child); the restart starts
        every reader again, each from its pending list.
        """
        self._running.clear()
        period = renew_period(self._settings.lease_ttl)
        with crash_unwrapped():
            async with anyio.create_task_group() as tg:
                task_status.started()
                while not self._stopping.is_set():
                    self._changed = anyio.Event()
                    self._reconcile(tg)
                    with anyio.move_on_after(period):  # a missed change is caught up soon
                        await _first(self._changed, self._stopping)
                tg.cancel_scope.cancel()

    def _reconcile(self, tg: TaskGroup) -> None:
        wanted = self._ownership.readable()
        epoch = self._scheduler.epoch
        for n, reader in list(self._running.items()):
            if reader.ended or wanted.get(n) != reader.value or reader.epoch != epoch:
                reader.scope.cancel()
                del self._running[n]
        for n, value in sorted(wanted.items()):
            if n not in self._running:
                reader = self._running[n] = _Running(value, epoch, anyio.CancelScope())
                tg.start_soon(self._read, n, reader, name=f"reader.part:{n}")

    async def _read(self, n: int, reader: _Running) -> None:
        try:
            with reader.scope:
                await self._read_partition(n, reader.value, reader.epoch)
        finally:
            reader.ended = True
            self._changed.set()

    async def _read_partition(self, n: int, value: str, epoch: int) -> None:
        s = self._settings
        scheduler = self._scheduler
        source = FencedGroupSource(
            self._redis,
            self._reader,
            stream=partition_stream(s, n),
            group=s.group,
            lease=(partition_lease(s, n)[0], value),
            block_ms=s.block_ms,
        )

        async def ready() -> int | None:
            if not self._ownership.reading(n, value) or scheduler.epoch != epoch:
                return None
            if not self._reading_allowed():
                with anyio.move_on_after(s.block_ms / 1000):  # a breaker is open
                    await self._stopping.wait()
                return 0
            room = scheduler.room()
            if room <= 0:
                await scheduler.wait_for_room()
            return room

        async def handle(entries: list[Entry], redelivered: bool) -> None:
            if self._hook is not None:
                await self._hook(n, entries)
            counts = await scheduler.attempts(n, [e for e, _ in entries]) if redelivered else {}
            for entry_id, raw in entries:
                if not self._ownership.reading(n, value):
                    break  # handed over or lost meanwhile: the rest stays pending
                deliveries = counts.get(entry_id, 0) + 1
                await scheduler.accept(n, value, entry_id, raw, deliveries=deliveries, epoch=epoch)

        try:
            await consume_group(
                source,
                handle,
                count=s.read_count,
                ready=ready,
                availability=self._availability,
                stop=self._stopping,
            )
        except FencedError:
            _log.warning("partition lease lost; stop reading it", partition=n)
            self._ownership.drop(n, value)


async def _first(*events: anyio.Event) -> None:
    """Return once any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)
