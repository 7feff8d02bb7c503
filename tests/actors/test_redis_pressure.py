"""Redis under pressure is backpressure, never failure: at ``maxmemory`` (noeviction)
reading pauses with one clear line and resumes by itself; at ``CTXD_CONCURRENCY=256``
with a slow analyzer the connection pool waits instead of failing asks."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest
from outage_support import OwnRedis, Producer, count, env_for, own_redis, stays_up
from redis import Redis
from redis.exceptions import OutOfMemoryError

from tests_support import TECH, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

__all__ = ["own_redis"]  # the fixture, used by name

SLOW = {"CTXD_ANALYZER": "tests/actors/plugins/slow_analyzer.py:analyze"}


def _fill_until_writes_fail(client: Redis, prefix: str) -> int:
    """Set a maxmemory a little above what is used (noeviction) and write filler until
    Redis refuses a write; return the number of filler keys."""
    client.config_set("maxmemory-policy", "noeviction")
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 4 * 1024 * 1024)
    blob = "x" * (256 * 1024)
    for i in range(1000):
        try:
            client.set(f"{prefix}:filler:{i}", blob)
        except OutOfMemoryError:
            # Right at the limit, freed buffers let small writes through again: keep it
            # full until the test frees memory.
            client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
            return i
    raise AssertionError("Redis never refused a write")


@pytest.mark.timeout(240)
def test_maxmemory_pauses_reading_with_one_line_and_resumes_by_itself(
    start_service: Callable[..., ServiceProcess], own_redis: OwnRedis, prefix: str
) -> None:
    own_redis.start()
    # Slow enough that events are still pending when Redis is full, well inside the
    # event timeout (a timed-out run is the event's failure, not the outage's).
    slow = {**SLOW, "SLOW_ANALYZER_SECONDS": "0.1", "CTXD_EVENT_TIMEOUT": "60"}
    run = start_service("run", env={**env_for(own_redis), **slow})
    run.wait_ready()
    producer = Producer(own_redis, prefix)
    producer.produce(120)
    with own_redis.client() as client:
        read_outputs(client, f"{prefix}:out", 5)
        fillers = _fill_until_writes_fail(client, prefix)
        run.wait_for_line(lambda x: "out of memory" in x)
        pending_at_oom = len(producer.inputs) - int(client.xlen(f"{prefix}:out"))
        stays_up([run], 5)  # Redis stays full for a while: no exit, no poison
        client.delete(*(f"{prefix}:filler:{i}" for i in range(fillers)))
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) * 2)
        freed = time.monotonic()
        outputs = producer.verdict_and_outputs()
        print(
            f"maxmemory: {pending_at_oom} events pending at OOM; all {len(outputs)} done "
            f"{time.monotonic() - freed:.1f} s after memory was freed"
        )
    assert pending_at_oom > 0, "the service finished before Redis was full"
    assert run.proc.poll() is None
    oom_lines = [x for x in run.lines if "out of memory" in x]
    assert len(oom_lines) == 1, oom_lines
    assert "maxmemory" in oom_lines[0]
    assert count(run, "Redis available again") == 1
    assert not [x for x in run.lines if "Traceback" in x or "Error while loading" in x]
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


@pytest.mark.timeout(300)
def test_concurrency_256_with_a_slow_analyzer_is_backpressure_not_failure(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """Every output ok, no breaker opened, the pool size in the start-up line (before,
    redis-py's pool of 100 ran out: MaxConnectionsError opened breakers, all fallback)."""
    env = {
        **SLOW,
        "SLOW_ANALYZER_SECONDS": "0.2",
        "CTXD_CONCURRENCY": "256",
        "CTXD_EVENT_TIMEOUT": "30",  # the default: 256 runs at once share one process's CPU
    }
    run = start_service("run", env=env)
    run.wait_ready()
    workflows, per_workflow = 300, 2
    started = time.monotonic()
    with redis.pipeline(transaction=False) as pipe:
        for round_ in range(per_workflow):
            for w in range(workflows):
                # TECH's analysis leads to "ok"; unique event ids (dedupe is by event id)
                pipe.xadd(f"{prefix}:in", {"workflow_id": f"wf-{w}", "event_id": f"e{round_}-{w}",
                                           "content": TECH})  # fmt: skip
        pipe.execute()
    total = workflows * per_workflow
    outputs = read_outputs(redis, f"{prefix}:out", total, timeout_ms=240_000)
    print(f"concurrency 256: {len(outputs)} outputs in {time.monotonic() - started:.1f} s")
    assert len(outputs) == total
    statuses = {f["status"] for _, f in outputs}
    assert statuses == {"ok"}, [f for _, f in outputs if f["status"] != "ok"][:3]
    assert not [x for x in run.lines if "circuit breaker opened" in x]
    running = json.loads(run.wait_for_line(lambda x: "ctxd is running" in x))
    assert int(running["redis_connections"]) >= 2 * 256
    status = json.loads(run_ctxd({**service_env, **env}, "status", "--json").stdout)
    breakers = status["instances"][0].get("breakers") or {}
    assert set(breakers.values()) == {"closed"}, breakers
    run.signal(signal.SIGTERM)
    assert run.wait() == 0
