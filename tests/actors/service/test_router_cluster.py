"""Owners route their partitions on a real Redis Cluster (3 masters on loopback): every
script's keys are in one partition's slot, so routing runs there at all; the entries
reach their partitions in order, spread over the masters, an invalid one reaches
partition 0's own DLQ, and ``ctxd:in`` is trimmed to the lowest cursor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import anyio
import pytest
from cluster_support import three_masters
from redis.asyncio.cluster import RedisCluster

from actors.config import Settings
from actors.runtime.redis_io import text
from actors.service.gateway import move_home
from actors.service.input_routing import SOURCE_FIELD, cursor_key
from actors.service.lease import Leases
from actors.service.partitions import (
    dlq_stream_of,
    partition_key,
    partition_lease,
    partition_of,
    partition_stream,
)
from actors.service.router import PartitionRouter
from graph.errors import FencedError

pytestmark = pytest.mark.slow

WITHIN = 10.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    """Three masters, the slots split evenly; stopped by pid afterwards."""
    with three_masters(tmp_path) as ports:
        yield ports


@pytest.fixture
async def client(cluster: list[int]) -> AsyncIterator[RedisCluster]:
    redis = RedisCluster(host="127.0.0.1", port=cluster[0])
    await redis.initialize()
    try:
        yield redis
    finally:
        await redis.aclose()


async def _routed(client: RedisCluster, s: Settings, sent: dict[int, list[str]]) -> bool:
    """Whether every sent entry is in its partition and the invalid one in the DLQ."""
    for n, ids in sent.items():
        if await client.xlen(partition_stream(s, n)) < len(ids):
            return False
    return bool(await client.xlen(dlq_stream_of(s, 0)))


async def _sources(client: RedisCluster, stream: str, field: bytes) -> list[str]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream))
    return [fields[field].decode() for _, fields in entries]


async def test_routing_runs_on_a_cluster_in_order_over_every_master(
    client: RedisCluster, settings: Settings, cluster: list[int]
) -> None:
    s = replace(settings, partitions=8, cluster=True, trim_interval=0.05)
    sent: dict[int, list[str]] = {}
    for i in range(40):
        workflow_id = f"wf-{i % 10}"
        added = await client.xadd(s.input_stream, {"workflow_id": workflow_id, "content": str(i)})
        sent.setdefault(partition_of(workflow_id, s.partitions), []).append(text(added))
    bad = text(await client.xadd(s.input_stream, {"content": "no workflow"}))
    leases = Leases(client, s.instance, 30.0)  # type: ignore[arg-type]
    owned: dict[int, str] = {}
    for n in range(s.partitions):
        value = await leases.acquire(*partition_lease(s, n))
        assert value is not None
        owned[n] = value
    router = PartitionRouter(client, s, lambda: owned)  # type: ignore[arg-type]
    stopping = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run, stopping)
        with anyio.fail_after(WITHIN):
            # What routing wrote is seen in Redis only: look every 50 ms.
            while not await _routed(client, s, sent):  # noqa: ASYNC110
                await anyio.sleep(0.05)
            # Trimmed to the lowest cursor once every idle cursor is written (<= 1 s).
            while await client.xlen(s.input_stream) > 1:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        stopping.set()
    source = SOURCE_FIELD.encode()
    assert {n: await _sources(client, partition_stream(s, n), source) for n in sent} == sent
    assert await _sources(client, dlq_stream_of(s, 0), b"source_id") == [bad]
    assert dlq_stream_of(s, 0).endswith("{p0}:dlq")
    nodes = [client.get_node_from_key(cursor_key(s, n)) for n in sent]
    assert {node.port for node in nodes if node is not None} == set(cluster)  # every master


async def test_an_entry_is_moved_home_across_slots_once_and_fenced(
    client: RedisCluster, settings: Settings
) -> None:
    """An entry in a partition its workflow does not hash to (a producer with an old
    count) is moved between two slots on a cluster: appended once however often the move
    is retried, acknowledged only under the source partition's lease."""
    s = replace(settings, partitions=8, cluster=True)
    source, home = 1, 6
    stream = partition_stream(s, source)
    await client.xgroup_create(stream, s.group, id="0", mkstream=True)
    entry_id = text(await client.xadd(stream, {"workflow_id": "w", "content": "x"}))
    await client.xreadgroup(s.group, "owner", {stream: ">"})
    leases = Leases(client, s.instance, 30.0)  # type: ignore[arg-type]
    value = await leases.acquire(*partition_lease(s, source))
    assert value is not None
    fields = {b"workflow_id": b"w", b"content": b"x"}
    move = {
        "stream": stream,
        "group": s.group,
        "entry_id": entry_id,
        "target": partition_stream(s, home),
        "fields": fields,
        "marker": partition_key(s, home, "moved", f"{source}/{entry_id}"),
        "marker_ttl": 60,
    }
    with pytest.raises(FencedError):  # a zombie: appended (once), not acknowledged
        await move_home(client, lease=(partition_lease(s, source)[0], "zombie|1"), **move)  # type: ignore[arg-type]
    assert (await client.xpending(stream, s.group))["pending"] == 1
    for _ in range(2):  # the owner, and a retry of it
        await move_home(client, lease=(partition_lease(s, source)[0], value), **move)  # type: ignore[arg-type]
    assert await _sources(client, partition_stream(s, home), b"content") == ["x"]
    assert (await client.xpending(stream, s.group))["pending"] == 0
