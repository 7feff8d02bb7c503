"""The resize procedure's steps on the real Redis, in process (no instances running):
what it refuses, and that routing stays paused until no instance runs the old count."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
import pytest
from actor_support import open_redis
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.heartbeat import instance_key, instances_key
from actors.service.input_routing import barrier_key
from actors.service.partition_record import (
    PartitionRecord,
    claim_record,
    read_record,
    routing_open,
)
from actors.service.partitions import partition_lease
from actors.service.resize import ResizeError, ResizeProgress, resize_partitions
from actors.service.streams import done_key


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Redis]:
    async with open_redis(settings) as redis:
        yield redis


async def beat(redis: Redis, settings: Settings, name: str, count: int) -> None:
    """A live instance's heartbeat, as the ingress publishes it."""
    await redis.set(instance_key(settings, name), json.dumps({"partition_count": count}))
    await redis.zadd(instances_key(settings), {name: time.time() * 1000})


async def test_routing_stays_paused_until_no_instance_runs_the_old_count(
    client: Redis, settings: Settings
) -> None:
    s4 = replace(settings, partitions=4)
    await claim_record(client, s4)
    await beat(client, settings, "old", 4)
    await beat(client, settings, "new", 8)
    switching = anyio.Event()
    steps: list[str] = []

    def progress(p: ResizeProgress) -> None:
        steps.append(p.step)
        if p.step == "switching":
            assert p.old_instances == 1
            switching.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: resize_partitions(client, s4, 8, progress=progress, drain_timeout=20)
            )
            await switching.wait()
            flipped = await read_record(client, settings)
            assert flipped == PartitionRecord(
                count=8, epoch=2, state="resizing", next=8, barriers=4
            )
            assert not routing_open(flipped, replace(settings, partitions=8))
            await client.delete(instance_key(settings, "old"))  # it stopped
    assert await read_record(client, settings) == PartitionRecord(count=8, epoch=2)
    assert steps[-1] == "done"


async def test_dedupe_keys_follow_their_workflows_to_the_new_partitions(
    client: Redis, settings: Settings
) -> None:
    s4, s8 = replace(settings, partitions=4), replace(settings, partitions=8)
    await claim_record(client, s4)
    workflows = [f"wf-{i}" for i in range(20)]
    for wf in workflows:
        await client.set(done_key(s4, wf, "e1"), "1-1", ex=3600)
    await resize_partitions(client, s4, 8, progress=lambda p: None, drain_timeout=20)
    for wf in workflows:
        assert await client.get(done_key(s8, wf, "e1")) == b"1-1"
        assert 3500 < await client.ttl(done_key(s8, wf, "e1")) <= 3600


async def test_a_resize_is_refused_while_workflows_have_parked_events(
    client: Redis, settings: Settings
) -> None:
    await claim_record(client, replace(settings, partitions=4))
    await client.xadd(f"{settings.stream_prefix}:{{p1}}:parked:wf", {"content": "x"})
    with pytest.raises(ResizeError, match="1 events are parked"):
        await resize_partitions(
            client, replace(settings, partitions=4), 8, progress=lambda p: None, drain_timeout=5
        )
    assert await read_record(client, settings) == PartitionRecord(count=4, epoch=1)


async def test_another_resize_in_progress_is_named_with_how_to_finish_or_undo_it(
    client: Redis, settings: Settings
) -> None:
    s4 = replace(settings, partitions=4)
    record = await claim_record(client, s4)
    await client.hset(
        f"{settings.stream_prefix}:partitions", mapping={"state": "resizing", "next": 16}
    )
    with pytest.raises(ResizeError) as refused:
        await resize_partitions(client, s4, 8, progress=lambda p: None, drain_timeout=5)
    assert "a resize to 16 is in progress" in str(refused.value)
    assert "ctxd partitions abort" in str(refused.value)
    assert record.count == 4


async def test_moving_resumes_only_once_no_old_partition_lease_is_held_by_an_old_owner(
    client: Redis, settings: Settings
) -> None:
    """An old partition's lease still held by an instance whose heartbeat lapsed (a
    paused process): the barriers stay, and the record stays resizing, until it is gone."""
    s4 = replace(settings, partitions=4)
    await claim_record(client, s4)
    await beat(client, settings, "new", 8)
    await client.set(partition_lease(s4, 2)[0], "paused|17", px=60_000)
    await client.set(partition_lease(s4, 3)[0], "new|18", px=60_000)  # taken over: fine
    switching = anyio.Event()

    def progress(p: ResizeProgress) -> None:
        if p.step == "switching":
            assert p.old_instances == 1
            switching.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: resize_partitions(client, s4, 8, progress=progress, drain_timeout=20)
            )
            await switching.wait()
            assert await client.exists(barrier_key(s4, 2))
            assert (await read_record(client, settings)).state == "resizing"  # type: ignore[union-attr]
            await client.delete(partition_lease(s4, 2)[0])  # it expired
    assert await read_record(client, settings) == PartitionRecord(count=8, epoch=2)
    assert not await client.exists(barrier_key(s4, 2))
