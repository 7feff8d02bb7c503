"""Single writer with a separate checkpoint store: fencing-token floors.

Two real Redis servers, as on a cluster deployment: the service Redis (the session's)
holds the partition leases, a second one (started here) holds the checkpoints. The
pointer script in the store cannot read the lease, so a new owner raises the lease's
floor in the store to its token before it reads the partition, and a zombie's pointer
write under an older token is refused. The writes below come from a lost tenure *after*
its pre-check would have passed, the window only the script can close.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace

import anyio
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_helpers import OwnRedis
from stream_support import ScriptedRunner

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.service.checkpoint_floor import (
    CheckpointFloor,
    floor_fenced_pointer_writer,
    lease_token,
)
from actors.service.heartbeat import Heartbeat
from actors.service.lease import Leases
from actors.service.ownership import Ownership
from actors.service.partitions import partition_lease
from actors.service.scheduler import Scheduler
from graph.checkpointer import open_checkpointer
from graph.errors import FencedError

_TENURE: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "test_floor_tenure", default=None
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    """The checkpoint store: a second Redis Stack server of this module's own."""
    server = OwnRedis(tmp_path_factory.mktemp("checkpoint-store"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def store_client(store: OwnRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(store.url)
    yield client
    await client.aclose()


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Redis]:
    assert settings.redis_url is not None
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def saver(
    store: OwnRedis, store_client: Redis, settings: Settings
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer(
        "redis",
        namespace=settings.stream_prefix,
        redis_url=store.url,
        redis_client=store_client,
        pointer_writer=floor_fenced_pointer_writer(_TENURE.get, settings),
        url_setting="CTXD_CHECKPOINT_URL",
    ) as opened:
        yield opened


async def _put(saver: BaseCheckpointSaver[str], thread: str, events: int) -> str:
    checkpoint = empty_checkpoint()
    checkpoint["id"] = str(uuid6())
    checkpoint["channel_values"] = {"events_processed": events}
    config: RunnableConfig = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    await saver.aput(config, checkpoint, {"source": "loop", "step": events}, {})
    return checkpoint["id"]


async def _latest_events(saver: BaseCheckpointSaver[str], thread: str) -> int:
    found = await saver.aget_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
    assert found is not None
    return int(found.checkpoint["channel_values"]["events_processed"])


async def test_a_zombies_pointer_write_is_refused_once_another_owner_took_the_partition(
    service: Redis,
    store_client: Redis,
    saver: BaseCheckpointSaver[str],
    settings: Settings,
) -> None:
    thread = f"wf-{uuid.uuid4().hex[:6]}"
    key, fence = partition_lease(settings, 3)
    floor = CheckpointFloor(store_client, settings)
    a = Leases(service, "a", ttl=30)
    b = Leases(service, "b", ttl=30)

    lease_a = await a.acquire(key, fence)
    assert lease_a is not None
    await floor.raise_to(key, lease_a)
    _TENURE.set((key, lease_a))
    await _put(saver, thread, 37)

    await service.delete(key)  # a paused past its lease: the key expired
    lease_b = await b.acquire(key, fence)
    assert lease_b is not None
    assert lease_token(lease_b) > lease_token(lease_a)
    await floor.raise_to(key, lease_b)
    _TENURE.set((key, lease_b))
    await _put(saver, thread, 40)  # the new owner went on

    _TENURE.set((key, lease_a))  # the zombie wakes up past its fence pre-check
    with pytest.raises(FencedError, match="taken with token"):
        await _put(saver, thread, 38)
    assert await _latest_events(saver, thread) == 40
    # Neither store holds the other's keys: the lease stays in the service Redis.
    assert await store_client.exists(key) == 0
    assert await service.exists(f"{settings.stream_prefix}:fence_floor") == 0


async def test_the_zombie_is_refused_before_the_new_owner_wrote_anything(
    service: Redis,
    store_client: Redis,
    saver: BaseCheckpointSaver[str],
    settings: Settings,
) -> None:
    """The floor is raised at acquisition, not at the new owner's first write: what the
    new owner will read is already safe from the zombie."""
    thread = f"wf-{uuid.uuid4().hex[:6]}"
    key, fence = partition_lease(settings, 5)
    floor = CheckpointFloor(store_client, settings)
    lease_a = await Leases(service, "a", ttl=30).acquire(key, fence)
    assert lease_a is not None
    await floor.raise_to(key, lease_a)
    _TENURE.set((key, lease_a))
    await _put(saver, thread, 1)

    await service.delete(key)
    lease_b = await Leases(service, "b", ttl=30).acquire(key, fence)
    assert lease_b is not None
    await floor.raise_to(key, lease_b)

    with pytest.raises(FencedError):
        await _put(saver, thread, 2)  # still a's tenure
    assert await _latest_events(saver, thread) == 1


async def test_the_floor_only_goes_up(store_client: Redis, settings: Settings) -> None:
    floor = CheckpointFloor(store_client, settings)
    key = f"{settings.stream_prefix}:lease:part:0"
    assert await floor.floor(key) == 0
    assert await floor.raise_to(key, "b|7") == 7
    assert await floor.raise_to(key, "a|3") == 7  # a late, older holder lowers nothing
    assert await floor.raise_to(key, "host:1|x|9") == 9  # owner names may hold "|"
    assert await floor.floor(key) == 9


async def test_writes_outside_a_run_are_not_fenced(
    saver: BaseCheckpointSaver[str], store_client: Redis, settings: Settings
) -> None:
    """Commands (`ctxd rollback`'s fork) write without a partition tenure."""
    thread = f"wf-{uuid.uuid4().hex[:6]}"
    await CheckpointFloor(store_client, settings).raise_to("any", "x|99")
    _TENURE.set(None)
    await _put(saver, thread, 1)
    await _put(saver, thread, 2)
    assert await _latest_events(saver, thread) == 2


def _ownership(
    client: Redis,
    settings: Settings,
    on_acquire: Callable[[str, str], Awaitable[object]],
    changes: list[str],
) -> Ownership:
    """One instance's ownership of 4 partitions, as the ingress builds it (no loops)."""
    availability = RedisAvailability.for_settings(client, settings)
    stopping = anyio.Event()
    holder: list[Ownership] = []
    scheduler = Scheduler(
        client,
        settings,
        ScriptedRunner(),
        lease_of=lambda n: holder[0].value(n),
        reading_allowed=lambda: True,
        availability=availability,
        stopping=stopping,
        rng=random.Random(3),
    )
    ownership = Ownership(
        client,
        settings,
        Leases(client, settings.instance, settings.lease_ttl),
        Heartbeat(client, settings),
        scheduler,
        availability=availability,
        stopping=stopping,
        on_change=lambda: changes.append("read"),
        on_acquire=on_acquire,
    )
    holder.append(ownership)
    return ownership


async def test_ownership_raises_the_floor_before_the_partition_is_read(
    service: Redis, store_client: Redis, settings: Settings
) -> None:
    settings = replace(settings, partitions=4)
    floor = CheckpointFloor(store_client, settings)
    events: list[str] = []

    async def raise_floor(key: str, value: str) -> int:
        events.append("raise")
        return await floor.raise_to(key, value)

    ownership = _ownership(service, settings, raise_floor, events)
    assert await ownership.reconcile() is True
    assert sorted(ownership.owned) == [0, 1, 2, 3]
    # Each partition's floor is raised before its reader is told to start.
    assert events == ["raise", "read"] * 4
    for n, value in ownership.owned.items():
        assert await floor.floor(partition_lease(settings, n)[0]) == lease_token(value)


async def test_partitions_wait_while_the_checkpoint_store_is_away(
    service: Redis, store: OwnRedis, settings: Settings
) -> None:
    """No partition is read (its lease is given back) until its floor could be raised; the
    outage reaches the ownership loop, which waits it out through the process's monitor,
    and the monitor is back only once the store answers too."""
    settings = replace(settings, partitions=4)
    events: list[str] = []
    store.stop()
    try:
        async with contextlib.AsyncExitStack() as stack:
            client = Redis.from_url(store.url, socket_connect_timeout=2)
            stack.push_async_callback(client.aclose)
            floor = CheckpointFloor(client, settings)
            ownership = _ownership(service, settings, floor.raise_to, events)
            with pytest.raises(RedisConnectionError) as raised:
                await ownership.reconcile()
            assert is_outage(raised.value)  # waited out by Ownership.run, not a crash
            assert ownership.owned == {}
            assert events == []  # no reader started
            for n in range(4):  # every lease was given back for the next try
                assert await service.exists(partition_lease(settings, n)[0]) == 0

            availability = RedisAvailability.for_settings(service, settings, also=[client])
            availability.report(raised.value)
            with anyio.move_on_after(1.0):  # the service Redis answers; the store does not
                await availability.wait_available()
            assert not availability.available
            store.start()
            with anyio.fail_after(20):
                await availability.wait_available()
            assert await ownership.reconcile() is True
            assert sorted(ownership.owned) == [0, 1, 2, 3]
    finally:
        if store.process is None:
            store.start()
