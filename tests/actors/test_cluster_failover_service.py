"""``ctxd run`` + ``ctxd worker`` on a real Redis Cluster through two fail-overs: a
SIGKILLed master (its replica takes over) and a ``CLUSTER FAILOVER``, while events
arrive. Every event gets exactly one output in per-workflow order, and no loop of
either process crashes: the fail-overs are outages, waited out.

This module breaks its cluster, so it has one of its own.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from cluster_helpers import LocalCluster, read_cluster_outputs
from redis.cluster import RedisCluster
from redis.exceptions import RedisError
from redis_helpers import free_port, start_redis

from actors.config import Settings
from actors.service.partitions import partition_stream, workflow_partition
from actors.testing import check_history
from tests_support import TECH, ServiceProcess

pytestmark = pytest.mark.slow

EVENTS = 600
WORKFLOWS = 25
PARTITIONS = 16


@pytest.mark.timeout(300)
def test_master_kill_and_failover_lose_nothing(
    redis_cluster: LocalCluster, settings: Settings, prefix: str, tmp_path: Path
) -> None:
    cluster_settings = replace(settings, cluster=True, partitions=PARTITIONS)
    store_port = free_port()
    store = start_redis(tmp_path / "checkpoints", store_port, modules=True)
    env = {
        "CTXD_REDIS_URL": f"{redis_cluster.url}?cluster=true",  # stated, not probed
        "CTXD_CHECKPOINT_URL": f"redis://127.0.0.1:{store_port}/0",
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_PARTITIONS": str(PARTITIONS),
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "10",
    }
    run = ServiceProcess(["run"], {**env, "CTXD_INSTANCE": f"{prefix}-run"})
    worker = ServiceProcess(["worker"], {**env, "CTXD_INSTANCE": f"{prefix}-worker"})
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    inputs: list[tuple[str, str]] = []
    try:
        run.wait_ready(timeout=90)
        worker.wait_ready(timeout=90)
        started = time.monotonic()
        takeover = failover = 0.0
        while len(inputs) < EVENTS:
            i = len(inputs)
            workflow_id, event_id = f"{prefix}-wf{i % WORKFLOWS}", f"ev{i}"
            stream = partition_stream(
                cluster_settings, workflow_partition(cluster_settings, workflow_id)
            )
            try:
                client.xadd(stream, {"workflow_id": workflow_id, "event_id": event_id,
                                     "content": f"{TECH} #{i}"})  # fmt: skip
            except RedisError:
                continue  # the producer's shard is failing over: send it again
            inputs.append((workflow_id, event_id))
            if len(inputs) == EVENTS // 3:
                replica = redis_cluster.kill_master(redis_cluster.masters()[1])
                takeover = redis_cluster.wait_takeover(replica)
            elif len(inputs) == 2 * EVENTS // 3:
                failover = redis_cluster.failover(redis_cluster.replicas()[0])
        outputs = read_cluster_outputs(client, cluster_settings, EVENTS, timeout=90)
        took = time.monotonic() - started
    finally:
        client.close()
        for process in (run, worker):
            process.stop()
        store.terminate()
        store.wait(timeout=10)
    print(
        f"\ncluster fail-overs: master killed, replica took over in {takeover:.1f} s; "
        f"CLUSTER FAILOVER in {failover:.2f} s; {EVENTS} events -> {len(outputs)} outputs "
        f"in {took:.1f} s"
    )
    verdict = check_history(inputs, [(f["workflow_id"], f["event_id"]) for f in outputs], [])
    logs = "\n".join(["run:", *run.lines[-30:], "worker:", *worker.lines[-15:]])
    assert (verdict.lost, verdict.duplicated, verdict.reordered) == ([], [], []), logs
    crashes = [x for x in run.lines + worker.lines if "actor restarted" in x or "Traceback" in x]
    assert not crashes, "\n".join(crashes[:10])
    outages = [x for x in run.lines if "Redis unavailable" in x]
    assert 1 <= len(outages) <= 4, "\n".join(outages)  # one per fail-over, not a flood
