"""The stream service's Redis work on a real Redis Cluster: nothing may span slots.

Each test holds one place that used to fail on a cluster with ``CROSSSLOT`` or redis-py's
refusal of ``EVALSHA`` in a cluster pipeline: the heartbeat's ``MULTI``, the pipelined
lease renewals, a pool's answer (reply stream and mailbox in one script) and an actor
request's dead letter (mailbox and ``ctxd:dlq`` in one script).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import cast

import anyio
import pytest
from actor_support import RawEntries, RawRead, actor_settings, running
from cluster_helpers import LocalCluster
from redis.asyncio import Redis
from redis.crc import key_slot

from actors.config import Settings
from actors.runtime.mailbox import ActorReply, ActorRequest, mailbox_stream
from actors.runtime.redis_io import text, wait_aof
from actors.service.connections import open_service_client
from actors.service.heartbeat import Heartbeat
from actors.service.lease import Leases
from actors.service.partitions import partition_key, partition_lease
from actors.service.tree import ActorSystem
from graph.state import JSON
from graph.work import WorkHandlers

pytestmark = pytest.mark.slow

WINDOW: dict[str, JSON] = {"workflow_id": "w", "window": ["checkout latency rose after the deploy"]}


@pytest.fixture
def cluster_settings(settings: Settings, redis_cluster: LocalCluster) -> Settings:
    """The test's settings on the local cluster (``cluster=True``, as detection sets it)."""
    return replace(settings, redis_url=redis_cluster.url, cluster=True)


@contextlib.asynccontextmanager
async def cluster_client(settings: Settings) -> AsyncIterator[Redis]:
    """The service's own client for ``settings`` (redis-py's cluster client)."""
    assert settings.redis_url is not None
    redis = open_service_client(settings.redis_url, settings, 32)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_heartbeat_on_a_cluster(cluster_settings: Settings) -> None:
    """A beat writes the instance's record and the live set (two slots) and lists it."""
    async with cluster_client(cluster_settings) as redis:
        beat = Heartbeat(redis, cluster_settings)
        assert await beat.beat({"partitions": 3}) == [cluster_settings.instance]
        other = Heartbeat(redis, replace(cluster_settings, instance="peer"))
        assert await other.beat({}) == sorted([cluster_settings.instance, "peer"])
        await other.remove()
        assert await beat.beat({}) == [cluster_settings.instance]


async def test_lease_renewals_on_a_cluster(cluster_settings: Settings) -> None:
    """Renewing many partition leases (many slots, every master) in one call works, and
    a lease another instance took since is reported lost."""
    async with cluster_client(cluster_settings) as redis:
        mine, theirs = Leases(redis, "me", 10.0), Leases(redis, "them", 10.0)
        held = []
        for n in range(16):
            key, fence = partition_lease(cluster_settings, n)
            value = await mine.acquire(key, fence)
            assert value is not None
            held.append((key, value))
        assert await mine.renew_many(held) == [True] * 16
        key, fence = partition_lease(cluster_settings, 7)
        await redis.delete(key)  # expired, say
        assert await theirs.acquire(key, fence) is not None
        renewed = await mine.renew_many(held)
    assert renewed == [n != 7 for n in range(16)]


async def test_actor_ask_is_answered_on_a_cluster(cluster_settings: Settings) -> None:
    """A worker answers on the asker's reply stream (another slot than the mailbox) and
    the request leaves the mailbox: acknowledged and deleted."""
    settings = actor_settings(cluster_settings, actor_workers=1)
    mailbox = mailbox_stream(settings, "analysis")
    async with cluster_client(settings) as redis:
        system = ActorSystem(redis, settings, WorkHandlers())
        async with running(system):
            assert system.mailbox is not None
            assert key_slot(system.mailbox.reply_stream.encode()) != key_slot(mailbox.encode())
            reply = await system.mailbox.ask_reply("analysis", WINDOW, 10.0)
        pending = await redis.xpending(mailbox, settings.group)
        left = await redis.xlen(mailbox)
    assert reply.ok, reply.body
    assert pending["pending"] == 0
    assert left == 0


async def test_poison_request_is_dead_lettered_on_a_cluster(cluster_settings: Settings) -> None:
    """A request delivered too often goes to ``ctxd:dlq`` (another slot than its mailbox),
    once, is acknowledged, and its asker gets the error."""
    settings = actor_settings(cluster_settings, ask_timeout=0.1)
    stream = mailbox_stream(settings, "decision")
    reply_to = f"{settings.stream_prefix}:test-replies"
    assert key_slot(stream.encode()) != key_slot(settings.dlq_stream.encode())
    async with cluster_client(settings) as redis:
        await redis.xgroup_create(stream, settings.group, id="0", mkstream=True)
        request = ActorRequest("poison-1", "decision", json.dumps({"context": {}}), reply_to,
                               time.time() + 600)  # fmt: skip
        entry_id = text(await redis.xadd(stream, request.to_fields()))  # type: ignore[arg-type]
        await redis.xreadgroup(settings.group, "ghost", {stream: ">"}, count=1)
        for _ in range(4):
            await redis.xclaim(stream, settings.group, "ghost", 0, [entry_id])
        system = ActorSystem(redis, settings, WorkHandlers(), ask=False)
        async with running(system):
            with anyio.fail_after(20):
                got = cast(RawRead, await redis.xread({reply_to: "0-0"}, block=15000, count=1))
        dlq = cast(RawEntries, await redis.xrange(settings.dlq_stream))
        pending = await redis.xpending(stream, settings.group)
    reply = ActorReply.from_fields({text(k): text(v) for k, v in got[0][1][0][1].items()})
    assert (reply.id, reply.ok) == ("poison-1", False)
    assert len(dlq) == 1
    fields = {text(k): text(v) for k, v in dlq[0][1].items()}
    assert (fields["reason"], fields["source_id"]) == ("poison", entry_id)
    assert pending["pending"] == 0


async def test_wait_aof_goes_to_the_master_of_the_written_key(
    cluster_settings: Settings, redis_cluster: LocalCluster
) -> None:
    """``CTXD_WAIT_AOF``'s WAITAOF is answered by the master that took the commit: with the
    AOF off on every other master (where WAITAOF is an error), it still succeeds, for a
    partition on each master."""
    masters = redis_cluster.masters()
    by_master: dict[int, str] = {}
    for n in range(64):
        key = partition_key(cluster_settings, n, "out")
        by_master.setdefault(redis_cluster.master_of_slot(key_slot(key.encode())).port, key)
    assert len(by_master) == 3
    async with cluster_client(cluster_settings) as redis:
        for port, key in by_master.items():
            others = [m for m in masters if m.port != port]
            for node in others:
                with node.client() as client:
                    client.config_set("appendonly", "no")
            try:
                await redis.set(key, "committed")
                await wait_aof(redis, key, 2000)
            finally:
                for node in others:
                    with node.client() as client:
                        client.config_set("appendonly", "yes")


def _getkeys_calls(cluster: LocalCluster) -> int:
    total = 0
    for node in cluster.live():
        with node.client() as client:
            stats = client.info("commandstats")
        total += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
    return total


async def test_stream_reads_cost_no_getkeys_round_trip(
    cluster_settings: Settings, redis_cluster: LocalCluster
) -> None:
    """XREAD and XREADGROUP on partition streams of every master are sent straight to
    the right node: redis-py would first ask a server ``COMMAND GETKEYS`` each time."""
    streams = [partition_key(cluster_settings, n, "stream") for n in range(8)]
    async with cluster_client(cluster_settings) as redis:
        for stream in streams:
            await redis.xadd(stream, {"n": stream})
            await redis.xgroup_create(stream, "g", id="0")
        before = _getkeys_calls(redis_cluster)
        for stream in streams:
            read = cast(RawRead, await redis.xread({stream: "0-0"}, count=10, block=100))
            grouped = cast(
                RawRead, await redis.xreadgroup("g", "STREAMS", {stream: ">"}, count=10, block=100)
            )
            assert read[0][1][0][1] == {b"n": stream.encode()}
            assert grouped[0][1][0][1] == {b"n": stream.encode()}
        assert _getkeys_calls(redis_cluster) == before
