"""Ownership on its own: acquire, renew, hand over and release partition leases.

Real Redis (leases, heartbeats), two :class:`Ownership` objects standing for two
instances, reconciled step by step (no loop, no sleeps); an injected clock for the
handover time limit.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import anyio
import pytest
import structlog.testing
from actor_support import open_redis
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from stream_support import ScriptedRunner, add_partition_entries

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.service import heartbeat as heartbeat_module
from actors.service.heartbeat import Heartbeat, instance_key, process_liveness
from actors.service.lease import CheckpointFence, Leases
from actors.service.ownership import Ownership
from actors.service.partitions import assignment, partition_lease, partition_of
from actors.service.scheduler import Scheduler
from graph.errors import FencedError

_PARTITIONS = 8


@dataclass
class Instance:
    """One instance's ownership, with its scheduler and a record of change calls."""

    name: str
    ownership: Ownership
    scheduler: Scheduler
    clock: list[float]
    changes: list[int] = field(default_factory=list)


def make_instance(
    client: Redis, settings: Settings, name: str, runner: ScriptedRunner | None = None
) -> Instance:
    settings = replace(settings, instance=name, partitions=_PARTITIONS)
    stopping = anyio.Event()
    availability = RedisAvailability.for_settings(client, settings)
    clock = [0.0]
    holder: list[Ownership] = []
    scheduler = Scheduler(
        client,
        settings,
        runner or ScriptedRunner(),
        lease_of=lambda n: holder[0].value(n),
        reading_allowed=lambda: True,
        availability=availability,
        stopping=stopping,
        rng=random.Random(3),
    )
    changes: list[int] = []
    ownership = Ownership(
        client,
        settings,
        Leases(client, name, settings.lease_ttl),
        Heartbeat(client, settings),
        scheduler,
        availability=availability,
        stopping=stopping,
        on_change=lambda: changes.append(1),
        clock=lambda: clock[0],
    )
    holder.append(ownership)
    return Instance(name, ownership, scheduler, clock, changes)


@contextlib.asynccontextmanager
async def running(instance: Instance) -> AsyncIterator[Instance]:
    async with anyio.create_task_group() as tg:
        await tg.start(instance.scheduler.run)
        yield instance
        tg.cancel_scope.cancel()


def lease_value(redis: SyncRedis, settings: Settings, n: int) -> str | None:
    value = redis.get(partition_lease(settings, n)[0])
    return None if value is None else str(value)


async def test_a_lone_instance_acquires_every_partition_and_publishes_its_heartbeat(
    settings: Settings, redis: SyncRedis
) -> None:
    async with open_redis(settings) as client:
        a = make_instance(client, settings, "a")
        assert await a.ownership.reconcile() is True
        assert await a.ownership.reconcile() is True  # this beat lists what it owns
    owned = a.ownership.owned
    assert sorted(owned) == list(range(_PARTITIONS))
    assert all(lease_value(redis, settings, n) == v for n, v in owned.items())
    assert all(v.startswith("a|") for v in owned.values())
    beat = json.loads(str(redis.get(instance_key(settings, "a"))))
    assert beat["partitions"] == list(range(_PARTITIONS))
    assert a.changes  # the readers were told


async def test_a_joining_instance_gets_its_rendezvous_share_after_a_handover(
    settings: Settings, redis: SyncRedis
) -> None:
    share = assignment(["a", "b"], _PARTITIONS)
    async with open_redis(settings) as client:
        a, b = make_instance(client, settings, "a"), make_instance(client, settings, "b")
        assert await a.ownership.reconcile() is True
        assert await b.ownership.reconcile() is False  # its share is still a's
        assert b.ownership.owned == {}
        assert await a.ownership.reconcile() is False  # hands b's share over...
        assert set(a.ownership.readable()) == {n for n, who in share.items() if who == "a"}
        await a.ownership.reconcile()  # ...and releases it (nothing of it runs)
        assert await b.ownership.reconcile() is True
        assert await a.ownership.reconcile() is True
    assert set(a.ownership.owned) == {n for n, who in share.items() if who == "a"}
    assert set(b.ownership.owned) == {n for n, who in share.items() if who == "b"}
    assert all(lease_value(redis, settings, n) == v for n, v in b.ownership.owned.items())


async def test_a_partition_is_released_only_once_its_running_batch_finished(
    settings: Settings, redis: SyncRedis
) -> None:
    share = assignment(["a", "b"], _PARTITIONS)
    moving = min(n for n, who in share.items() if who == "b")
    runner = ScriptedRunner(hold=True)
    async with open_redis(settings) as client:
        a = make_instance(client, settings, "a", runner)
        b = make_instance(client, settings, "b")
        async with running(a):
            await a.ownership.reconcile()
            value = a.ownership.owned[moving]
            [(entry_id, raw)] = await add_partition_entries(
                client, replace(settings, partitions=_PARTITIONS), moving, [("wf", "e1")]
            )
            await a.scheduler.accept(
                moving, value, entry_id, raw, deliveries=1, epoch=a.scheduler.epoch
            )
            with anyio.fail_after(10):
                await runner.started.wait()
            await b.ownership.reconcile()
            for _ in range(3):
                await a.ownership.reconcile()
            assert a.ownership.value(moving) == value  # still renewed while it runs
            assert moving not in a.ownership.readable()  # but no longer read
            assert not a.ownership.reading(moving, value)
            runner.hold.set()
            with anyio.fail_after(10):
                while a.scheduler.busy:
                    await a.scheduler.wait_for_room()
            await a.ownership.reconcile()
            assert a.ownership.value(moving) is None
            await b.ownership.reconcile()
    assert lease_value(redis, settings, moving) == b.ownership.value(moving)


async def test_a_handover_stops_renewing_a_stuck_run_after_one_event_timeout(
    settings: Settings, redis: SyncRedis
) -> None:
    share = assignment(["a", "b"], _PARTITIONS)
    moving = min(n for n, who in share.items() if who == "b")
    kept = min(n for n, who in share.items() if who == "a")
    runner = ScriptedRunner(hold=True)  # never finishes
    async with open_redis(settings) as client:
        a = make_instance(client, settings, "a", runner)
        b = make_instance(client, settings, "b")
        async with running(a):
            await a.ownership.reconcile()
            [(entry_id, raw)] = await add_partition_entries(
                client, replace(settings, partitions=_PARTITIONS), moving, [("wf", "e1")]
            )
            value = a.ownership.owned[moving]
            await a.scheduler.accept(
                moving, value, entry_id, raw, deliveries=1, epoch=a.scheduler.epoch
            )
            with anyio.fail_after(10):
                await runner.started.wait()
            await b.ownership.reconcile()
            await a.ownership.reconcile()  # the handover of `moving` begins
            for n in (moving, kept):
                await client.pexpire(partition_lease(settings, n)[0], 500)
            a.clock[0] += settings.event_timeout + 0.1
            await a.ownership.reconcile()
            ttl_moving = await client.pttl(partition_lease(settings, moving)[0])
            ttl_kept = await client.pttl(partition_lease(settings, kept)[0])
            runner.hold.set()
    assert ttl_moving <= 500  # not renewed: the next owner gets it once it expires
    assert ttl_kept > 500  # renewed as usual


async def test_a_lost_lease_is_dropped_at_the_next_renewal_and_fences_checkpoints(
    settings: Settings, redis: SyncRedis
) -> None:
    async with open_redis(settings) as client:
        a = make_instance(client, settings, "a")
        await a.ownership.reconcile()
        workflow = "wf-fenced"
        n = partition_of(workflow, _PARTITIONS)
        fence = CheckpointFence(client, replace(settings, partitions=_PARTITIONS))
        tenure = a.ownership.value(n)
        assert tenure is not None
        with CheckpointFence.tenure((partition_lease(settings, n)[0], tenure)):
            await fence.check(workflow)  # ours: no error
            await client.set(partition_lease(settings, n)[0], "zombie|99")
            with pytest.raises(FencedError):
                await fence.check(workflow)
        changes = len(a.changes)
        await a.ownership.reconcile()
        assert a.ownership.value(n) is None
        assert len(a.changes) > changes
        await a.ownership.leave()
    assert a.ownership.owned == {}
    assert lease_value(redis, settings, n) == "zombie|99"  # not ours: left alone
    assert all(lease_value(redis, settings, m) is None for m in range(_PARTITIONS) if m != n)
    assert redis.get(instance_key(settings, "a")) is None


async def test_a_reader_fenced_under_an_old_tenure_does_not_drop_the_new_one(
    settings: Settings,
) -> None:
    """A paused instance loses a partition and takes it again (a new lease value); its
    old reader's fenced read then comes back refused. Dropping the partition then would
    leave the new lease held but never renewed, stalling the partition for a TTL."""
    async with open_redis(settings) as client:
        a = make_instance(client, settings, "a")
        await a.ownership.reconcile()
        n, current = next(iter(a.ownership.owned.items()))
        a.ownership.drop(n, "a|0")  # the old tenure's reader
        assert a.ownership.owned[n] == current
        a.ownership.drop(n, current)
        assert n not in a.ownership.owned
        await a.ownership.leave()


async def test_renewal_gaps_are_measured_published_and_a_late_one_is_logged(
    settings: Settings, redis: SyncRedis
) -> None:
    """The margin a stalled event loop has before its leases lapse is visible: the gap
    between two renewals is in the heartbeat, and one past half the TTL is logged."""
    async with open_redis(settings) as client:
        a = make_instance(client, settings, "a")
        await a.ownership.reconcile()
        a.clock[0] += 0.1
        await a.ownership.reconcile()
        assert a.ownership.lease_statistics()["renew_gap_max"] == pytest.approx(0.1)
        with structlog.testing.capture_logs() as logs:
            a.clock[0] += settings.lease_ttl * 0.6  # a stall: late, not yet lapsed
            await a.ownership.reconcile()
        published = json.loads(str(redis.get(instance_key(settings, "a"))))["lease"]
        await a.ownership.leave()
    assert published == a.ownership.lease_statistics()
    assert published["renew_gap_max"] == pytest.approx(settings.lease_ttl * 0.6, abs=1e-3)
    assert published["ttl"] == settings.lease_ttl
    assert published["renew_every"] == settings.lease_ttl / 4
    late = [e for e in logs if e["event"] == "lease renewal late"]
    assert [e["gap"] for e in late] == [pytest.approx(settings.lease_ttl * 0.6, abs=1e-3)]


class _AheadClock:
    """The ``time`` module as seen by a host whose clock runs 5 s ahead."""

    @staticmethod
    def time() -> float:
        return time.time() + 5.0


async def test_a_host_whose_clock_runs_ahead_does_not_see_its_peers_as_dead(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live windows are measured on Redis's clock: with a 1.5 s TTL, a host 5 s ahead
    that used its own clock would prune every other instance from the live set and
    take their partitions."""
    async with open_redis(settings) as client:
        await Heartbeat(client, replace(settings, instance="a")).beat({})
        monkeypatch.setattr(heartbeat_module, "time", _AheadClock)
        ahead = Heartbeat(client, replace(settings, instance="b"))
        assert await ahead.beat({}) == ["a", "b"]
        assert await ahead.live() == ["a", "b"]
        assert await process_liveness(client, settings).live() == {"a", "b"}
