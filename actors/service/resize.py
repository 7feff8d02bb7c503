"""Changing the partition count without losing, doubling or reordering an event.

A workflow's partition is ``crc32(workflow_id) % count``, so a new count moves most
workflows to another partition. If entries of one workflow sat in its old partition
while later ones went to its new one, two owners would run them, out of order. So a
resize first empties the old partitions, with nothing new coming in, and only then
switches every instance to the new count:

1. The record (:mod:`actors.service.partition_record`) goes ``state=resizing``,
   ``next=N``. Routers stop moving ``ctxd:in`` entries into partitions (they check
   the record before every batch); producers writing straight to partitions write
   to ``ctxd:in`` instead. New events wait there, in order.
2. The resize takes the router lease and holds it until the flip. The move script
   checks that lease, so no router that read the record before step 1 can still
   move an entry once the lease is ours.
3. The owners finish every entry of the old partitions (acknowledged, nothing
   pending or unread) and nothing is parked (a paused workflow's parked events live
   under its partition's hash tag).
4. The index of workflows per partition (retention) and the dedupe keys (per
   partition) are copied to the workflows' new partitions, so the idle sweep and
   the dedupe window go on across the change.
5. The record flips to ``count=N``, ``epoch+1`` (still ``resizing``, ``next=N``).
   Instances running with the old count stop with one line (exit 1), to be started
   again with ``CTXD_PARTITIONS=N``; those started with ``N`` while the resize ran
   begin now, taking partitions but not routing yet.
6. Once no live instance reports the old count in its heartbeat — one that still owned
   a partition would treat entries routed there under the new count with the old
   hash — the record becomes ``active`` and the router lease is released: routing
   resumes at ``ctxd:in``'s first waiting entry.

Interrupted or timed out before step 5, the resize is undone (``state=active`` at the
old count): routing resumes and nothing has moved. After step 5 it can only go
forward: run it again, or ``ctxd partitions abort`` to resume routing at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import anyio
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.heartbeat import instance_key, instances_key
from actors.service.lease import Leases
from actors.service.partition_record import (
    PartitionRecord,
    read_record,
    unfinished_entries,
    update_record,
)
from actors.service.partitions import lease_key, partition_of, partition_stream
from actors.service.retention import workflows_key
from actors.service.streams import done_key
from graph.errors import CtxdError

__all__ = [
    "ResizeError",
    "ResizeProgress",
    "abort_resize",
    "old_instances",
    "parked_events",
    "resize_partitions",
]

_POLL = 0.5
"""Seconds between looks at the old partitions while they drain."""

_COPY_BATCH = 500


class ResizeError(CtxdError):
    """A resize that cannot start or finish; the message says why and what to do."""


@dataclass(frozen=True)
class ResizeProgress:
    """Where a resize stands, for its progress lines.

    Attributes:
        step: ``routing`` (waiting for the router to pause), ``draining``, ``copying``,
            ``switching`` (flipped; instances with the old count are stopping) or ``done``.
        unfinished: entries of the old partitions not yet acknowledged.
        busy_partitions: old partitions that still hold such entries.
        parked: events parked by paused workflows.
        old_instances: live instances still running with the old count.
        elapsed: seconds since the resize began.
    """

    step: str
    unfinished: int = 0
    busy_partitions: int = 0
    parked: int = 0
    old_instances: int = 0
    elapsed: float = 0.0


async def resize_partitions(
    redis: Redis,
    settings: Settings,
    target: int,
    *,
    progress: Callable[[ResizeProgress], None],
    drain_timeout: float,
) -> PartitionRecord:
    """Change the recorded count to ``target`` (module docstring); return the new record.

    Raises:
        ResizeError: no record yet, another resize in progress, parked events, or the
            old partitions did not drain within ``drain_timeout`` (the resize is undone then).
    """
    record = await _begin(redis, settings, target)
    if record.state == "active":
        return record  # already at the target
    started = time.monotonic()
    leases = Leases(redis, f"resize:{socket.gethostname()}:{os.getpid()}", settings.lease_ttl)
    key, fence = lease_key(settings, "router")
    held = _RouterLease(leases, key, fence, settings.lease_ttl / 3)
    try:
        if record.count != target:  # not flipped yet (a rerun may find it flipped)
            record = await _drain_and_flip(
                redis, settings, record, target, held, progress, drain_timeout, started
            )
        await _wait_for_old_instances(redis, settings, target, held, progress, started)
        if not await update_record(redis, settings, record, state="active", next=""):
            raise ResizeError(f"the partition record changed during the resize: {record}")
        progress(ResizeProgress("done", elapsed=time.monotonic() - started))
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await held.release()
    new = await read_record(redis, settings)
    assert new is not None
    return new


class _RouterLease:
    """The router lease, held by the resize: every move of an entry checks it."""

    def __init__(self, leases: Leases, key: str, fence: str, renew_every: float) -> None:
        self._leases = leases
        self._key = key
        self._fence = fence
        self._renew_every = renew_every
        self._value: str | None = None
        self._renewed = 0.0

    async def take(self) -> bool:
        """Take it if it is free (the router releases it at its next batch)."""
        if self._value is None:
            self._value = await self._leases.acquire(self._key, self._fence)
            self._renewed = time.monotonic()
        return self._value is not None

    async def keep(self, *, now: bool = False) -> None:
        """Renew it when due (``now``: at once); losing it ends the resize."""
        if self._value is None:
            return
        if now or time.monotonic() - self._renewed >= self._renew_every:
            if not await self._leases.renew(self._key, self._value):
                raise ResizeError(
                    f"the resize lost the router lease {self._key} (it paused longer than "
                    "CTXD_LEASE_TTL); run the command again"
                )
            self._renewed = time.monotonic()

    async def release(self) -> None:
        if self._value is not None:
            await self._leases.release(self._key, self._value)
            self._value = None


async def _drain_and_flip(
    redis: Redis,
    settings: Settings,
    record: PartitionRecord,
    target: int,
    held: _RouterLease,
    progress: Callable[[ResizeProgress], None],
    drain_timeout: float,
    started: float,
) -> PartitionRecord:
    """Steps 2-5 up to the flip; undone (the old count, active) if it does not get there."""
    flipped = False
    status = ResizeProgress("routing")
    try:
        with anyio.fail_after(drain_timeout):
            while not await held.take():
                progress(ResizeProgress("routing", elapsed=time.monotonic() - started))
                await anyio.sleep(_POLL)
            while True:
                await held.keep()
                status = await _drain_status(redis, settings, record.count, started)
                progress(status)
                if not status.unfinished and not status.parked:
                    break
                await anyio.sleep(_POLL)  # owners work; nothing in Redis to block on
        progress(ResizeProgress("copying", elapsed=time.monotonic() - started))
        await _rehome_workflows(redis, settings, record.count, target)
        await _copy_dedupe_keys(redis, settings, target)
        await held.keep(now=True)  # still ours: nothing was routed meanwhile
        # The flip: the new count and epoch, still "resizing" (no routing) until every
        # instance of the old count has stopped (_wait_for_old_instances).
        flipped = await update_record(
            redis, settings, record, count=target, epoch=record.epoch + 1, next=target
        )
        if not flipped:
            raise ResizeError(f"the partition record changed during the resize: {record}")
    except TimeoutError:
        left = (
            "the router did not pause (is an instance stuck?)"
            if status.step == "routing"
            else f"{status.unfinished} entries unfinished, {status.parked} parked"
            + (" (parked events wait for `ctxd resume`)" if status.parked else "")
        )
        raise ResizeError(
            f"the old partitions did not drain within {drain_timeout:g} s ({left}); the "
            "resize was undone (routing resumes at the old count). Look at `ctxd status`, "
            "then try again"
        ) from None
    finally:
        if not flipped:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await update_record(redis, settings, record, state="active", next="")
    new = await read_record(redis, settings)
    assert new is not None
    return new


async def _wait_for_old_instances(
    redis: Redis,
    settings: Settings,
    target: int,
    held: _RouterLease,
    progress: Callable[[ResizeProgress], None],
    started: float,
) -> None:
    """Wait until no live instance runs with another count: one that still owned a
    partition would hash the entries routed there under the new count with the old one.
    Instances notice the flip within ``CTXD_LEASE_TTL``/3 and stop; a dead one leaves
    the live set within ``CTXD_LEASE_TTL``."""
    while True:
        await held.keep()
        old = await old_instances(redis, settings, target)
        if not old:
            return
        progress(
            ResizeProgress("switching", old_instances=len(old), elapsed=time.monotonic() - started)
        )
        await anyio.sleep(_POLL)


async def old_instances(redis: Redis, settings: Settings, count: int) -> list[str]:
    """Live ``ctxd run`` instances whose heartbeat reports another partition count."""
    now_ms = time.time() * 1000
    live = await redis.zrangebyscore(
        instances_key(settings), now_ms - settings.lease_ttl * 1000, "+inf"
    )
    found = []
    for raw in live:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        body = await redis.get(instance_key(settings, name))
        if body is None:
            continue  # gone (it left, or its heartbeat expired)
        if json.loads(body).get("partition_count") != count:
            found.append(name)
    return found


async def abort_resize(redis: Redis, settings: Settings) -> PartitionRecord | None:
    """Resume routing after a resize whose command was killed: before its flip the old
    count stays (undone); after it the new one does (the wait for old instances is
    skipped: stop them yourself)."""
    record = await read_record(redis, settings)
    if record is None or record.state == "active":
        return record
    await update_record(redis, settings, record, state="active", next="")
    return await read_record(redis, settings)


async def parked_events(redis: Redis, settings: Settings) -> int:
    """Events parked by paused workflows, over every partition (and the older layout)."""
    p = settings.stream_prefix
    total = 0
    for pattern in (f"{p}:{{p*}}:parked:*", f"{p}:parked:*"):
        async for key in redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
            total += int(await redis.xlen(key))
    return total


async def _begin(redis: Redis, settings: Settings, target: int) -> PartitionRecord:
    record = await read_record(redis, settings)
    if record is None:
        raise ResizeError(
            "no partition count is recorded yet: start `ctxd run` with "
            f"CTXD_PARTITIONS={target} instead (the first instance records its count)"
        )
    if record.state == "resizing":
        if record.next == target:
            return record  # a resize to the same count was interrupted: go on with it
        raise ResizeError(
            f"a resize to {record.next} is in progress: finish it with `ctxd partitions "
            f"resize {record.next}`, or undo it with `ctxd partitions abort`"
        )
    if record.count == target:
        return record
    parked = await parked_events(redis, settings)
    if parked:
        raise ResizeError(
            f"{parked} events are parked by paused workflows (they live under their "
            "partition and would be stranded): resume those workflows (`ctxd resume`), "
            "then resize"
        )
    if not await update_record(redis, settings, record, state="resizing", next=target):
        raise ResizeError("the partition record changed meanwhile; run the command again")
    again = await read_record(redis, settings)
    assert again is not None
    return again


async def _drain_status(
    redis: Redis, settings: Settings, count: int, started: float
) -> ResizeProgress:
    unfinished = busy = 0
    for n in range(count):
        waiting = await unfinished_entries(redis, partition_stream(settings, n), settings.group)
        unfinished += waiting
        busy += bool(waiting)
    return ResizeProgress(
        "draining",
        unfinished=unfinished,
        busy_partitions=busy,
        parked=await parked_events(redis, settings),
        elapsed=time.monotonic() - started,
    )


async def _rehome_workflows(redis: Redis, settings: Settings, old: int, new: int) -> None:
    """Move each workflow of the retention index to its partition under the new count
    (keeping its last-commit time), so the owner of its new partition sweeps it."""
    for n in range(old):
        key = workflows_key(settings, n)
        members = cast(list[tuple[bytes, float]], await redis.zrange(key, 0, -1, withscores=True))
        moves: dict[int, dict[str, float]] = {}
        for raw, score in members:
            workflow_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            home = partition_of(workflow_id, new)
            if home != n:
                moves.setdefault(home, {})[workflow_id] = float(score)
        for home, entries in moves.items():
            await redis.zadd(workflows_key(settings, home), entries, gt=True)
            await redis.zrem(key, *entries)


async def _copy_dedupe_keys(redis: Redis, settings: Settings, new: int) -> None:
    """Copy each dedupe key to its workflow's partition under the new count, with the
    time it has left, so an event id re-sent after the resize is still recognised."""
    after = replace(settings, partitions=new)
    p = settings.stream_prefix
    batch: list[tuple[str, str]] = []
    for pattern in (f"{p}:{{p*}}:done:*", f"{p}:done:*"):
        async for raw in redis.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            _, _, rest = key.partition(":done:")
            workflow_id, slash, event_id = rest.partition("/")
            if not slash:
                continue
            target = done_key(after, workflow_id, event_id)
            if target != key:
                batch.append((key, target))
            if len(batch) >= _COPY_BATCH:
                await _copy(redis, batch)
                batch = []
    await _copy(redis, batch)


async def _copy(redis: Redis, pairs: list[tuple[str, str]]) -> None:
    if not pairs:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for source, _ in pairs:
            pipe.get(source)
            pipe.pttl(source)
        replies = await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:
        for i, (_, target) in enumerate(pairs):
            value, ttl = replies[2 * i], int(replies[2 * i + 1])
            if value is None or ttl == -2:
                continue  # expired meanwhile
            pipe.set(target, value, px=ttl if ttl > 0 else None, nx=True)
        await pipe.execute()
