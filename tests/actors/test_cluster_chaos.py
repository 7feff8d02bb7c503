"""ctxd on a real Redis Cluster, broken on purpose (issue #14, "done means" 8).

Three masters with a replica each (modules loaded), two ``ctxd run`` instances and one
``ctxd worker`` on it, checkpoints in a separate standalone Redis (a cluster cannot
answer state history). 2,000 events go in through ``ctxd:in``; meanwhile instances are
SIGKILLed and restarted, and one master is SIGKILLed so its replica takes over. Every
event must come out exactly once, in its workflow's order, and the partitions' keys must
be spread over every master.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from cluster_helpers import LocalCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from actors.config import Settings
from actors.service.partitions import output_stream_of, partition_stream, partition_tag
from actors.testing import check_history
from tests_support import ServiceProcess

EVENTS = int(os.environ.get("CTXD_TEST_CLUSTER_EVENTS", "2000"))
WORKFLOWS = 50
PARTITIONS = 16
INSTANCE_KILLS = 3

Entries = list[tuple[str, dict[str, str]]]


@pytest.fixture
def cluster_client(redis_cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    yield client
    client.close()


def _outputs(client: RedisCluster, layout: Settings) -> Entries:
    """Every partition's output stream, read whole (one ``XRANGE`` per stream)."""
    entries: Entries = []
    for n in range(layout.partitions):
        entries += cast(Entries, client.xrange(output_stream_of(layout, n)))
    return entries


def _dead(client: RedisCluster, layout: Settings) -> Entries:
    entries: Entries = []
    for n in range(layout.partitions):
        entries += cast(Entries, client.xrange(partition_tag(layout, n) + ":dlq"))
    return entries


def _count(client: RedisCluster, layout: Settings) -> int:
    total = 0
    for n in range(layout.partitions):
        total += int(client.xlen(output_stream_of(layout, n)))
        total += int(client.xlen(partition_tag(layout, n) + ":dlq"))
    return total


def _wait_for(client: RedisCluster, layout: Settings, target: int, timeout: float) -> int:
    """Wait until ``target`` results exist; a stream has no cross-slot wake-up, so this
    looks every 0.2 s (an ``XREAD BLOCK`` cannot span the partitions' slots)."""
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        try:
            done = _count(client, layout)
        except RedisError:  # a master fails over: the client finds the new one next time
            done = done
        if done >= target:
            return done
        if int(time.monotonic()) % 10 == 0:
            print(f"  {done}/{target} results", flush=True)
        time.sleep(0.2)
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_chaos_keeps_every_guarantee(
    redis_cluster: LocalCluster,
    cluster_client: RedisCluster,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    rng = random.Random(20261128)
    layout = Settings(stream_prefix=prefix, partitions=PARTITIONS, cluster=True)
    env = {
        "CTXD_REDIS_URL": redis_cluster.url,
        "CTXD_CHECKPOINT_URL": redis_url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_PARTITIONS": str(PARTITIONS),
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "10",
        "CTXD_BATCH_SIZE": "8",
    }
    started: list[ServiceProcess] = []

    def start(*args: str) -> ServiceProcess:
        process = ServiceProcess(list(args), env)
        started.append(process)
        return process

    try:
        runs = [start("run"), start("run")]
        worker = start("worker")
        for process in (*runs, worker):
            process.wait_ready()
        inputs: list[tuple[str, str]] = []
        with cluster_client.pipeline() as pipe:  # type: ignore[no-untyped-call]
            for i in range(EVENTS):
                wf, event_id = f"{prefix}-wf-{i % WORKFLOWS:02d}", f"ev-{i:04d}"
                inputs.append((wf, event_id))
                pipe.xadd(
                    layout.input_stream,
                    {"workflow_id": wf, "event_id": event_id, "content": f"step {i} ok"},
                )
            pipe.execute()
        began = time.monotonic()

        done = kills = 0
        failover_seconds = -1.0
        while kills < INSTANCE_KILLS and done < EVENTS - 200:
            done = _wait_for(cluster_client, layout, done + rng.randint(150, 300), 90)
            slot = rng.randrange(2)
            runs[slot].proc.send_signal(signal.SIGKILL)
            runs[slot].proc.wait(timeout=10)
            runs[slot] = start("run")
            kills += 1
            if kills == 2:  # one master dies; its replica takes over
                victim = redis_cluster.masters()[rng.randrange(3)]
                replica = redis_cluster.kill_master(victim)
                failover_seconds = redis_cluster.wait_takeover(replica)

        done = _wait_for(cluster_client, layout, EVENTS, 240)
        elapsed = time.monotonic() - began
        if done < EVENTS:
            for process in started:
                print(f"--- {process.proc.args!r} exit={process.proc.poll()}")
                print("\n".join(process.lines[-25:]))
        outputs = [(f["workflow_id"], f["event_id"]) for _, f in _outputs(cluster_client, layout)]
        dead = [f.get("event_id", "") for _, f in _dead(cluster_client, layout)]
        verdict = check_history(inputs, outputs, dead)
        print(
            f"cluster chaos: {EVENTS} events, {kills} instance SIGKILLs, master fail-over "
            f"{failover_seconds:.1f}s, {elapsed:.1f}s, {EVENTS / elapsed:.1f} events/s, "
            f"dlq={len(dead)}"
        )
        assert kills == INSTANCE_KILLS
        assert failover_seconds > 0
        assert verdict.ok, verdict
        assert len(outputs) == EVENTS
        assert not dead

        # The partitions' keys are spread: every master holds some partition's stream.
        holders: set[int] = set()
        for n in range(PARTITIONS):
            key = partition_stream(layout, n)
            node = cluster_client.get_node_from_key(key)  # type: ignore[no-untyped-call]
            assert node is not None
            assert cluster_client.exists(key), key
            holders.add(int(node.port))
        masters = {node.port for node in redis_cluster.masters()}
        assert masters <= holders, (sorted(masters), sorted(holders))
    finally:
        for process in started:
            process.stop()


def test_partition_tags_spread_over_three_masters() -> None:
    """The slots ``redis-cli --cluster create`` gives 3 masters (0-5460, 5461-10922,
    10923-16383): the 16 partitions' tags land on all three, and every key of one
    partition in its tag's slot."""
    layout = Settings(stream_prefix="ctxd", partitions=PARTITIONS, cluster=True)
    masters = {0 if s <= 5460 else 1 if s <= 10922 else 2 for s in map(_slot, range(PARTITIONS))}
    assert masters == {0, 1, 2}
    for n in range(PARTITIONS):
        keys = [partition_stream(layout, n), output_stream_of(layout, n), f"{{p{n}}}"]
        assert len({key_slot(k.encode()) for k in keys}) == 1


def _slot(n: int) -> int:
    return int(key_slot(f"p{n}".encode()))
