"""Owners route their own partitions, on the real Redis: ``ctxd:in`` to partitions in
order and exactly once (per-partition cursors), invalid entries to the DLQ once (by
partition 0's owner), a lost lease refused, a resize stops moving, ``ctxd:in`` trimmed
below the lowest cursor, and the upgrade from the single router's consumer group.

The routers run in the test's event loop; the test waits on what they write (XREAD
BLOCK through :func:`actors.testing.aread_entries`) or on events they set, never on a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from unittest.mock import ANY

import anyio
import pytest
from actor_support import open_redis
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from actors.config import Settings
from actors.service.input_gate import moving_bound, partitions_record_key
from actors.service.input_routing import SOURCE_FIELD, barrier_key, cursor_key
from actors.service.lease import Leases
from actors.service.partitions import lease_key, partition_lease, partition_of, partition_stream
from actors.service.router import PartitionRouter
from actors.service.router_upgrade import RETIRED
from actors.testing import aread_entries

WITHIN = 5.0


def text(value: object) -> str:
    """A reply value as text (the async client answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def add(redis: Redis, stream: str, fields: Mapping[str, str]) -> str:
    """XADD ``fields``; the new entry's id."""
    payload: dict[FieldT, EncodableT] = dict(fields.items())
    return text(await redis.xadd(stream, payload))


@pytest.fixture
def routing(settings: Settings) -> Settings:
    """Four partitions, trims every 50 ms."""
    return replace(settings, partitions=4, trim_interval=0.05)


@pytest.fixture
async def client(routing: Settings) -> AsyncIterator[Redis]:
    async with open_redis(routing) as redis:
        yield redis


async def hold(
    redis: Redis, settings: Settings, owner: str, ns: range | list[int]
) -> dict[int, str]:
    """Take the leases of partitions ``ns`` for ``owner``: partition → lease value."""
    leases = Leases(redis, owner, 30.0)
    held: dict[int, str] = {}
    for n in ns:
        value = await leases.acquire(*partition_lease(settings, n))
        assert value is not None
        held[n] = value
    return held


Bound = Callable[[Redis, Settings], Awaitable[str | None]]


@asynccontextmanager
async def running(
    redis: Redis,
    settings: Settings,
    owned: Mapping[int, str],
    *,
    bound: Bound = moving_bound,
    fenced: list[tuple[int, str]] | None = None,
    refused: anyio.Event | None = None,
) -> AsyncIterator[PartitionRouter]:
    def on_fenced(n: int, value: str) -> None:
        if fenced is not None:
            fenced.append((n, value))
        if refused is not None:
            refused.set()

    router = PartitionRouter(redis, settings, lambda: owned, on_fenced=on_fenced, bound=bound)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run, stopping)
        yield router
        stopping.set()


async def sources(redis: Redis, settings: Settings, n: int) -> list[str]:
    """The ``ctxd:in`` ids in partition ``n``'s stream, in order."""
    return [
        f[SOURCE_FIELD] for _, f in await aread_entries(redis, partition_stream(settings, n), 0)
    ]


async def test_entries_reach_their_partition_in_order_once_and_invalid_ones_the_dlq_once(
    client: Redis, routing: Settings
) -> None:
    s = routing
    sent: list[tuple[str, str]] = []
    for i in range(12):
        workflow_id = f"wf-{i % 5}"
        fields = {"workflow_id": workflow_id, "content": f"event {i}"}
        if i == 3:  # a producer's own ctxd_source_id is replaced by the real one
            fields[SOURCE_FIELD] = "forged"
        sent.append((await add(client, s.input_stream, fields), workflow_id))
    bad = await add(client, s.input_stream, {"content": "no workflow"})
    expected: dict[int, list[str]] = {}
    for entry_id, workflow_id in sent:
        expected.setdefault(partition_of(workflow_id, s.partitions), []).append(entry_id)
    owned = await hold(client, s, s.instance, range(s.partitions))
    async with running(client, s, owned) as router:
        dead = await aread_entries(client, s.dlq_stream, 1, within=WITHIN)
        routed = {
            n: await aread_entries(client, partition_stream(s, n), len(ids), within=WITHIN)
            for n, ids in expected.items()
        }
    assert {n: [f[SOURCE_FIELD] for _, f in e] for n, e in routed.items()} == expected
    by_source = {f[SOURCE_FIELD]: f for entries in routed.values() for _, f in entries}
    assert by_source[sent[3][0]]["content"] == "event 3"
    assert [(f["source_id"], f["reason"]) for _, f in dead] == [(bad, "missing_workflow_id")]
    assert (router.routed, router.dead_lettered) == (12, 1)
    # Routed again from the stored cursors (a restart): only the new entry is moved.
    later = await add(client, s.input_stream, {"workflow_id": "wf-0", "content": "later"})
    home = partition_of("wf-0", s.partitions)
    expected[home].append(later)
    async with running(client, s, owned) as again:
        await aread_entries(client, partition_stream(s, home), len(expected[home]), within=WITHIN)
    assert (again.routed, again.dead_lettered) == (1, 0)
    assert {n: await sources(client, s, n) for n in expected} == expected
    assert await client.xlen(s.dlq_stream) == 1
    assert not await client.exists(s.key("lease", "router"))  # no router lease any more


async def test_two_owners_split_the_input_and_a_takeover_goes_on_from_the_cursor(
    client: Redis, routing: Settings
) -> None:
    """Two instances each route their own partitions; when one stops, the partitions it
    owned are routed by the other from their cursors: every entry once, in order."""
    s = routing
    workflows = [f"w{i}" for i in range(16)]
    first = [
        await add(client, s.input_stream, {"workflow_id": w, "content": "1"}) for w in workflows
    ]
    a = await hold(client, s, "a", [0, 1])
    b = await hold(client, s, "b", [2, 3])
    per_partition: dict[int, list[str]] = {}
    for entry_id, w in zip(first, workflows, strict=True):
        per_partition.setdefault(partition_of(w, s.partitions), []).append(entry_id)
    async with running(client, s, a), running(client, s, b):
        for n, ids in per_partition.items():
            await aread_entries(client, partition_stream(s, n), len(ids), within=WITHIN)
    # b is gone; a takes its leases over (new tenures) and routes what came meanwhile.
    second = [
        await add(client, s.input_stream, {"workflow_id": w, "content": "2"}) for w in workflows
    ]
    for n in (2, 3):
        await client.delete(partition_lease(s, n)[0])
    a.update(await hold(client, s, "a", [2, 3]))
    for entry_id, w in zip(second, workflows, strict=True):
        per_partition[partition_of(w, s.partitions)].append(entry_id)
    async with running(client, s, a):
        for n, ids in per_partition.items():
            await aread_entries(client, partition_stream(s, n), len(ids), within=WITHIN)
    assert {n: await sources(client, s, n) for n in per_partition} == per_partition


async def test_a_router_whose_lease_was_lost_is_refused_and_lets_go(
    client: Redis, routing: Settings
) -> None:
    s = routing
    n = partition_of("w", s.partitions)
    owned = await hold(client, s, s.instance, [n])
    await client.set(partition_lease(s, n)[0], "thief|999")  # another instance holds it now
    await add(client, s.input_stream, {"workflow_id": "w", "content": "one"})
    fenced: list[tuple[int, str]] = []
    refused = anyio.Event()
    async with running(client, s, owned, fenced=fenced, refused=refused):
        with anyio.fail_after(WITHIN):
            await refused.wait()
    assert fenced == [(n, owned[n])]
    assert await client.xlen(partition_stream(s, n)) == 0
    assert await client.get(cursor_key(s, n)) is None


async def test_nothing_moves_while_a_resize_is_in_progress(
    client: Redis, routing: Settings
) -> None:
    s = routing
    record = partitions_record_key(s.stream_prefix)
    await client.hset(record, mapping={"count": s.partitions, "epoch": 1, "state": "resizing"})
    asked = anyio.Event()
    answers: list[bool] = []

    async def gate(redis: Redis, settings: Settings) -> str | None:
        up_to = await moving_bound(redis, settings)
        answers.append(up_to is not None)
        if len(answers) >= 3:
            asked.set()
        return up_to

    n = partition_of("w", s.partitions)
    entry = await add(client, s.input_stream, {"workflow_id": "w", "content": "one"})
    owned = await hold(client, s, s.instance, range(s.partitions))
    async with running(client, s, owned, bound=gate):
        await asked.wait()
        assert await client.xlen(partition_stream(s, n)) == 0  # asked thrice, moved nothing
        assert await client.get(cursor_key(s, n)) is None  # and scanned nothing
        await client.hset(record, "state", "active")
        moved = await aread_entries(client, partition_stream(s, n), 1, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in moved] == [entry]
    assert answers[:3] == [False, False, False]


async def test_the_input_is_trimmed_to_the_lowest_cursor_only(
    client: Redis, routing: Settings
) -> None:
    """Partitions 0-2 are routed, partition 3 has no owner: nothing past its cursor may go,
    so ``ctxd:in`` keeps every entry after the lowest cursor."""
    s = routing
    by_partition: dict[int, str] = {}
    i = 0
    while len(by_partition) < s.partitions:
        w = f"wf{i}"
        by_partition.setdefault(partition_of(w, s.partitions), w)
        i += 1
    ids = {
        n: await add(client, s.input_stream, {"workflow_id": w, "content": "x"})
        for n, w in sorted(by_partition.items(), key=lambda kv: kv[1])
    }
    await client.set(cursor_key(s, 3), "0-0")
    owned = await hold(client, s, s.instance, [0, 1, 2])
    async with running(client, s, owned):
        for n in (0, 1, 2):
            await aread_entries(client, partition_stream(s, n), 1, within=WITHIN)
    assert await client.xlen(s.input_stream) == len(ids)  # partition 3 moved nothing yet
    owned.update(await hold(client, s, s.instance, [3]))
    async with running(client, s, owned):
        await aread_entries(client, partition_stream(s, 3), 1, within=WITHIN)
        last = max(ids.values(), key=lambda e: tuple(int(x) for x in e.split("-")))
        with anyio.fail_after(WITHIN):  # every cursor reaches the end: all but it trimmed
            # A trim is seen in Redis only; each look is one XRANGE of a short stream.
            while await client.xrange(s.input_stream) != [(last.encode(), ANY)]:  # noqa: ASYNC110
                await anyio.sleep(0.02)


async def test_the_old_routers_group_is_taken_over_without_loss_or_double(
    client: Redis, routing: Settings
) -> None:
    """A deployment of the single router: entries it moved (acknowledged), entries it
    read but had not moved (pending) and entries it never read. The new version moves
    the pending ones and the unread ones, each once, in order, and retires the group."""
    s = routing
    await client.xgroup_create(s.input_stream, s.group, id="0", mkstream=True)
    moved_before = [
        await add(client, s.input_stream, {"workflow_id": "w", "content": f"m{i}"})
        for i in range(3)
    ]
    pending = [
        await add(client, s.input_stream, {"workflow_id": "w", "content": f"p{i}"})
        for i in range(2)
    ]
    pending_bad = await add(client, s.input_stream, {"content": "no workflow"})
    await client.xreadgroup(s.group, "router", {s.input_stream: ">"}, count=6)
    n = partition_of("w", s.partitions)
    for entry_id in moved_before:  # what the old router's MOVE did: append + ack
        await client.xadd(
            partition_stream(s, n), {"workflow_id": "w", "content": "old", SOURCE_FIELD: entry_id}
        )
        await client.xack(s.input_stream, s.group, entry_id)
    unread = [
        await add(client, s.input_stream, {"workflow_id": "w", "content": f"u{i}"})
        for i in range(2)
    ]
    owned = await hold(client, s, s.instance, range(s.partitions))
    async with running(client, s, owned):
        await aread_entries(client, partition_stream(s, n), 7, within=WITHIN)
        dead = await aread_entries(client, s.dlq_stream, 1, within=WITHIN)
    assert await sources(client, s, n) == moved_before + pending + unread
    assert [f["source_id"] for _, f in dead] == [pending_bad]
    assert s.group not in {text(g["name"]) for g in await client.xinfo_groups(s.input_stream)}
    assert text(await client.get(lease_key(s, "router")[0])) == RETIRED
    # A second start (the upgrade is done) moves only what is new.
    later = await add(client, s.input_stream, {"workflow_id": "w", "content": "later"})
    async with running(client, s, owned) as again:
        await aread_entries(client, partition_stream(s, n), 8, within=WITHIN)
    assert again.routed == 1
    assert await sources(client, s, n) == moved_before + pending + unread + [later]


async def test_a_resize_leaves_every_cursor_at_what_was_scanned(
    client: Redis, routing: Settings
) -> None:
    """When a resize begins, partitions with nothing to move (whose cursors are written
    lazily) store how far they scanned: the cursors then say exactly what was moved."""
    s = routing
    record = partitions_record_key(s.stream_prefix)
    await client.hset(record, mapping={"count": s.partitions, "epoch": 1, "state": "active"})
    refused = anyio.Event()
    refusals: list[bool] = []

    async def gate(redis: Redis, settings: Settings) -> str | None:
        up_to = await moving_bound(redis, settings)
        if up_to is None:
            refusals.append(False)
            if len(refusals) == 2:  # the first refusal's work is done by now
                refused.set()
        return up_to

    n = partition_of("w", s.partitions)
    last = await add(client, s.input_stream, {"workflow_id": "w", "content": "one"})
    owned = await hold(client, s, s.instance, range(s.partitions))
    async with running(client, s, owned, bound=gate):
        await aread_entries(client, partition_stream(s, n), 1, within=WITHIN)
        await client.hset(record, "state", "resizing")
        with anyio.fail_after(WITHIN):
            await refused.wait()
        cursors = [await client.get(cursor_key(s, m)) for m in range(s.partitions)]
    assert [text(c) for c in cursors] == [last] * s.partitions


async def test_a_resize_with_route_until_moves_up_to_that_id_and_rests_there(
    client: Redis, routing: Settings
) -> None:
    """``route_until``: entries up to that id are still moved, none after it; every
    partition's cursor (owned and idle ones) comes to rest exactly at it."""
    s = routing
    before = [
        await add(client, s.input_stream, {"workflow_id": "w", "content": f"{i}"}) for i in range(3)
    ]
    record = partitions_record_key(s.stream_prefix)
    await client.hset(record, mapping={"count": s.partitions, "epoch": 1, "state": "resizing"})
    await client.hset(record, "route_until", before[-1])
    after = await add(client, s.input_stream, {"workflow_id": "w", "content": "later"})
    n = partition_of("w", s.partitions)
    owned = await hold(client, s, s.instance, range(s.partitions))
    async with running(client, s, owned):
        moved = await aread_entries(client, partition_stream(s, n), 3, within=WITHIN)
        with anyio.fail_after(WITHIN):  # the cursors are seen in Redis only
            while [await client.get(cursor_key(s, m)) for m in range(s.partitions)] != [  # noqa: ASYNC110
                before[-1].encode()
            ] * s.partitions:
                await anyio.sleep(0.02)
        assert await client.xlen(partition_stream(s, n)) == 3  # not the one after the bound
        await client.hset(record, mapping={"state": "active", "route_until": ""})
        moved = await aread_entries(client, partition_stream(s, n), 4, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in moved] == [*before, after]


async def test_nothing_past_a_partitions_barrier_is_moved_or_scanned(
    client: Redis, routing: Settings
) -> None:
    """A barrier (set by a resize, checked in the move script itself) stops its partition
    at that id: entries up to it are moved, none after it, the cursor rests there; once
    it is deleted the partition goes on. Other partitions are not held."""
    s = routing
    n = partition_of("w", s.partitions)
    other = next(m for m in range(s.partitions) if m != n)
    w_other = next(f"o{i}" for i in range(1000) if partition_of(f"o{i}", s.partitions) == other)
    ids = [
        await add(client, s.input_stream, {"workflow_id": "w", "content": f"{i}"}) for i in range(3)
    ]
    await client.set(barrier_key(s, n), ids[1])
    late = await add(client, s.input_stream, {"workflow_id": w_other, "content": "not held"})
    owned = await hold(client, s, s.instance, range(s.partitions))
    async with running(client, s, owned):
        passed = await aread_entries(client, partition_stream(s, other), 1, within=WITHIN)
        moved = await aread_entries(client, partition_stream(s, n), 2, within=WITHIN)
        with anyio.fail_after(WITHIN):  # the cursor is seen in Redis only
            while await client.get(cursor_key(s, n)) != ids[1].encode():  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert await client.xlen(partition_stream(s, n)) == 2
        await client.delete(barrier_key(s, n))
        moved = await aread_entries(client, partition_stream(s, n), 3, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in moved] == ids
    assert [f[SOURCE_FIELD] for _, f in passed] == [late]  # after n's barrier, not held
