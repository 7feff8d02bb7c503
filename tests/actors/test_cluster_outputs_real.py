"""Reading results and dead letters across slots on a real Redis Cluster (3 masters with
replicas, tests/cluster_helpers.py): ``ctxd tail``, ``ctxd dlq list|replay`` and
``ctxd status`` through the command's own client (the cluster is detected), a follow
across slots, and an application's :class:`actors.results.ResultConsumer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import cast

import pytest
from actor_support import TextEntries
from cluster_helpers import LocalCluster
from redis import Redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from actors.app.cli import build_parser
from actors.app.cli.merged import Follower
from actors.config import Settings
from actors.results import ResultConsumer, dead_letter_streams, output_streams
from actors.service.partitions import dlq_stream_of, output_stream_of, workflow_partition

pytestmark = pytest.mark.slow


@pytest.fixture
def on_cluster(redis_cluster: LocalCluster, settings: Settings) -> Settings:
    """Settings naming the cluster by a plain URL (not yet known as a cluster: the
    commands find out) with 8 partitions, spread over the 3 masters."""
    return replace(settings, redis_url=redis_cluster.url, cluster=False, partitions=8)


@pytest.fixture
def cluster_client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield client
    client.close()


def _run(settings: Settings, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(args.handler(settings, args))


def _workflows(settings: Settings) -> list[str]:
    """One workflow per partition."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < settings.partitions:
        found.setdefault(workflow_partition(settings, f"wf-{i}"), f"wf-{i}")
        i += 1
    return [found[n] for n in sorted(found)]


def _masters_holding(redis_cluster: LocalCluster, client: RedisCluster, keys: list[str]) -> int:
    slots = {int(client.keyslot(key)) for key in keys}  # type: ignore[no-untyped-call]
    return len({redis_cluster.master_of_slot(slot).port for slot in slots})


def test_tail_dlq_and_status_read_across_slots(
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    on_cluster: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    layout = replace(on_cluster, cluster=True)
    wfs = _workflows(layout)
    assert _masters_holding(redis_cluster, cluster_client, output_streams(layout)) == 3
    written = [(wfs[i % 8], f"e{i}") for i in range(24)]
    for wf, event in written:
        stream = output_stream_of(layout, workflow_partition(layout, wf))
        cluster_client.xadd(stream, {"workflow_id": wf, "event_id": event, "route": "[]"})

    assert _run(on_cluster, "tail", "--json", "--last", "24") == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["workflow_id"], r["event_id"]) for r in shown) == sorted(written)
    for wf in wfs:  # each workflow's results in commit order
        assert [r["event_id"] for r in shown if r["workflow_id"] == wf] == [
            e for w, e in written if w == wf
        ]

    # A follow on the cluster client reads per stream, across the three masters. The
    # command's client is typed Redis (actors/app/cli/common.py casts it the same way).
    cursors = {
        s: str(cluster_client.xinfo_stream(s)["last-generated-id"]) for s in output_streams(layout)
    }
    follower = Follower(cast(Redis, cluster_client), cursors)
    for wf in wfs:
        stream = output_stream_of(layout, workflow_partition(layout, wf))
        cluster_client.xadd(stream, {"workflow_id": wf, "event_id": "new"})
    got: list[str] = []
    while len(got) < len(wfs):
        batch = follower.read(block_ms=5000)
        assert batch, f"nothing new after {got}"
        got += [r.workflow_id for r in batch]
    assert sorted(got) == sorted(wfs)

    dead = []
    for n in (1, 4, 6):
        dead.append(
            (
                dlq_stream_of(layout, n),
                str(
                    cluster_client.xadd(
                        dlq_stream_of(layout, n),
                        {"workflow_id": wfs[n], "content": "x", "reason": "poison"},
                    )
                ),
            )
        )
    assert _masters_holding(redis_cluster, cluster_client, [s for s, _ in dead]) >= 2
    assert _run(on_cluster, "dlq", "list", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["dlq"], r["id"]) for r in rows) == sorted(dead)

    assert _run(on_cluster, "status", "--json", "--scan-limit", "0") == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["output_length"], doc["dlq_size"]) == (24 + 8, 3)

    assert _run(on_cluster, "dlq", "replay", "--all") == 0
    replayed = cast(TextEntries, cluster_client.xrange(layout.input_stream))
    assert sorted(f["workflow_id"] for _, f in replayed) == sorted(wfs[n] for n in (1, 4, 6))
    assert all(cluster_client.xlen(s) == 0 for s in dead_letter_streams(layout))


async def test_result_consumer_on_the_cluster(
    redis_cluster: LocalCluster, cluster_client: RedisCluster, on_cluster: Settings
) -> None:
    """One consumer group over the 8 partitions' output streams on 3 masters: every
    result once, each workflow's in order, nothing left pending after the acks; another
    consumer joins the group."""
    layout = replace(on_cluster, cluster=True)
    wfs = _workflows(layout)
    written = [(wfs[i % 8], f"e{i}") for i in range(40)]
    for wf, event in written:
        stream = output_stream_of(layout, workflow_partition(layout, wf))
        cluster_client.xadd(stream, {"workflow_id": wf, "event_id": event})
    client = AsyncRedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        consumer = ResultConsumer(client, layout, group="app", consumer="a", count=3)
        seen: list[tuple[str, str]] = []
        while batch := await consumer.read(block_ms=200):
            seen += [(r.workflow_id, r.event_id) for r in batch]
            await consumer.ack(batch)
        # A second consumer joins the existing group on every stream (BUSYGROUP is fine)
        # and finds nothing left.
        other = ResultConsumer(client, layout, group="app", consumer="b")
        assert await other.read(block_ms=0) == []
    finally:
        await client.aclose()
    assert sorted(seen) == sorted(written)
    for wf in wfs:
        assert [e for w, e in seen if w == wf] == [e for w, e in written if w == wf]
    for stream in output_streams(layout):
        assert cluster_client.xpending(stream, "app")["pending"] == 0
