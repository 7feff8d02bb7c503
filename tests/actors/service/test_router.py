"""The router on the real Redis: ``ctxd:in`` to partitions, invalid entries to the DLQ,
fenced once its lease is lost, strays of other consumers adopted.

The router runs in the test's event loop; the test waits on what it writes (XREAD
BLOCK through :func:`actors.testing.aread_entries`) and on its lease calls (events set
by :class:`ObservedLeases`), never on a sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace

import anyio
import pytest
from actor_support import open_redis
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from actors.config import Settings
from actors.service.lease import Leases
from actors.service.partitions import lease_key, partition_of, partition_stream
from actors.service.router import ROUTER_CONSUMER, SOURCE_FIELD, Router
from actors.testing import aread_entries

WITHIN = 5.0


class ObservedLeases(Leases):
    """Real leases that tell the test when the router acquired, was refused, released."""

    def __init__(self, redis: Redis, owner: str, ttl: float) -> None:
        super().__init__(redis, owner, ttl)
        self.acquired: list[str] = []
        self.refused = anyio.Event()
        self.released = anyio.Event()

    async def acquire(self, key: str, fence_key: str) -> str | None:
        value = await super().acquire(key, fence_key)
        if value is None:
            self.refused.set()
        else:
            self.acquired.append(value)
        return value

    async def release(self, key: str, value: str) -> bool:
        released = await super().release(key, value)
        self.released.set()
        return released


def text(value: object) -> str:
    """A reply value as text (the async client answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def add(redis: Redis, stream: str, fields: Mapping[str, str]) -> str:
    """XADD ``fields``; the new entry's id."""
    payload: dict[FieldT, EncodableT] = dict(fields.items())
    return text(await redis.xadd(stream, payload))


@pytest.fixture
def routing(settings: Settings) -> Settings:
    """Four partitions; a short lease so a lost one is given up and retaken quickly."""
    return replace(settings, partitions=4, lease_ttl=0.6, trim_interval=0.0)


@pytest.fixture
async def client(routing: Settings) -> AsyncIterator[Redis]:
    async with open_redis(routing) as redis:
        yield redis


@asynccontextmanager
async def running_router(redis: Redis, settings: Settings, leases: Leases) -> AsyncIterator[Router]:
    router = Router(redis, settings, leases)
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run, stopping)
        yield router
        stopping.set()


async def test_valid_entries_go_to_their_workflows_partition_in_order_and_invalid_to_the_dlq(
    client: Redis, routing: Settings
) -> None:
    s = routing
    sent: list[tuple[str, str]] = []  # (input id, workflow id)
    for n in range(12):
        workflow_id = f"wf-{n % 5}"
        fields = {"workflow_id": workflow_id, "content": f"event {n}"}
        if n == 3:  # a producer's own ctxd_source_id is replaced by the real one
            fields[SOURCE_FIELD] = "forged"
        sent.append((await add(client, s.input_stream, fields), workflow_id))
    bad = await add(client, s.input_stream, {"content": "no workflow"})
    expected: dict[int, list[str]] = {}
    for entry_id, workflow_id in sent:
        expected.setdefault(partition_of(workflow_id, s.partitions), []).append(entry_id)

    leases = Leases(client, s.instance, s.lease_ttl)
    async with running_router(client, s, leases) as router:
        with anyio.fail_after(WITHIN):
            dead = await aread_entries(client, s.dlq_stream, 1, within=WITHIN)
            routed = {
                n: await aread_entries(client, partition_stream(s, n), len(ids), within=WITHIN)
                for n, ids in expected.items()
            }
    assert {n: [f[SOURCE_FIELD] for _, f in entries] for n, entries in routed.items()} == expected
    by_source = {f[SOURCE_FIELD]: f for entries in routed.values() for _, f in entries}
    assert by_source[sent[3][0]]["content"] == "event 3"
    assert [(f["source_id"], f["reason"]) for _, f in dead] == [(bad, "missing_workflow_id")]
    assert dead[0][1]["content"] == "no workflow"
    assert (router.routed, router.dead_lettered) == (12, 1)
    pending = await client.xpending(s.input_stream, s.group)
    assert pending["pending"] == 0  # every entry acknowledged with its move
    assert not await client.exists(lease_key(s, "router")[0])  # released on the way out


async def test_a_router_that_lost_its_lease_stops_moving_and_the_next_tenure_routes_on(
    client: Redis, routing: Settings
) -> None:
    s = routing
    key, _ = lease_key(s, "router")
    leases = ObservedLeases(client, s.instance, s.lease_ttl)
    first = await add(client, s.input_stream, {"workflow_id": "w", "content": "one"})
    target = partition_stream(s, partition_of("w", s.partitions))
    async with running_router(client, s, leases) as router:
        with anyio.fail_after(WITHIN):
            assert len(await aread_entries(client, target, 1, within=WITHIN)) == 1
            await client.set(key, "thief|999999")  # another instance holds the lease now
            second = await add(client, s.input_stream, {"workflow_id": "w", "content": "two"})
            await leases.released.wait()  # the router noticed, and gave its tenure up
            await leases.refused.wait()  # and competes again, without routing meanwhile
            assert not router.active
            assert [f[SOURCE_FIELD] for _, f in await aread_entries(client, target, 1)] == [first]
            groups = {g["name"]: g for g in await client.xinfo_groups(s.input_stream)}
            assert text(groups[s.group.encode()]["last-delivered-id"]) == first  # unread
            await client.delete(key)  # the thief's lease ends
            routed = await aread_entries(client, target, 2, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in routed] == [first, second]
    first_token, second_token = (int(v.rpartition("|")[2]) for v in leases.acquired[:2])
    assert second_token > first_token


async def test_entries_left_pending_by_another_consumer_are_adopted_and_routed(
    client: Redis, routing: Settings
) -> None:
    """A stray (pending for an old consumer name, idle past twice the event timeout) is
    claimed by the router; one still fresh is left to its consumer."""
    s = routing
    await client.xgroup_create(s.input_stream, s.group, id="0", mkstream=True)
    stray = await add(client, s.input_stream, {"workflow_id": "w", "content": "old"})
    fresh = await add(client, s.input_stream, {"workflow_id": "w", "content": "new"})
    await client.xreadgroup(s.group, "ctxd-old", {s.input_stream: ">"}, count=2)
    idle_ms = int(s.event_timeout * 2000) + 60_000
    await client.xclaim(s.input_stream, s.group, "ctxd-old", 0, [stray], idle=idle_ms)
    target = partition_stream(s, partition_of("w", s.partitions))
    async with running_router(client, s, Leases(client, s.instance, s.lease_ttl)):
        with anyio.fail_after(WITHIN):
            routed = await aread_entries(client, target, 1, within=WITHIN)
    assert [f[SOURCE_FIELD] for _, f in routed] == [stray]
    pending = await client.xpending_range(s.input_stream, s.group, "-", "+", 10)
    assert [(text(p["message_id"]), text(p["consumer"])) for p in pending] == [(fresh, "ctxd-old")]
    assert ROUTER_CONSUMER not in {text(p["consumer"]) for p in pending}
