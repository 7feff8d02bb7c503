"""Balanced ownership with real ownership loops on a real Redis: joins, leaves, crashes.

Each instance is an in-process :class:`Ownership` running its real loop (renewals,
heartbeats, the live-set watch, handovers) with its own scheduler, on the test Redis;
eight ``ctxd run`` subprocesses would be too heavy for two cores, and the loop is what
decides ownership. After every join, graceful leave and crash the test waits (on the
loops' change callbacks, not on sleeps) until ownership settles, then checks that every
partition's lease is held by exactly one live instance, that each instance owns what
:func:`~actors.service.partitions.assignment` gives it, and so no more than ⌈P/K⌉ + 1.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import anyio
import pytest
from actor_support import open_redis
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from stream_support import ScriptedRunner

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.redis_io import text
from actors.service.heartbeat import Heartbeat
from actors.service.lease import Leases
from actors.service.ownership import Ownership
from actors.service.partitions import assignment, partition_lease
from actors.service.scheduler import Scheduler

_PARTITIONS = 64
_LEASE_TTL = 1.0  # a crashed instance's partitions move within about a second


@dataclass
class _Member:
    name: str
    ownership: Ownership
    scope: anyio.CancelScope


class _Cluster:
    """In-process instances sharing one Redis, one change signal for all of them."""

    def __init__(self, client: Redis, settings: Settings, tg: TaskGroup) -> None:
        self._client = client
        self._settings = replace(settings, partitions=_PARTITIONS, lease_ttl=_LEASE_TTL)
        self._tg = tg
        self.members: dict[str, _Member] = {}
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()

    async def join(self, name: str) -> None:
        settings = replace(self._settings, instance=name)
        stopping = anyio.Event()
        availability = RedisAvailability.for_settings(self._client, settings)
        holder: list[Ownership] = []
        scheduler = Scheduler(
            self._client,
            settings,
            ScriptedRunner(),
            lease_of=lambda n: holder[0].value(n),
            reading_allowed=lambda: True,
            availability=availability,
            stopping=stopping,
            rng=random.Random(name),
        )
        ownership = Ownership(
            self._client,
            settings,
            Leases(self._client, name, settings.lease_ttl),
            Heartbeat(self._client, settings),
            scheduler,
            availability=availability,
            stopping=stopping,
            on_change=self._notify,
        )
        holder.append(ownership)
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                async with anyio.create_task_group() as tg:
                    await tg.start(scheduler.run)
                    await ownership.run()

        self.members[name] = _Member(name, ownership, scope)
        self._tg.start_soon(run)

    async def leave(self, name: str) -> None:
        """A graceful stop: the loop ends, the leases and the heartbeat are released."""
        member = self.members.pop(name)
        member.scope.cancel()
        await member.ownership.leave()

    def crash(self, name: str) -> None:
        """A SIGKILL: the loop stops, nothing is released (leases and heartbeat lapse)."""
        self.members.pop(name).scope.cancel()

    def stop(self) -> None:
        for member in self.members.values():
            member.scope.cancel()

    async def settled(self, *, within: float = 20.0) -> dict[str, int]:
        """Wait until every member owns exactly its share of the assignment over the
        members, and every lease in Redis says so; return the owned counts."""
        expected = assignment(list(self.members), _PARTITIONS)
        with anyio.fail_after(within):
            while True:
                self._changed = anyio.Event()
                if self._matches(expected) and await self._leases_match(expected):
                    break
                # A change callback, or a renewal period for leases that lapse by time.
                with anyio.move_on_after(_LEASE_TTL / 4):
                    await self._changed.wait()
        return {name: len(m.ownership.owned) for name, m in self.members.items()}

    def _matches(self, expected: dict[int, str]) -> bool:
        return all(
            set(m.ownership.owned) == {n for n, who in expected.items() if who == name}
            and m.ownership.readable() == m.ownership.owned
            for name, m in self.members.items()
        )

    async def _leases_match(self, expected: dict[int, str]) -> bool:
        values = await self._client.mget(
            [partition_lease(self._settings, n)[0] for n in range(_PARTITIONS)]
        )
        holders = [None if v is None else text(v).split("|")[0] for v in values]
        return holders == [expected[n] for n in range(_PARTITIONS)]


@contextlib.asynccontextmanager
async def _cluster(settings: Settings) -> AsyncIterator[_Cluster]:
    async with open_redis(settings) as client, anyio.create_task_group() as tg:
        cluster = _Cluster(client, settings, tg)
        try:
            yield cluster
        finally:
            cluster.stop()


def _assert_balanced(counts: dict[str, int]) -> None:
    k = len(counts)
    assert sum(counts.values()) == _PARTITIONS
    assert max(counts.values()) <= math.ceil(_PARTITIONS / k) + 1
    assert min(counts.values()) >= _PARTITIONS // k  # nobody idle either
    print(f"K={k}: owned {sorted(Counter(counts.values()).items())}")


@pytest.mark.timeout(120)
async def test_three_instances_stay_balanced_through_joins_a_leave_and_a_crash(
    settings: Settings, prefix: str
) -> None:
    async with _cluster(settings) as cluster:
        await cluster.join(f"{prefix}-a")
        _assert_balanced(await cluster.settled())
        for name in ("b", "c"):
            await cluster.join(f"{prefix}-{name}")
            _assert_balanced(await cluster.settled())
        await cluster.leave(f"{prefix}-b")
        _assert_balanced(await cluster.settled())
        await cluster.join(f"{prefix}-d")
        _assert_balanced(await cluster.settled())
        cluster.crash(f"{prefix}-c")  # its leases lapse after the TTL
        _assert_balanced(await cluster.settled())


@pytest.mark.timeout(180)
async def test_eight_instances_stay_balanced_through_joins_leaves_and_crashes(
    settings: Settings, prefix: str
) -> None:
    """Grow 3 → 8 one at a time, then crash two and stop one gracefully (→ 5), then
    two join at once (→ 7): each steady state owns ⌊P/K⌋ or ⌈P/K⌉ per instance."""
    names = [f"{prefix}-{i}" for i in range(10)]
    async with _cluster(settings) as cluster:
        for name in names[:3]:
            await cluster.join(name)
        _assert_balanced(await cluster.settled())
        for name in names[3:8]:
            await cluster.join(name)
            _assert_balanced(await cluster.settled())
        cluster.crash(names[1])
        cluster.crash(names[6])
        _assert_balanced(await cluster.settled())
        await cluster.leave(names[4])
        _assert_balanced(await cluster.settled())
        await cluster.join(names[8])
        await cluster.join(names[9])
        counts = await cluster.settled()
        assert len(counts) == 7
        _assert_balanced(counts)
