"""Changing the partition count without losing, doubling or reordering an event.

A workflow's partition is ``crc32(workflow_id) % count``, so a new count moves most
workflows to another partition. If entries of one workflow sat in its old partition
while later ones went to its new one, two owners would run them, out of order. So a
resize first empties the old partitions, with nothing new coming in, and only then
switches every instance to the new count:

1. The record (:mod:`actors.service.partition_record`) goes ``state=resizing``,
   ``next=N``, ``barriers=<old count>``. The movers (every instance, for the partitions
   it owns: :mod:`actors.service.router`) stop moving ``ctxd:in`` entries at their next
   batch (they check the record before each one); producers writing straight to
   partitions write to ``ctxd:in`` instead. New events wait there, in order.
2. The gate is made airtight, in the partitions' own slots: a batch checked just before
   step 1 may still land after it. Every old partition gets a barrier key at the last
   ``ctxd:in`` id (or its cursor, if that went further), which the move script checks:
   nothing after it is moved, whenever the batch was checked. ``P`` = the highest
   barrier; every barrier is raised to ``P`` and the record gets ``route_until=P``:
   the movers go on up to ``P`` and every old partition's cursor comes to rest there.
3. Every old partition's cursor is at ``P`` (or nothing of ``ctxd:in`` lies between its
   cursor and ``P``), the owners have finished every entry of the old partitions
   (acknowledged, nothing pending or unread) and nothing is parked (a paused workflow's
   parked events live under its partition's hash tag).
4. The index of workflows per partition (retention) and the dedupe keys (per
   partition) are copied to the workflows' new partitions, so the idle sweep and
   the dedupe window go on across the change; every NEW partition's cursor is set to
   ``P`` (everything up to it was moved under the old count; nothing after it was).
5. The record flips to ``count=N``, ``epoch+1``, without ``route_until`` (still
   ``resizing``: nothing moves). Instances running with the old count stop with one
   line (exit 1), to be started again with ``CTXD_PARTITIONS=N``; those started with
   ``N`` while the resize ran begin now, taking partitions but not moving entries yet.
6. Once no live instance reports the old count in its heartbeat — one that still owned
   a partition would treat entries moved there under the new count with the old hash —
   and no old partition's lease is held by an instance not reporting the new count,
   the barriers are deleted and the record becomes ``active``: the movers go on from
   ``P`` under the new count.

Interrupted or timed out before step 5, the resize is undone (barriers deleted,
``state=active`` at the old count): moving resumes from the cursors, nothing lost or
moved twice. After step 5 it can only go forward: run it again, or ``ctxd partitions
abort`` to resume at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import anyio
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.redis_io import text
from actors.runtime.scripts import call_script
from actors.service.heartbeat import instance_key, instances_key
from actors.service.input_routing import barrier_key, cursor_key, id_after, id_key
from actors.service.partition_record import (
    PartitionRecord,
    read_record,
    unfinished_entries,
    update_record,
)
from actors.service.partitions import partition_lease, partition_of, partition_stream
from actors.service.retention import workflows_key
from actors.service.streams import done_key
from graph.errors import CtxdError

__all__ = [
    "ResizeError",
    "ResizeProgress",
    "abort_resize",
    "begin_resize",
    "close_input",
    "old_instances",
    "old_lease_holders",
    "open_input",
    "parked_events",
    "resize_partitions",
    "switch_count",
    "unrouted_partitions",
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
        step: ``routing`` (the movers finish moving up to ``route_until``; then
            ``busy_partitions`` counts those behind), ``draining``, ``copying``,
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
    record = await begin_resize(redis, settings, target)
    if record.state == "active":
        return record  # already at the target
    started = time.monotonic()
    if record.count != target:  # not flipped yet (a rerun may find it flipped)
        record = await _drain_and_flip(
            redis, settings, record, target, progress, drain_timeout, started
        )
    await _wait_for_old_instances(redis, settings, record, progress, started)
    if not await open_input(redis, settings, record):
        raise ResizeError(f"the partition record changed during the resize: {record}")
    progress(ResizeProgress("done", elapsed=time.monotonic() - started))
    new = await read_record(redis, settings)
    assert new is not None
    return new


async def close_input(redis: Redis, settings: Settings, record: PartitionRecord) -> PartitionRecord:
    """Step 2: set a barrier in every old partition's slot and ``route_until`` on the
    record, both at one ``ctxd:in`` id ``P``; return the record with it.

    ``P`` is the highest of ``ctxd:in``'s last id (read after the record said
    ``resizing``), every old partition's cursor and any barrier a previous attempt set:
    no barrier is below what was moved already, and none is lowered. From here on no
    entry after ``P`` reaches an old partition, not even from a batch that was checked
    before the gate closed (the move script checks the barrier in the same step).
    """
    last = cast(list[tuple[bytes, object]], await redis.xrevrange(settings.input_stream, count=1))
    start = text(last[0][0]) if last else "0-0"
    barriers = max(record.barriers, record.count)
    raised = [
        _text(
            await call_script(
                redis,
                scripts.BARRIER_RAISE,
                keys=[barrier_key(settings, n), cursor_key(settings, n)],
                args=[start],
            )
        )
        for n in range(barriers)
    ]
    until = max(raised, key=id_key, default=start)
    for n in range(barriers):  # raise them all to the one id the cursors rest at
        await call_script(
            redis,
            scripts.BARRIER_RAISE,
            keys=[barrier_key(settings, n), cursor_key(settings, n)],
            args=[until],
        )
    if not await update_record(redis, settings, record, route_until=until):
        raise ResizeError(f"the partition record changed during the resize: {record}")
    closed = await read_record(redis, settings)
    assert closed is not None
    return closed


async def unrouted_partitions(redis: Redis, settings: Settings, count: int, until: str) -> int:
    """Old partitions (of ``count``) whose cursor has not come to rest at ``until`` while
    ``ctxd:in`` still holds entries between their cursor and ``until`` (those are still
    to be moved into them, or scanned past)."""
    behind = 0
    for n in range(count):
        raw = await redis.get(cursor_key(settings, n))
        cursor = text(raw) if raw is not None else "0-0"
        if cursor == until or id_after(cursor, until):
            continue
        waiting = await redis.xrange(settings.input_stream, min=f"({cursor}", max=until, count=1)
        behind += bool(waiting)
    return behind


async def open_input(redis: Redis, settings: Settings, record: PartitionRecord) -> bool:
    """Step 6 (and the undo): delete the barriers, then ``state=active`` (the order
    matters: a mover of the new count must find no barrier once it may move). False
    when the record changed meanwhile."""
    await _delete_barriers(redis, settings, record)
    return await update_record(
        redis, settings, record, state="active", next="", route_until="", barriers=""
    )


async def _delete_barriers(redis: Redis, settings: Settings, record: PartitionRecord) -> None:
    keys = [barrier_key(settings, n) for n in range(max(record.barriers, record.count))]
    for key in keys:  # one by one: on a cluster each is in its partition's slot
        await redis.delete(key)


async def _drain_and_flip(
    redis: Redis,
    settings: Settings,
    record: PartitionRecord,
    target: int,
    progress: Callable[[ResizeProgress], None],
    drain_timeout: float,
    started: float,
) -> PartitionRecord:
    """Steps 2-5 up to the flip; undone (the old count, active) if it does not get there."""
    flipped = False
    status = ResizeProgress("routing")
    try:
        with anyio.fail_after(drain_timeout):
            record = await close_input(redis, settings, record)
            until = record.route_until or "0-0"
            while behind := await unrouted_partitions(redis, settings, record.count, until):
                status = ResizeProgress(
                    "routing", busy_partitions=behind, elapsed=time.monotonic() - started
                )
                progress(status)
                await anyio.sleep(_POLL)  # the movers work; nothing in Redis to block on
            while True:
                status = await _drain_status(redis, settings, record.count, started)
                progress(status)
                if not status.unfinished and not status.parked:
                    break
                await anyio.sleep(_POLL)  # owners work; nothing in Redis to block on
        progress(ResizeProgress("copying", elapsed=time.monotonic() - started))
        record = await switch_count(redis, settings, record, target)
        flipped = True
    except TimeoutError:
        left = (
            f"{status.busy_partitions} partitions did not move their entries up to "
            f"{record.route_until} (is an instance stuck, or a partition without owner?)"
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
                current = await read_record(redis, settings)
                if current is not None and current.count == record.count:
                    await open_input(redis, settings, current)
    return record


async def switch_count(
    redis: Redis, settings: Settings, record: PartitionRecord, target: int
) -> PartitionRecord:
    """Steps 4-5, once the old partitions are drained and their cursors at rest at
    ``route_until``: copy the workflow index and dedupe keys, set every new partition's
    cursor to ``route_until``, flip the record (still ``resizing``, barriers kept)."""
    until = record.route_until or "0-0"
    await _rehome_workflows(redis, settings, record.count, target)
    await _copy_dedupe_keys(redis, settings, target)
    for n in range(target):  # nothing up to `until` is to be moved again, nothing after skipped
        await redis.set(cursor_key(settings, n), until)
    flipped = await update_record(
        redis, settings, record, count=target, epoch=record.epoch + 1, next=target, route_until=""
    )
    if not flipped:
        raise ResizeError(f"the partition record changed during the resize: {record}")
    new = await read_record(redis, settings)
    assert new is not None
    return new


async def _wait_for_old_instances(
    redis: Redis,
    settings: Settings,
    record: PartitionRecord,
    progress: Callable[[ResizeProgress], None],
    started: float,
) -> None:
    """Wait until no live instance runs with another count, and no old partition's lease
    is held by one that does not report the new count: such an owner would hash the
    entries moved there under the new count with the old one, and a paused one whose
    heartbeat lapsed before its lease could still store a cursor once the barriers are
    gone. Instances notice the flip within ``CTXD_LEASE_TTL``/3 and stop; a dead one's
    heartbeat and leases lapse within ``CTXD_LEASE_TTL``."""
    while True:
        old = await old_instances(redis, settings, record.count)
        old += await old_lease_holders(redis, settings, record)
        if not old:
            return
        progress(
            ResizeProgress(
                "switching", old_instances=len(set(old)), elapsed=time.monotonic() - started
            )
        )
        await anyio.sleep(_POLL)


async def old_lease_holders(redis: Redis, settings: Settings, record: PartitionRecord) -> list[str]:
    """Holders of the old partitions' leases (``0 … barriers-1``) whose heartbeat does
    not report ``record.count`` (an instance of the old count, or one whose heartbeat
    lapsed while its lease has not)."""
    holders: set[str] = set()
    for n in range(record.barriers):
        value = await redis.get(partition_lease(settings, n)[0])
        if value is not None:
            holders.add(_text(value).rpartition("|")[0])
    found = []
    for name in sorted(holders):
        body = await redis.get(instance_key(settings, name))
        if body is None or json.loads(body).get("partition_count") != record.count:
            found.append(name)
    return found


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
    await open_input(redis, settings, record)
    return await read_record(redis, settings)


async def parked_events(redis: Redis, settings: Settings) -> int:
    """Events parked by paused workflows, over every partition (and the older layout)."""
    p = settings.stream_prefix
    total = 0
    for pattern in (f"{p}:{{p*}}:parked:*", f"{p}:parked:*"):
        async for key in redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
            total += int(await redis.xlen(key))
    return total


async def begin_resize(redis: Redis, settings: Settings, target: int) -> PartitionRecord:
    """Step 1: the record goes ``resizing`` toward ``target`` (or the one in progress to
    it is taken up again); the record as it is then (``active`` when already there)."""
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
    if not await update_record(
        redis, settings, record, state="resizing", next=target, barriers=record.count
    ):
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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
