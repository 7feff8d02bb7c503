"""``ctxd status`` and ``ctxd dlq list|replay`` against a running service; trimming."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import cast

import pytest
from actor_support import TextEntries, TextRead
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from actors.service.streams import trim_acknowledged
from tests_support import ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow


def test_status_and_dlq_replay(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """status shows the instance, its partitions, lag/pending and the DLQ size; a dead
    letter fixed at the source and replayed is processed, and leaves the DLQ."""
    env = {**service_env, "CTXD_LEASE_TTL": "1", "CTXD_PARTITIONS": "4"}
    service = start_service("run", env=env)
    service.wait_ready()
    bad = redis.xadd(f"{prefix}:in", {"workflow_id": "wf-ops", "content": "x", "priority": "p9"})
    good = redis.xadd(f"{prefix}:in", {"workflow_id": "wf-ops", "content": "fine"})
    dead = read_outputs(redis, f"{prefix}:dlq", 1)
    read_outputs(redis, f"{prefix}:out", 1)
    service.wait_for_line(lambda line: "partition acquired" in line and '"partition": 3' in line)

    listed = run_ctxd(env, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["source_id"], r["reason"]) for r in rows] == [(bad, "invalid_priority")]

    status = run_ctxd(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["dlq_size"] == 1
    assert doc["output_length"] == 1
    assert doc["instances"][0]["router"] is True  # it routes the partitions it owns
    assert sorted(doc["instances"][0]["partitions"]) == [0, 1, 2, 3]
    assert doc["input"]["lag"] == 0  # every partition's cursor is past both entries
    assert doc["pending"] == 0
    # The actor pools publish their breakers and supervision figures in the heartbeat.
    instance = doc["instances"][0]
    assert instance["breakers"] == dict.fromkeys(
        ("analysis", "update", "monitoring", "decision"), "closed"
    )
    assert all(pool["running"] >= 1 for pool in instance["pools"].values())
    # The lease timing, so an operator sees the renewal margin (CTXD_LEASE_TTL=1 here).
    assert (instance["lease"]["ttl"], instance["lease"]["renew_every"]) == (1.0, 0.25)
    assert instance["lease"]["renew_gap_max"] > 0
    assert {p["owner"].split("|")[0] for p in doc["partitions"]} == {
        doc["instances"][0]["instance"]
    }
    text = run_ctxd(env, "status")
    assert "dlq: 1 entries" in text.stdout
    assert "instances: 1" in text.stdout
    assert "leases: ttl 1.0s, renewed every 0.25s, longest gap" in text.stdout

    # Replay: the original fields go back to ctxd:in; the DLQ entry is removed.
    assert run_ctxd(env, "dlq", "replay").returncode == 2  # neither --id nor --all
    replay = run_ctxd(env, "dlq", "replay", "--id", dead[0][0])
    assert replay.returncode == 0, replay.stdout + replay.stderr
    new_id = replay.stdout.split()[-1]
    assert redis.xrange(f"{prefix}:dlq", dead[0][0], dead[0][0]) == []
    assert cast(TextEntries, redis.xrange(f"{prefix}:in", new_id, new_id))[0][1] == {
        "workflow_id": "wf-ops",
        "content": "x",
        "priority": "p9",
    }
    # Still invalid, so it comes back to the DLQ once more, with the same reason.
    reply = cast(TextRead, redis.xread({f"{prefix}:dlq": dead[0][0]}, block=4000))
    again = reply[0][1][0][1]
    assert (again["source_id"], again["reason"]) == (new_id, "invalid_priority")
    assert run_ctxd(env, "dlq", "replay", "--id", "1-1").returncode == 1  # unknown id
    assert good


async def test_trim_only_below_the_lowest_pending_entry(redis_url: str, prefix: str) -> None:
    """Acknowledged entries are trimmed; pending and unread ones are kept."""
    client = AsyncRedis.from_url(redis_url, decode_responses=True)
    stream = f"{prefix}:trim"
    try:
        ids = [await client.xadd(stream, {"n": str(i)}) for i in range(10)]
        await client.xgroup_create(stream, "g", id="0")
        await client.xreadgroup("g", "c", {stream: ">"}, count=6)  # 0..5 delivered
        await client.xack(stream, "g", *ids[:3], ids[4])  # 3 and 5 still pending
        assert await trim_acknowledged(client, stream) == 3
        assert [e for e, _ in cast(TextEntries, await client.xrange(stream))] == ids[3:]
        await client.xack(stream, "g", ids[3], ids[5])
        assert await trim_acknowledged(client, stream) == 3  # up to the last delivered
        assert [e for e, _ in cast(TextEntries, await client.xrange(stream))] == ids[6:]
    finally:
        await client.delete(stream)
        await client.aclose()


def test_sigterm_after_ops(start_service: Callable[..., ServiceProcess]) -> None:
    """A service with nothing to do stops at once on SIGTERM, exit 0."""
    service = start_service("run")
    service.wait_ready()
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
