"""Reading results and dead letters across slots on a real Redis Cluster (3 masters with
replicas, tests/cluster_helpers.py): ``ctxd tail``, ``ctxd dlq list|replay`` and
``ctxd status`` through the command's own client (the cluster is detected), a follow
across slots, and an application's :class:`actors.results.ResultConsumer`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
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


class _LineReader:
    """The JSON lines a process prints, handed over by a thread as they come (a pipe's
    buffered reader would hide lines from ``select``)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._stdout:
            self._lines.put(line)

    def take(self, count: int, within: float) -> list[dict[str, str]]:
        """``count`` lines, waiting at most ``within`` seconds in all."""
        found: list[dict[str, str]] = []
        deadline = time.monotonic() + within
        while len(found) < count:
            left = deadline - time.monotonic()
            try:
                found.append(json.loads(self._lines.get(timeout=max(left, 0.001))))
            except queue.Empty:
                raise AssertionError(f"only {len(found)} of {count} lines: {found}") from None
        return found


def test_tail_follow_process_reads_across_slots_through_a_failover(
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    on_cluster: Settings,
    prefix: str,
    tmp_path: Path,
) -> None:
    """``ctxd tail -f`` as a real process on the cluster URL (found to be a cluster):
    prints new results of every partition, and goes on printing the results of a
    partition whose master was switched to its replica (CLUSTER FAILOVER) meanwhile."""
    layout = replace(on_cluster, cluster=True)
    wfs = _workflows(layout)

    def commit(wf: str, event: str) -> None:
        stream = output_stream_of(layout, workflow_partition(layout, wf))
        cluster_client.xadd(stream, {"workflow_id": wf, "event_id": event, "route": "[]"})

    commit(wfs[0], "ready")  # the newest result: tail prints it once it has its cursors
    env = {
        **os.environ,
        "CTXD_REDIS_URL": redis_cluster.url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_PARTITIONS": "8",
        "CTXD_STATE_DIR": str(tmp_path / "state"),
    }
    env.pop("CTXD_CONFIG", None)
    tail = subprocess.Popen(
        [sys.executable, "-m", "actors.app.cli", "tail", "-f", "--json", "--last", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = _LineReader(tail)
    try:
        assert [r["event_id"] for r in lines.take(1, 30)] == ["ready"]
        for wf in wfs:
            commit(wf, "before")
        before = lines.take(len(wfs), 15)
        assert sorted(r["workflow_id"] for r in before) == sorted(wfs)

        stream = output_stream_of(layout, workflow_partition(layout, wfs[3]))
        master = redis_cluster.master_of_slot(int(cluster_client.keyslot(stream)))  # type: ignore[no-untyped-call]
        took = redis_cluster.failover(redis_cluster.replica_of(master))
        for event in ("after-1", "after-2"):
            commit(wfs[3], event)
        commit(wfs[5], "after-3")
        after = lines.take(3, 30)
        assert [r["event_id"] for r in after if r["workflow_id"] == wfs[3]] == [
            "after-1",
            "after-2",
        ]
        print(f"CLUSTER FAILOVER took {took:.2f} s; tail -f went on")
    finally:
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=15)
    assert tail.returncode == 130, err


def test_tail_follow_process_waits_out_a_killed_master(
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    on_cluster: Settings,
    prefix: str,
    tmp_path: Path,
) -> None:
    """A master SIGKILLed under ``ctxd tail -f``: tail waits the outage out (one line when
    it begins, one when it ends), its replica takes over within seconds, and tail goes on
    printing that partition's results. (Last in this module: the cluster is left with a
    master without a replica.)"""
    layout = replace(on_cluster, cluster=True)
    wfs = _workflows(layout)

    def commit(wf: str, event: str) -> None:
        stream = output_stream_of(layout, workflow_partition(layout, wf))
        cluster_client.xadd(stream, {"workflow_id": wf, "event_id": event, "route": "[]"})

    commit(wfs[0], "ready")
    env = {
        **os.environ,
        "CTXD_REDIS_URL": redis_cluster.url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_PARTITIONS": "8",
        "CTXD_STATE_DIR": str(tmp_path / "state"),
    }
    tail = subprocess.Popen(
        [sys.executable, "-m", "actors.app.cli", "tail", "-f", "--json", "--last", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = _LineReader(tail)
    try:
        assert [r["event_id"] for r in lines.take(1, 30)] == ["ready"]
        stream = output_stream_of(layout, workflow_partition(layout, wfs[2]))
        slot = int(cluster_client.keyslot(stream))  # type: ignore[no-untyped-call]
        replica = redis_cluster.kill_master(redis_cluster.master_of_slot(slot))
        took = redis_cluster.wait_takeover(replica)
        for event in ("after-1", "after-2"):
            commit(wfs[2], event)
        after = lines.take(2, 60)
        assert [r["event_id"] for r in after] == ["after-1", "after-2"]
        print(f"replica took over in {took:.2f} s; tail -f went on")
    finally:
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=15)
    assert tail.returncode == 130, err
    # One line when the outage began, one when it ended.
    assert err.count("ctxd tail: Redis unavailable") == 1, err
    assert err.count("ctxd tail: Redis is back") == 1, err
