"""The partition count recorded in Redis: first record, agreement, refusals, upgrades.

On the session's real Redis (RedisJSON + RediSearch), one prefix per test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import cast

import anyio
import pytest
from actor_support import open_redis
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.input_gate import UNBOUNDED, bound_of
from actors.service.partition_record import (
    PartitionCountError,
    PartitionRecord,
    check_partition_count,
    claim_record,
    read_record,
    record_key,
    routing_open,
    update_record,
)
from actors.service.partitions import partition_of, partition_stream


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Redis]:
    async with open_redis(settings) as redis:
        yield redis


async def test_the_first_instance_records_its_count_with_epoch_1(
    client: Redis, settings: Settings
) -> None:
    assert await read_record(client, settings) is None
    record = await claim_record(client, replace(settings, partitions=16))
    assert record == PartitionRecord(count=16, epoch=1, state="active")
    assert await client.hgetall(record_key(settings)) == {
        b"count": b"16",
        b"epoch": b"1",
        b"state": b"active",
    }


async def test_instances_starting_together_with_different_counts_agree(
    client: Redis, settings: Settings
) -> None:
    """Ten claims at once, half with 16 and half with 32: all read one record back."""
    seen: list[PartitionRecord] = []

    async def claim(count: int) -> None:
        async with open_redis(settings) as own:
            seen.append(await claim_record(own, replace(settings, partitions=count)))

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(claim, 16 if i % 2 else 32)
    assert len(seen) == 10
    assert len(set(seen)) == 1
    assert seen[0].count in (16, 32)
    assert seen[0].epoch == 1


async def test_another_count_refuses_to_start_naming_the_record_and_what_to_do(
    client: Redis, settings: Settings
) -> None:
    await claim_record(client, replace(settings, partitions=16))
    with pytest.raises(PartitionCountError) as refused:
        await check_partition_count(client, replace(settings, partitions=32), poll=0.01)
    line = str(refused.value)
    assert "CTXD_PARTITIONS=32" in line
    assert "16 partitions (epoch 1)" in line
    assert "start with CTXD_PARTITIONS=16" in line
    assert "ctxd partitions resize 32" in line
    same = await check_partition_count(client, replace(settings, partitions=16), poll=0.01)
    assert same.count == 16


async def test_an_instance_with_the_target_count_waits_for_the_resize_to_finish(
    client: Redis, settings: Settings
) -> None:
    record = await claim_record(client, replace(settings, partitions=16))
    assert await update_record(client, settings, record, state="resizing", next=64)
    waiting = anyio.Event()
    got: list[PartitionRecord] = []

    async def start() -> None:
        got.append(
            await check_partition_count(
                client,
                replace(settings, partitions=64),
                poll=0.01,
                on_wait=lambda _: waiting.set(),
            )
        )

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await waiting.wait()
            assert not got
            resizing = await read_record(client, settings)
            assert resizing is not None
            assert await update_record(
                client, settings, resizing, count=64, epoch=2, state="active", next=""
            )
    assert got == [PartitionRecord(count=64, epoch=2)]


async def test_the_record_changes_only_from_the_state_it_was_read_in(
    client: Redis, settings: Settings
) -> None:
    """Two resizes read the same record: only the first compare-and-set wins."""
    record = await claim_record(client, replace(settings, partitions=16))
    assert await update_record(client, settings, record, state="resizing", next=64)
    assert not await update_record(client, settings, record, state="resizing", next=32)
    now = await read_record(client, settings)
    assert now == PartitionRecord(count=16, epoch=1, state="resizing", next=64)


def test_the_movers_bound_follows_the_record_and_the_own_count(settings: Settings) -> None:
    s16 = replace(settings, partitions=16)
    assert bound_of(None, s16) == UNBOUNDED
    assert bound_of(PartitionRecord(16, 1), s16) == UNBOUNDED
    assert bound_of(PartitionRecord(32, 2), s16) is None  # another count: nothing, ever
    assert bound_of(PartitionRecord(16, 1, "resizing", 64), s16) is None
    closed = PartitionRecord(16, 1, "resizing", 64, route_until="5-0", barriers=16)
    assert bound_of(closed, s16) == "5-0"
    assert (
        bound_of(replace(closed, count=64, route_until=None), replace(s16, partitions=64)) is None
    )
    raw: dict[bytes | str, bytes | str] = {"count": "16", "state": "paused", "route_until": ""}
    assert PartitionRecord.from_hash(raw) == PartitionRecord(16, 1, "resizing")  # in doubt: shut


def test_routing_is_open_only_while_the_record_is_active_at_the_own_count(
    settings: Settings,
) -> None:
    s16 = replace(settings, partitions=16)
    assert routing_open(None, s16)
    assert routing_open(PartitionRecord(16, 1), s16)
    assert not routing_open(PartitionRecord(16, 1, "resizing", 64), s16)
    assert not routing_open(PartitionRecord(64, 2), s16)


async def test_waiting_entries_in_old_layout_partitions_refuse_the_first_record(
    client: Redis, settings: Settings
) -> None:
    """A deployment of the layout before hash tags ({prefix}:part:<n>) with entries
    unprocessed: this version would never read them, so it does not start."""
    p = settings.stream_prefix
    for n in range(16):
        await client.xgroup_create(f"{p}:part:{n}", settings.group, id="$", mkstream=True)
    await client.xadd(f"{p}:part:3", {"workflow_id": "wf", "event_id": "e", "content": "x"})
    with pytest.raises(PartitionCountError) as refused:
        await claim_record(client, replace(settings, partitions=64))
    assert "1 entries wait" in str(refused.value)
    assert f"{p}:part:15, 16 partitions" in str(refused.value)
    assert await read_record(client, settings) is None
    # Processed (read and acknowledged): nothing waits, the new count is recorded.
    [(_, [(entry_id, _)])] = cast(
        list[tuple[bytes, list[tuple[bytes, object]]]],
        await client.xreadgroup(settings.group, "owner", {f"{p}:part:3": ">"}),
    )
    await client.xack(f"{p}:part:3", settings.group, entry_id)
    record = await claim_record(client, replace(settings, partitions=64))
    assert record.count == 64


async def test_waiting_entries_hashed_onto_another_count_refuse_the_first_record(
    client: Redis, settings: Settings
) -> None:
    """Partition streams of this layout but no record (a run before the record existed):
    entries that sit where another count put them are refused, naming a count they all
    fit; entries that sit where the configured count puts them are fine."""
    s16, s64 = replace(settings, partitions=16), replace(settings, partitions=64)
    workflows = [f"wf-{i}" for i in range(40)]
    moved = next(wf for wf in workflows if partition_of(wf, 16) != partition_of(wf, 64))
    for wf in workflows:
        await client.xadd(partition_stream(settings, partition_of(wf, 16)), {"workflow_id": wf})
    with pytest.raises(PartitionCountError) as refused:
        await claim_record(client, s64)
    assert "hashed onto another count" in str(refused.value)
    assert "start with CTXD_PARTITIONS=16" in str(refused.value)
    assert await read_record(client, settings) is None
    record = await claim_record(client, s16)
    assert record == PartitionRecord(16, 1)
    assert moved


async def test_waiting_entries_where_the_configured_count_puts_them_are_fine(
    client: Redis, settings: Settings
) -> None:
    """Only partition 0's stream exists (say, a producer wrote there for a 2-partition
    deployment): its entry hashes to 0 under 2, so 2 is recorded."""
    s2 = replace(settings, partitions=2)
    wf = next(f"wf-{i}" for i in range(100) if partition_of(f"wf-{i}", 2) == 0)
    await client.xadd(partition_stream(settings, 0), {"workflow_id": wf})
    assert await claim_record(client, s2) == PartitionRecord(2, 1)
