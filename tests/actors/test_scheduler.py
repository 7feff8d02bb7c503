"""The scheduler on its own: admission (CTXD_MULTITASK, poison), order, epochs.

A real Redis (the DLQ script, the lease fence, the partition's pending list) and a
scripted runner in place of the graph: each test decides how every run ends.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
import pytest
from actor_support import open_redis
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT
from stream_support import ScriptedRunner, add_partition_entries, hold_lease, workflow_in

from actors.config import MultitaskPolicy, Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.redis_io import ensure_group, read_group, xrevrange_text
from actors.service.batches import BatchReport, PendingEntry, RunSlot
from actors.service.partitions import partition_of, partition_stream
from actors.service.scheduler import Scheduler

_LEASE = "7|test"


@contextlib.asynccontextmanager
async def running_scheduler(
    client: Redis, settings: Settings, runner: ScriptedRunner
) -> AsyncIterator[Scheduler]:
    """A scheduler owning every partition under ``_LEASE`` (partition 0 in Redis too),
    running until the block ends."""
    await hold_lease(client, settings, 0, _LEASE)
    scheduler = Scheduler(
        client,
        settings,
        runner,
        lease_of=lambda n: _LEASE,
        reading_allowed=lambda: True,
        availability=RedisAvailability.for_settings(client, settings),
        stopping=anyio.Event(),
        rng=random.Random(7),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        yield scheduler
        tg.cancel_scope.cancel()


async def settled(scheduler: Scheduler) -> None:
    """Wait until nothing is queued, running or in flight."""
    with anyio.fail_after(10):
        while scheduler.busy:
            await scheduler.wait_for_room()


async def accept_all(
    scheduler: Scheduler, entries: list[tuple[str, dict[bytes, bytes]]], deliveries: int = 1
) -> None:
    for entry_id, raw in entries:
        await scheduler.accept(
            0, _LEASE, entry_id, raw, deliveries=deliveries, epoch=scheduler.epoch
        )


def dlq(redis: SyncRedis, settings: Settings) -> list[dict[str, str]]:
    return [fields for _, fields in xrevrange_text(redis, settings.dlq_stream, 100)[::-1]]


def pending(redis: SyncRedis, settings: Settings) -> int:
    return int(redis.xpending(partition_stream(settings, 0), settings.group)["pending"])


async def test_enqueue_runs_a_busy_workflows_next_event_after_the_running_one(
    settings: Settings,
) -> None:
    runner = ScriptedRunner(hold=True)
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        first, second = await add_partition_entries(
            client, settings, 0, [("wf", "e1"), ("wf", "e2")]
        )
        await accept_all(sc, [first])
        with anyio.fail_after(10):
            await runner.started.wait()
        await accept_all(sc, [second])
        assert sc.in_flight == 2
        runner.hold.set()
        await settled(sc)
        counts = sc.counts()
    assert runner.batches == [["e1"], ["e2"]]
    assert (counts.processed, counts.dead_lettered, counts.interrupted) == (2, 0, 0)


async def test_reject_dead_letters_an_event_for_a_busy_workflow(
    settings: Settings, redis: SyncRedis
) -> None:
    settings = replace(settings, multitask="reject")
    runner = ScriptedRunner(hold=True)
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        first, second = await add_partition_entries(
            client, settings, 0, [("wf", "e1"), ("wf", "e2")]
        )
        await accept_all(sc, [first])
        with anyio.fail_after(10):
            await runner.started.wait()
        await accept_all(sc, [second])
        runner.hold.set()
        await settled(sc)
        counts = sc.counts()
    assert runner.batches == [["e1"]]
    [dead] = dlq(redis, settings)
    assert (dead["event_id"], dead["reason"]) == ("e2", "workflow_busy")
    assert "CTXD_MULTITASK=reject" in dead["error"]
    assert (counts.processed, counts.dead_lettered) == (1, 1)


@pytest.mark.parametrize("strategy", ["interrupt", "rollback"])
async def test_interrupt_and_rollback_cancel_the_running_event_for_the_newer_one(
    settings: Settings, redis: SyncRedis, strategy: MultitaskPolicy
) -> None:
    settings = replace(settings, multitask=strategy)
    runner = ScriptedRunner(hold=True)
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        first, second = await add_partition_entries(
            client, settings, 0, [("wf", "e1"), ("wf", "e2")]
        )
        await accept_all(sc, [first])
        with anyio.fail_after(10):
            await runner.started.wait()
            await accept_all(sc, [second])
            await runner.finished.wait()  # the interrupted run of e1 returned
        runner.hold.set()
        await settled(sc)
        counts = sc.counts()
    assert runner.batches == [["e1"], ["e2"]]
    assert (counts.interrupted, counts.processed, counts.dead_lettered) == (1, 1, 0)
    assert dlq(redis, settings) == []


async def test_a_failing_event_is_retried_in_place_then_dead_lettered_as_poison(
    settings: Settings, redis: SyncRedis
) -> None:
    settings = replace(settings, max_deliveries=2)
    runner = ScriptedRunner(["retry", "retry"])
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        entries = await add_partition_entries(client, settings, 0, [("wf", "e1"), ("wf", "e2")])
        await accept_all(sc, entries)
        await settled(sc)
        counts = sc.counts()
    # The batch fails once; then the head runs alone (isolating the poison) and fails
    # again: it goes to the DLQ after max_deliveries runs, and e2 runs after it.
    assert runner.batches == [["e1", "e2"], ["e1"], ["e2"]]
    [dead] = dlq(redis, settings)
    assert (dead["event_id"], dead["reason"], dead["attempts"]) == ("e1", "poison", "2")
    assert "limit 2" in dead["error"]
    assert (counts.failed_runs, counts.dead_lettered, counts.processed) == (2, 1, 1)
    assert pending(redis, settings) == 1  # e2: the scripted runner does not acknowledge


async def test_an_entry_read_more_often_than_the_limit_is_poison_without_a_run(
    settings: Settings, redis: SyncRedis
) -> None:
    settings = replace(settings, max_deliveries=3)
    runner = ScriptedRunner()
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        entries = await add_partition_entries(client, settings, 0, [("wf", "e1")])
        await accept_all(sc, entries, deliveries=4)
        await settled(sc)
    assert runner.batches == []
    [dead] = dlq(redis, settings)
    assert (dead["reason"], dead["attempts"]) == ("poison", "3")
    assert pending(redis, settings) == 0


async def test_an_entry_read_for_an_earlier_epoch_is_not_admitted(settings: Settings) -> None:
    runner = ScriptedRunner()
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        [(entry_id, raw)] = await add_partition_entries(client, settings, 0, [("wf", "e1")])
        await sc.accept(0, _LEASE, entry_id, raw, deliveries=1, epoch=sc.epoch - 1)
        assert not sc.busy
        await accept_all(sc, [(entry_id, raw)])
        await accept_all(sc, [(entry_id, raw)])  # read twice in one tenure: admitted once
        await settled(sc)
    assert runner.batches == [["e1"]]


async def test_entries_with_one_id_in_two_partitions_are_tracked_apart(settings: Settings) -> None:
    """The router fills many partition streams in one millisecond, so their entry ids
    repeat: dropping one partition's queued entry must not forget another's running one
    (else that partition would be released while its batch still runs)."""
    settings = replace(settings, concurrency=1)
    runner = ScriptedRunner(hold=True)
    same_id = "1700000000000-3"
    fields: dict[bytes, bytes] = {b"event_id": b"e", b"content": b"text"}
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        raw = {**fields, b"workflow_id": workflow_in(settings, 0, "wf-running").encode()}
        await sc.accept(0, _LEASE, same_id, raw, deliveries=1, epoch=sc.epoch)
        with anyio.fail_after(10):
            await runner.started.wait()
        # waits for the one slot
        raw = {**fields, b"workflow_id": workflow_in(settings, 1, "wf-waiting").encode()}
        await sc.accept(1, _LEASE, same_id, raw, deliveries=1, epoch=sc.epoch)
        assert sc.in_flight == 2
        sc.unqueue(1)  # partition 1 is handed over: its queued entry goes
        assert sc.holds(0)
        assert not sc.holds(1)
        assert sc.in_flight == 1
        runner.hold.set()
        await settled(sc)
    assert runner.batches == [["e"]]


class CrashingRunner(ScriptedRunner):
    """A runner with a bug: its first run raises out of the drain."""

    async def process(
        self, workflow_id: str, slot: RunSlot, batch: list[PendingEntry]
    ) -> BatchReport:
        if not self.batches:
            self.batches.append([p.event.event_id for p in batch])
            raise RuntimeError("a bug in the runner")
        return await super().process(workflow_id, slot, batch)


async def test_a_crashed_scheduler_starts_a_new_epoch_with_nothing_in_flight(
    settings: Settings,
) -> None:
    """A drain's crash is the scheduler's (as itself, for the supervisor's log); the
    restart forgets what was in flight and tells the readers to read pending again."""
    restarted: list[int] = []
    async with open_redis(settings) as client:
        await hold_lease(client, settings, 0, _LEASE)
        scheduler = Scheduler(
            client,
            settings,
            CrashingRunner(),
            lease_of=lambda n: _LEASE,
            reading_allowed=lambda: True,
            availability=RedisAvailability.for_settings(client, settings),
            stopping=anyio.Event(),
            on_restart=lambda: restarted.append(scheduler.epoch),
        )
        entries = await add_partition_entries(client, settings, 0, [("wf", "e1")])

        async def crash() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                await accept_all(scheduler, entries)

        with anyio.fail_after(10), pytest.raises(ExceptionGroup) as raised:
            await crash()
        # scheduler.run raised the error itself, not a group of its drains' errors
        assert raised.group_contains(RuntimeError, match="a bug", depth=1)
        assert (scheduler.busy, scheduler.accepting, restarted) == (False, False, [])
        await accept_all(scheduler, entries)  # read while it is down: not admitted
        assert not scheduler.busy
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            assert restarted == [2]
            await accept_all(scheduler, entries)  # the readers' re-read, new epoch
            await settled(scheduler)
            tg.cancel_scope.cancel()
    assert scheduler.counts().processed == 1


async def test_an_entry_in_a_partition_its_workflow_does_not_hash_to_is_moved_there(
    settings: Settings, redis: SyncRedis
) -> None:
    """After a change of CTXD_PARTITIONS (or a producer that hashed differently) an entry
    can sit in a partition its workflow does not belong to. Running it there would give
    the workflow two writers; it is moved, fenced by the partition's lease, to the
    partition its workflow's events are run in, with its fields and source id."""
    runner = ScriptedRunner()
    elsewhere = workflow_in(settings, 3, "wf-moved")
    stream = partition_stream(settings, 0)
    async with open_redis(settings) as client, running_scheduler(client, settings, runner) as sc:
        await ensure_group(client, stream, settings.group)
        fields: dict[FieldT, EncodableT] = {
            "ctxd_source_id": "1-1", "workflow_id": elsewhere, "event_id": "e1", "content": "text",
        }  # fmt: skip
        await client.xadd(stream, fields)
        entries = await read_group(
            client, group=settings.group, consumer="owner", stream=stream, cursor=">",
            count=10, block=None,
        )  # fmt: skip
        await accept_all(sc, [(i, f) for i, f in entries if f is not None])
        await settled(sc)
    assert partition_of(elsewhere, settings.partitions) == 3
    assert runner.batches == []  # not run in partition 0
    assert pending(redis, settings) == 0  # settled in partition 0
    [(_, moved)] = xrevrange_text(redis, partition_stream(settings, 3), 10)
    assert moved == fields
    assert dlq(redis, settings) == []
