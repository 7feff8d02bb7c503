"""``actors.results``: an application's consumer group over every output stream, and the
per-partition retention of outputs and dead letters on the cluster layout (one real
Redis; the layout is only names)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from actors.config import Settings
from actors.results import (
    ResultConsumer,
    dead_letter_streams,
    output_streams,
    partitions_record_key,
)
from actors.service.partitions import dlq_stream_of, output_stream_of, workflow_partition
from actors.service.streams import trim_bounded_streams
from actors.testing import FakeClock


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def cluster_settings(settings: Settings) -> Settings:
    return replace(settings, cluster=True, partitions=4)


def _workflows(settings: Settings, count: int) -> list[str]:
    """``count`` workflow ids spread over every partition."""
    found: dict[int, list[str]] = {}
    i = 0
    while sum(len(v) for v in found.values()) < count:
        wf = f"wf-{i}"
        n = workflow_partition(settings, wf)
        if len(found.get(n, [])) < -(-count // settings.partitions):
            found.setdefault(n, []).append(wf)
        i += 1
    return [wf for wfs in found.values() for wf in wfs]


async def _commit(aredis: Redis, settings: Settings, wf: str, event: str) -> str:
    stream = output_stream_of(settings, workflow_partition(settings, wf))
    return str(await aredis.xadd(stream, {"workflow_id": wf, "event_id": event}))


def test_stream_sets_of_both_layouts(settings: Settings) -> None:
    """One node: ctxd:out and ctxd:dlq. Cluster: one of each per partition, plus the
    shared ctxd:dlq (dead letters of no partition); a larger recorded count is covered."""
    assert output_streams(settings) == [settings.output_stream]
    assert dead_letter_streams(settings) == [settings.dlq_stream]
    clustered = replace(settings, cluster=True, partitions=3)
    p = settings.stream_prefix
    assert output_streams(clustered) == [f"{p}:{{p0}}:out", f"{p}:{{p1}}:out", f"{p}:{{p2}}:out"]
    assert dead_letter_streams(clustered, 4)[-2:] == [f"{p}:{{p3}}:dlq", f"{p}:dlq"]


@pytest.mark.parametrize("per_stream", [False, True], ids=["one-command", "per-stream"])
async def test_consumer_group_reads_every_partition_once_and_resumes_its_pending(
    aredis: Redis, cluster_settings: Settings, per_stream: bool
) -> None:
    """Two consumers of one group share the results of all partitions, each result to
    one of them, each workflow's in commit order; a consumer that stops before
    acknowledging gets its pending results first when it comes back under its name."""
    s = cluster_settings
    wfs = _workflows(s, 8)
    written = [(wfs[i % 8], f"e{i}") for i in range(40)]
    for wf, event in written:
        await _commit(aredis, s, wf, event)

    def consumer(name: str) -> ResultConsumer:
        return ResultConsumer(aredis, s, group="app", consumer=name, count=7, per_stream=per_stream)

    first, second = consumer("a"), consumer("b")
    got_a = await first.read(block_ms=0)
    assert len(first.streams) == 4
    got_b: list[tuple[str, str]] = []
    while batch := await second.read(block_ms=0):
        got_b += [(r.workflow_id, r.event_id) for r in batch]
        await second.ack(batch)
    seen = [(r.workflow_id, r.event_id) for r in got_a] + got_b
    assert sorted(seen) == sorted(written)  # each result once over the two consumers
    for wf in wfs:  # each workflow's results in commit order
        mine = [e for w, e in got_b if w == wf]
        assert mine == [e for w, e in written if w == wf and e in mine]

    # "a" never acknowledged: back under its name, it gets exactly those again, first.
    again = consumer("a")
    pending = await again.read(block_ms=0)
    assert [(r.stream, r.entry_id) for r in pending] == [(r.stream, r.entry_id) for r in got_a]
    assert await again.ack(pending) == len(pending)
    assert await again.read(block_ms=0) == []

    # New results arrive in any partition: a waiting read returns them.
    late = await _commit(aredis, s, wfs[5], "late")
    fresh = await again.read(block_ms=2000)
    assert [(r.workflow_id, r.entry_id) for r in fresh] == [(wfs[5], late)]


async def test_consumer_joins_streams_of_a_larger_recorded_count(
    aredis: Redis, cluster_settings: Settings
) -> None:
    """A resize to more partitions (the record says so) adds their streams on the next
    refresh, without a restart; results cut by retention before they were read are
    acknowledged and not returned."""
    s = cluster_settings
    clock = FakeClock()
    reader = ResultConsumer(
        aredis, s, group="app", consumer="a", refresh_interval=5.0, clock=clock, per_stream=True
    )
    assert await reader.read(block_ms=0) == []
    assert len(reader.streams) == 4
    await aredis.hset(partitions_record_key(s), mapping={"count": "4", "next": "6"})
    new_stream = output_stream_of(s, 5)
    await aredis.xadd(new_stream, {"workflow_id": "w", "event_id": "e"})
    assert await reader.read(block_ms=0) == []  # not refreshed yet
    clock.advance(5.0)
    got = await reader.read(block_ms=0)
    assert [(r.stream, r.event_id) for r in got] == [(new_stream, "e")]
    assert len(reader.streams) == 6
    await reader.ack(got)

    # Read (pending), then trimmed away before the consumer acknowledged it.
    await aredis.xadd(new_stream, {"workflow_id": "w", "event_id": "gone"})
    assert [r.event_id for r in await reader.read(block_ms=0)] == ["gone"]
    await aredis.xtrim(new_stream, maxlen=0)
    back = ResultConsumer(aredis, s, group="app", consumer="a", per_stream=True)
    assert await back.read(block_ms=0) == []
    summary = await aredis.xpending(new_stream, "app")
    assert summary["pending"] == 0  # "gone" was acknowledged for it


async def test_single_node_consumer_reads_ctxd_out(aredis: Redis, settings: Settings) -> None:
    """Without the cluster layout the same consumer reads the one ``ctxd:out``."""
    await aredis.xadd(settings.output_stream, {"workflow_id": "w", "event_id": "e1"})
    reader = ResultConsumer(aredis, settings, group="app", consumer="a")
    got = await reader.read(block_ms=0)
    assert [(r.stream, r.event_id) for r in got] == [(settings.output_stream, "e1")]
    assert await reader.ack(got) == 1


async def test_cluster_layout_trims_each_partition_to_its_share(
    aredis: Redis, cluster_settings: Settings
) -> None:
    """On a cluster each output stream and DLQ keeps ``ceil(maxlen / partitions)``
    entries (plus at most one macro node of 100); an owner trims only its partitions,
    partition 0's owner the shared DLQ too."""
    s = replace(cluster_settings, output_maxlen=400, dlq_maxlen=800)  # shares 100 and 200
    for n in range(4):
        pipe = aredis.pipeline(transaction=False)
        for _ in range(600):
            pipe.xadd(output_stream_of(s, n), {"a": "b"})
            pipe.xadd(dlq_stream_of(s, n), {"a": "b"})
        await pipe.execute()
    pipe = aredis.pipeline(transaction=False)
    for _ in range(600):
        pipe.xadd(s.dlq_stream, {"a": "b"})
    await pipe.execute()

    assert await trim_bounded_streams(aredis, s, partitions=[1]) > 0
    assert 100 <= await aredis.xlen(output_stream_of(s, 1)) <= 200
    assert 200 <= await aredis.xlen(dlq_stream_of(s, 1)) <= 300
    assert await aredis.xlen(output_stream_of(s, 2)) == 600  # not this owner's
    assert await aredis.xlen(s.dlq_stream) == 600

    assert await trim_bounded_streams(aredis, s) > 0  # every partition, and ctxd:dlq
    for n in range(4):
        assert 100 <= await aredis.xlen(output_stream_of(s, n)) <= 200
    assert 200 <= await aredis.xlen(s.dlq_stream) <= 300
