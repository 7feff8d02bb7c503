"""The producer API on the real Redis: the service's hash, the partition record decides
between a partition stream and ``ctxd:in``, the service's own field is never taken from
a producer. (A running service processing such entries: test_routing_failover.py.)"""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator
from typing import cast

import pytest
from actor_support import TextEntries, open_redis
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from actors.config import Settings
from actors.producer import (
    AsyncProducer,
    Producer,
    partition_barrier_name,
    partition_for,
    partition_stream_name,
)
from actors.service.input_gate import partitions_record_key
from actors.service.input_routing import barrier_key
from actors.service.partitions import partition_of, partition_stream


def test_the_hash_and_the_stream_name_are_the_services() -> None:
    rng = random.Random(14)
    alphabet = string.ascii_letters + string.digits + "_.:-"
    for _ in range(2000):
        workflow_id = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
        count = rng.choice((1, 7, 16, 64, 128, 1024))
        assert partition_for(workflow_id, count) == partition_of(workflow_id, count)
    settings = Settings(stream_prefix="acme")
    assert [partition_stream_name("acme", n) for n in range(70)] == [
        partition_stream(settings, n) for n in range(70)
    ]
    assert partition_stream_name("ctxd", 7) == "ctxd:{p7}:stream"
    assert [partition_barrier_name("acme", n) for n in range(70)] == [
        barrier_key(settings, n) for n in range(70)
    ]


def _fields(redis: SyncRedis, stream: str, entry_id: str) -> dict[str, str]:
    return cast(TextEntries, redis.xrange(stream, entry_id, entry_id))[0][1]


def test_where_events_go_follows_the_partition_record(redis: SyncRedis, prefix: str) -> None:
    producer = Producer(redis, prefix=prefix)
    assert producer.send("wf-1", "no record yet").stream == f"{prefix}:in"
    record = partitions_record_key(prefix)
    redis.hset(record, mapping={"count": 8, "epoch": 1, "state": "active"})
    sent = producer.send("wf-1", "recorded", event_id="e1", metadata={"k": 1})
    n = partition_for("wf-1", 8)  # the recorded count, whatever the producer's settings
    assert (sent.stream, sent.partition) == (f"{prefix}:{{p{n}}}:stream", n)
    entry = _fields(redis, sent.stream, sent.entry_id)
    assert entry == {
        "workflow_id": "wf-1",
        "content": "recorded",
        "event_id": "e1",
        "metadata": '{"k": 1}',
    }
    forged = producer.send_fields({"workflow_id": "wf-1", "content": "x", "ctxd_source_id": "1-1"})
    assert "ctxd_source_id" not in _fields(redis, forged.stream, forged.entry_id)
    assert producer.send("bad id!", "x").stream == f"{prefix}:in"  # partition 0 dead-letters it
    assert producer.send("wf-1", "forced", via_input=True).stream == f"{prefix}:in"
    redis.hset(record, "state", "resizing")
    assert producer.send("wf-1", "during a resize").stream == f"{prefix}:in"
    cached = Producer(redis, prefix=prefix, record_ttl=3600)
    redis.hset(record, "state", "active")
    assert cached.send("wf-1", "read once").partition == n
    redis.hset(record, "state", "resizing")
    assert cached.send("wf-1", "stale on purpose").partition == n  # the documented trade-off


def test_a_partition_held_by_a_resize_turns_the_event_to_the_input(
    redis: SyncRedis, prefix: str
) -> None:
    """The record said active when read, but a resize has begun since and set the
    partition's barrier (before checking the partition drained): the append is turned
    away in the partition's slot and the event goes to ``ctxd:in``, not lost."""
    redis.hset(partitions_record_key(prefix), mapping={"count": 8, "epoch": 1, "state": "active"})
    cached = Producer(redis, prefix=prefix, record_ttl=3600)
    n = partition_for("wf-3", 8)
    assert cached.send("wf-3", "before").partition == n
    redis.set(partition_barrier_name(prefix, n), "0-0")
    held = cached.send("wf-3", "during", event_id="e2")
    assert (held.stream, held.partition) == (f"{prefix}:in", None)
    assert _fields(redis, held.stream, held.entry_id)["event_id"] == "e2"
    assert redis.xlen(partition_stream_name(prefix, n)) == 1
    redis.delete(partition_barrier_name(prefix, n))
    assert cached.send("wf-3", "after").partition == n


@pytest.fixture
async def aredis(settings: Settings) -> AsyncIterator[Redis]:
    async with open_redis(settings) as client:
        yield client


async def test_the_asyncio_producer_does_the_same(aredis: Redis, prefix: str) -> None:
    producer = AsyncProducer(aredis, prefix=prefix)
    assert (await producer.send("wf-2", "x")).stream == f"{prefix}:in"
    await aredis.hset(partitions_record_key(prefix), mapping={"count": 16, "state": "active"})
    sent = await producer.send("wf-2", "y", priority="high")
    assert sent.partition == partition_for("wf-2", 16)
    assert sent.stream == partition_stream_name(prefix, partition_for("wf-2", 16))
    await aredis.set(partition_barrier_name(prefix, partition_for("wf-2", 16)), "0-0")
    assert (await producer.send("wf-2", "z")).stream == f"{prefix}:in"  # a resize holds it
