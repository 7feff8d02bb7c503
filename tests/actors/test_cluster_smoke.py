"""Smoke test on a real Redis Cluster: ``ctxd run`` and ``ctxd worker`` as subprocesses,
checkpoints in a separate standalone Redis Stack, 100 events in, 100 outputs out.

Events are appended straight to their partition streams with the documented hash
(``crc32(workflow_id) % CTXD_PARTITIONS``), as a producer on a cluster does; every
partition's keys carry its hash tag, so the partitions spread over all three masters,
which the test checks (and prints) by scanning each master for partition keys.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from cluster_helpers import LocalCluster, read_cluster_outputs
from redis import Redis
from redis.cluster import RedisCluster

from actors.config import Settings
from actors.service.partitions import partition_stream, workflow_partition
from actors.testing import check_history
from tests_support import TECH, ServiceProcess

pytestmark = pytest.mark.slow

EVENTS = 100
WORKFLOWS = 20
PARTITIONS = 16


def _commands_on_masters(cluster: LocalCluster) -> Counter[str]:
    """Commands the masters have run, by name (INFO commandstats), replication excluded."""
    total: Counter[str] = Counter()
    for master in cluster.masters():
        with master.client() as client:
            for name, stats in client.info("commandstats").items():
                if name not in ("cmdstat_replconf", "cmdstat_psync", "cmdstat_info"):
                    total[name.removeprefix("cmdstat_")] += int(stats["calls"])
    return total


def _partition_keys_by_master(cluster: LocalCluster, prefix: str) -> dict[int, set[int]]:
    """For every master, the partitions whose keys it holds (SCAN on that node alone)."""
    tag = re.compile(rf"^{re.escape(prefix)}:\{{p(\d+)\}}:")
    found: dict[int, set[int]] = {}
    for master in cluster.masters():
        with master.client() as client:
            keys = client.scan_iter(match=f"{prefix}:{{p*", count=1000)
            found[master.port] = {int(m.group(1)) for k in keys if (m := tag.match(k))}
    return found


def test_run_and_worker_on_a_cluster_process_every_event_once(
    redis_cluster: LocalCluster,
    checkpoint_url: str,
    settings: Settings,
    prefix: str,
    tmp_path: Path,
) -> None:
    """100 events over 20 workflows: exactly one output each, per-workflow order kept,
    the checkpoints in the separate store, and partition keys on every master."""
    cluster_settings = replace(settings, cluster=True, partitions=PARTITIONS)
    env = {
        "CTXD_REDIS_URL": redis_cluster.url,
        "CTXD_CHECKPOINT_URL": checkpoint_url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_PARTITIONS": str(PARTITIONS),
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "10",
    }
    run = ServiceProcess(["run"], {**env, "CTXD_INSTANCE": f"{prefix}-run"})
    worker = ServiceProcess(["worker"], {**env, "CTXD_INSTANCE": f"{prefix}-worker"})
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        started = time.monotonic()
        run.wait_ready(timeout=90)
        worker.wait_ready(timeout=90)
        ready = time.monotonic() - started
        commands_before = _commands_on_masters(redis_cluster)
        inputs: list[tuple[str, str]] = []
        for i in range(EVENTS):
            workflow_id, event_id = f"{prefix}-wf{i % WORKFLOWS}", f"ev{i}"
            n = workflow_partition(cluster_settings, workflow_id)
            client.xadd(
                partition_stream(cluster_settings, n),
                {"workflow_id": workflow_id, "event_id": event_id, "content": f"{TECH} #{i}"},
            )
            inputs.append((workflow_id, event_id))
        sent = time.monotonic()
        outputs = read_cluster_outputs(client, cluster_settings, EVENTS, timeout=120)
        took = time.monotonic() - sent
        commands = _commands_on_masters(redis_cluster) - commands_before
        placement = _partition_keys_by_master(redis_cluster, prefix)
        with Redis.from_url(checkpoint_url, decode_responses=True) as store:
            checkpoint_keys = sum(1 for _ in store.scan_iter(match=f"{prefix}:checkpoint*"))
    finally:
        client.close()
        for process in (run, worker):
            process.stop()
    # Nothing crashed on the way (a CROSSSLOT error restarts the loop that met it).
    trouble = [
        line
        for line in run.lines + worker.lines
        if "actor restarted" in line or '"level": "error"' in line or "Traceback" in line
    ]
    assert not trouble, "\n".join(trouble[:10])
    print(
        f"\ncluster smoke: ready in {ready:.1f} s, {EVENTS} events -> {len(outputs)} outputs "
        f"in {took:.1f} s ({EVENTS / took:.0f} events/s)"
    )
    total = sum(commands.values())
    top = ", ".join(f"{name} {count / EVENTS:.1f}" for name, count in commands.most_common(6))
    per_event = total / EVENTS
    print(f"  {total} commands on the masters (this test's polling included), {per_event:.0f}")
    print(f"  per event: {top}")
    for port, partitions in sorted(placement.items()):
        print(f"  master 127.0.0.1:{port}: partitions {sorted(partitions)}")
    verdict = check_history(inputs, [(f["workflow_id"], f["event_id"]) for f in outputs], [])
    assert (verdict.lost, verdict.duplicated, verdict.reordered) == ([], [], [])
    assert all(f["status"] == "ok" and not f.get("error") for f in outputs), outputs[:3]
    assert len(placement) == 3
    assert all(placement.values()), placement  # partition keys on every master
    assert set().union(*placement.values()) == set(range(PARTITIONS))
    assert checkpoint_keys > 0  # state went to the separate store
