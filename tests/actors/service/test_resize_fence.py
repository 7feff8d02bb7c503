"""The resize's fence on the movers, on the real Redis, in process: a batch checked
before the gate closed cannot land after it (the barrier in the partition's slot), the
cursors come to rest at one ``ctxd:in`` id, and after the switch the movers of the new
count go on from that id, each entry moved once.

A mover asks the record before each batch and then reads and moves; the test holds one
mover between its check (answered "+") and its read while the resize closes the gate
and a producer appends one more entry — the check-then-move gap, made deterministic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import cast

import anyio
import pytest
from actor_support import open_redis
from cluster_support import three_masters
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT, FieldT

from actors.config import Settings
from actors.service.input_gate import UNBOUNDED, moving_bound
from actors.service.input_routing import SOURCE_FIELD, barrier_key, cursor_key
from actors.service.lease import Leases
from actors.service.partition_record import PartitionRecord, claim_record, read_record
from actors.service.partitions import partition_lease, partition_of, partition_stream
from actors.service.resize import (
    abort_resize,
    begin_resize,
    close_input,
    open_input,
    switch_count,
    unrouted_partitions,
)
from actors.service.router import MoveBound, PartitionRouter
from actors.testing import aread_entries

WITHIN = 10.0


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def add(redis: Redis, stream: str, fields: Mapping[str, str]) -> str:
    payload: dict[FieldT, EncodableT] = dict(fields.items())
    return text(await redis.xadd(stream, payload))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Redis]:
    async with open_redis(settings) as redis:
        yield redis


async def hold(redis: Redis, settings: Settings, ns: range) -> dict[int, str]:
    """This test's leases on partitions ``ns``: partition → lease value."""
    leases = Leases(redis, settings.instance, 30.0)
    held: dict[int, str] = {}
    for n in ns:
        value = await leases.acquire(*partition_lease(settings, n))
        assert value is not None
        held[n] = value
    return held


@asynccontextmanager
async def routing(
    redis: Redis, settings: Settings, owned: Mapping[int, str], bound: MoveBound
) -> AsyncIterator[PartitionRouter]:
    router = PartitionRouter(redis, settings, lambda: owned, bound=bound)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run, stopping)
        yield router
        stopping.set()


class HeldGate:
    """:func:`moving_bound`, but when asked to, it holds the mover after one answer of
    ``+`` until released: the mover then reads and moves as if checked back then."""

    def __init__(self) -> None:
        self.hold_next = False
        self.holding = anyio.Event()
        self.release = anyio.Event()
        self.asked_after_release = anyio.Event()

    async def __call__(self, redis: Redis, settings: Settings) -> str | None:
        if self.release.is_set():
            self.asked_after_release.set()  # the held batch is done: the mover is sequential
        bound = await moving_bound(redis, settings)
        if self.hold_next and bound == UNBOUNDED:
            self.hold_next = False
            self.holding.set()
            await self.release.wait()
        return bound


async def all_sources(redis: Redis, settings: Settings, count: int) -> list[str]:
    """The ``ctxd:in`` ids in partitions ``0 … count-1``."""
    found: list[str] = []
    for n in range(count):
        entries = await aread_entries(redis, partition_stream(settings, n), 0)
        found += [f[SOURCE_FIELD] for _, f in entries]
    return found


async def test_a_batch_checked_before_the_gate_closed_cannot_land_after_it(
    client: Redis, settings: Settings
) -> None:
    await fence_then_switch(client, settings)


@pytest.mark.slow
async def test_the_fence_and_the_switch_run_on_a_cluster(
    settings: Settings, tmp_path: Path
) -> None:
    """Every step's keys are in one slot (a barrier with its cursor) or one key each:
    the same scenario on three masters."""
    with three_masters(tmp_path) as ports:
        cluster = RedisCluster(host="127.0.0.1", port=ports[0])
        await cluster.initialize()
        try:
            await fence_then_switch(cast(Redis, cluster), replace(settings, cluster=True))
        finally:
            await cluster.aclose()


async def fence_then_switch(client: Redis, settings: Settings) -> None:
    """Hold a mover between its check and its read while the gate closes and one more
    entry comes; then drain, switch to 8 partitions and move it under the new count."""
    s4, s8 = replace(settings, partitions=4), replace(settings, partitions=8)
    await claim_record(client, s4)
    wf = "wf-late"
    before = [await add(client, s4.input_stream, {"workflow_id": wf, "content": "a"})]
    gate = HeldGate()
    owned = await hold(client, s4, range(4))
    async with routing(client, s4, owned, gate):
        await aread_entries(client, partition_stream(s4, partition_of(wf, 4)), 1, within=WITHIN)
        gate.hold_next = True
        with anyio.fail_after(WITHIN):
            await gate.holding.wait()  # checked: "+"; not read yet
        record = await begin_resize(client, s4, 8)
        closed = await close_input(client, s4, record)
        until = closed.route_until
        assert until == before[-1]
        late = await add(client, s4.input_stream, {"workflow_id": wf, "content": "late"})
        gate.release.set()
        with anyio.fail_after(WITHIN):
            await gate.asked_after_release.wait()  # the held batch was read and moved
        assert late not in await all_sources(client, s4, 4)  # the barrier held
        with anyio.fail_after(WITHIN):  # the cursors come to rest at `until`
            while await unrouted_partitions(client, s4, 4, until):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        cursors = [text(await client.get(cursor_key(s4, n))) for n in range(4)]
        assert cursors == [until] * 4
    # The old partitions' owners finished (no entry unread) and the old movers stopped.
    for n in range(4):
        await client.xgroup_create(partition_stream(s4, n), s4.group, id="$", mkstream=True)
    flipped = await switch_count(client, s4, closed, 8)
    assert flipped == PartitionRecord(count=8, epoch=2, state="resizing", next=8, barriers=4)
    assert [text(await client.get(cursor_key(s8, n))) for n in range(8)] == [until] * 8
    assert await moving_bound(client, s8) is None  # nothing moves before no old instance runs
    assert await moving_bound(client, s4) is None  # another count: nothing, ever
    assert await open_input(client, s8, flipped)
    assert await read_record(client, s8) == PartitionRecord(count=8, epoch=2)
    assert [await client.get(barrier_key(s8, n)) for n in range(8)] == [None] * 8
    owned8 = await hold(client, s8, range(4, 8))
    owned8.update({n: owned[n] for n in range(4)})
    home = partition_stream(s8, partition_of(wf, 8))
    wanted = len(await aread_entries(client, home, 0)) + 1
    async with routing(client, s8, owned8, moving_bound):
        moved = await aread_entries(client, home, wanted, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in moved].count(late) == 1
    assert (await all_sources(client, s8, 8)).count(late) == 1
    assert sorted(await all_sources(client, s8, 8)) == sorted([*before, late])


async def test_an_abort_before_the_flip_lifts_the_barriers_and_the_bound(
    client: Redis, settings: Settings
) -> None:
    """A resize killed after it set its barriers: ``ctxd partitions abort`` deletes them
    with ``route_until``, and the movers of the old count move without a bound again."""
    s4 = replace(settings, partitions=4)
    await claim_record(client, s4)
    last = await add(client, s4.input_stream, {"workflow_id": "wf", "content": "a"})
    closed = await close_input(client, s4, await begin_resize(client, s4, 8))
    assert closed.route_until == last
    assert [text(await client.get(barrier_key(s4, n))) for n in range(4)] == [last] * 4
    assert await moving_bound(client, s4) == last
    assert await abort_resize(client, s4) == PartitionRecord(count=4, epoch=1)
    assert [await client.get(barrier_key(s4, n)) for n in range(4)] == [None] * 4
    assert await moving_bound(client, s4) == UNBOUNDED


async def test_a_shrink_lifts_every_old_barrier_and_starts_the_fewer_partitions_at_one_id(
    client: Redis, settings: Settings
) -> None:
    """8 → 4: the barriers of partitions 4-7 (no longer used) are lifted too, so a later
    grow finds none; partitions 0-3 go on from the one id, each entry once."""
    s8, s4 = replace(settings, partitions=8), replace(settings, partitions=4)
    await claim_record(client, s8)
    early = [
        await add(client, s8.input_stream, {"workflow_id": f"wf-{i}", "content": "a"})
        for i in range(12)
    ]
    owned = await hold(client, s8, range(8))
    async with routing(client, s8, owned, moving_bound):
        closed = await close_input(client, s8, await begin_resize(client, s8, 4))
        late = await add(client, s8.input_stream, {"workflow_id": "wf-1", "content": "late"})
        with anyio.fail_after(WITHIN):  # the cursors are seen in Redis only
            while await unrouted_partitions(client, s8, 8, closed.route_until or ""):  # noqa: ASYNC110
                await anyio.sleep(0.02)
    assert sorted(await all_sources(client, s8, 8)) == sorted(early)  # not the late one
    for n in range(8):
        await client.xgroup_create(partition_stream(s8, n), s8.group, id="$", mkstream=True)
    flipped = await switch_count(client, s8, closed, 4)
    assert await open_input(client, s4, flipped)
    assert [await client.get(barrier_key(s8, n)) for n in range(8)] == [None] * 8
    assert [text(await client.get(cursor_key(s4, n))) for n in range(4)] == [early[-1]] * 4
    home = partition_stream(s4, partition_of("wf-1", 4))
    wanted = len(await aread_entries(client, home, 0)) + 1
    async with routing(client, s4, {n: owned[n] for n in range(4)}, moving_bound):
        moved = await aread_entries(client, home, wanted, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in moved][-1] == late
    assert (await all_sources(client, s8, 8)).count(late) == 1
