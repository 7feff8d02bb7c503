"""Every ``ctxd`` command against a real Redis Cluster named by ``CTXD_REDIS_URL``
(issue #14, "done means" 1): the service, the producer side (``send``), the readers
(``tail``, ``status``, ``state``, ``dlq``, ``partitions``), the control entries that go
through ``ctxd:in`` (``resume``, ``rollback``) and ``forget`` — checkpoints in a separate
standalone Redis, as a cluster requires."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import cast

import pytest
from cluster_helpers import LocalCluster
from redis.cluster import RedisCluster

from actors.config import Settings
from actors.results import output_streams
from tests_support import TECH, ServiceProcess, run_ctxd

pytestmark = pytest.mark.slow

PARTITIONS = 8


def _results(client: RedisCluster, layout: Settings, count: int) -> list[dict[str, str]]:
    """Wait (up to 60 s) until ``count`` results exist in the partitions' output streams;
    they have no cross-slot wake-up, so this looks every 0.1 s."""
    deadline = time.monotonic() + 60
    found: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        found = []
        for stream in output_streams(layout):
            found += [f for _, f in cast(list[tuple[str, dict[str, str]]], client.xrange(stream))]
        if len(found) >= count:
            break
        time.sleep(0.1)
    return found


@pytest.mark.timeout(300)
def test_every_command_works_on_a_cluster(
    redis_cluster: LocalCluster, checkpoint_url: str, prefix: str, tmp_path: Path
) -> None:
    env = {
        "CTXD_REDIS_URL": redis_cluster.url,
        "CTXD_CHECKPOINT_URL": checkpoint_url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_PARTITIONS": str(PARTITIONS),
        "CTXD_BLOCK_MS": "100",
        "CTXD_ESCALATION_PAUSES": "true",
    }
    layout = Settings(stream_prefix=prefix, partitions=PARTITIONS, cluster=True)
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    service = ServiceProcess(["run"], env)
    worker = ServiceProcess(["worker"], env)
    try:
        service.wait_ready()
        worker.wait_ready()
        wf, paused = f"{prefix}-a", f"{prefix}-p"
        for i, text in enumerate([TECH, TECH + " Again.", TECH + " Third."]):
            sent = run_ctxd(env, "send", wf, text, "--event-id", f"e{i}")
            assert sent.returncode == 0, sent.stderr
        via_input = run_ctxd(env, "send", wf, TECH, "--event-id", "e3", "--via-input")
        assert via_input.returncode == 0, via_input.stderr
        assert [f["event_id"] for f in _results(client, layout, 4)] == ["e0", "e1", "e2", "e3"]

        tail = run_ctxd(env, "tail", "--last", "4", "--json")
        assert tail.returncode == 0, tail.stderr
        assert [json.loads(line)["event_id"] for line in tail.stdout.splitlines()] == [
            "e0",
            "e1",
            "e2",
            "e3",
        ]
        status = run_ctxd(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        assert doc["output_length"] == 4
        assert len(doc["instances"]) == 1
        shown = run_ctxd(env, "partitions")
        assert shown.returncode == 0, shown.stderr
        assert f"partitions: {PARTITIONS}" in shown.stdout

        history = run_ctxd(env, "state", wf, "--history", "--json")
        assert history.returncode == 0, history.stderr
        checkpoints = json.loads(history.stdout)["history"]
        assert len(checkpoints) >= 2
        rolled = run_ctxd(env, "rollback", wf, "--to", checkpoints[-1]["checkpoint_id"])
        assert rolled.returncode == 0, rolled.stderr + rolled.stdout
        assert "rollback: status=ok" in rolled.stdout

        escalated = run_ctxd(
            env, "send", paused, "ok", "--event-id", "x1", "--priority", "critical"
        )
        assert escalated.returncode == 0, escalated.stderr
        assert any(f["status"] == "escalated" for f in _results(client, layout, 6))
        resumed = run_ctxd(env, "resume", paused, "--value", "null")
        assert resumed.returncode == 0, resumed.stderr + resumed.stdout
        assert "resume: status=ok" in resumed.stdout

        listed = run_ctxd(env, "dlq", "list")
        assert listed.returncode == 0, listed.stderr
        state = run_ctxd(env, "state", wf)
        assert state.returncode == 0, state.stderr
        forgot = run_ctxd(env, "forget", wf)
        assert forgot.returncode == 0, forgot.stderr + forgot.stdout
        assert f"forgot {wf}:" in forgot.stdout
    finally:
        service.stop()
        worker.stop()
        client.close()
