"""Graceful shutdown and fatal errors, with real ``ctxd run`` subprocesses and signals."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable

import pytest
from redis import Redis

from tests_support import ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

SLOW = {
    "CTXD_ANALYZER": "tests/actors/plugins/slow_analyzer.py:analyze",
    "SLOW_ANALYZER_SECONDS": "0.05",
    "CTXD_LOG_LEVEL": "debug",
    "CTXD_BATCH_SIZE": "2",
}


def _name(service: ServiceProcess) -> str:
    return f"{socket.gethostname()}:{service.proc.pid}"


def test_sigterm_drains_in_flight_work_and_exits_zero(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """SIGTERM under load: no new reads, the in-flight batch finishes, heartbeat and
    leases are given back, exit 0 within the drain budget; a second instance finishes
    the rest — every event exactly once."""
    first = start_service("run", env={**SLOW, "CTXD_DRAIN_BUDGET": "15"})
    first.wait_ready()
    ids = [
        redis.xadd(f"{prefix}:in", {"workflow_id": f"wf-{i % 3}", "content": f"event {i}"})
        for i in range(60)
    ]
    first.wait_for_line(lambda line: "run started" in line)
    assert redis.exists(f"{prefix}:instance:{_name(first)}")
    started = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert time.monotonic() - started < 15
    assert any('"ctxd stopped"' in line for line in first.lines)
    assert not redis.exists(f"{prefix}:instance:{_name(first)}"), "heartbeat left behind"
    assert not list(redis.scan_iter(f"{prefix}:lease:*")), "leases not given back"
    done_by_first = redis.xlen(f"{prefix}:out")
    assert 0 < done_by_first < len(ids), "expected part of the work to be left pending"

    second = start_service("run", env={**SLOW, "SLOW_ANALYZER_SECONDS": "0"})
    outputs = read_outputs(redis, f"{prefix}:out", len(ids))
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    sources = [fields["source_id"] for _, fields in outputs]
    assert sorted(sources) == sorted(ids), "lost or duplicated events across the handover"


def test_drain_budget_exceeded_leaves_work_pending_and_exits_zero(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """A run longer than the drain budget is abandoned, its event stays pending (no
    output, no ack), the process still exits 0 promptly; the next instance does it."""
    first = start_service(
        "run", env={**SLOW, "SLOW_ANALYZER_SECONDS": "30", "CTXD_DRAIN_BUDGET": "1"}
    )
    first.wait_ready()
    source = redis.xadd(f"{prefix}:in", {"workflow_id": "wf-long", "content": "slow one"})
    first.wait_for_line(lambda line: "run started" in line)
    started = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert any("drain budget exceeded" in line for line in first.lines)
    assert redis.xlen(f"{prefix}:out") == 0
    second = start_service("run")
    outputs = read_outputs(redis, f"{prefix}:out", 1)
    assert [f["source_id"] for _, f in outputs] == [source]
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


def test_fatal_error_exits_non_zero_with_one_line(service_env: dict[str, str]) -> None:
    """Redis unreachable at start past CTXD_REDIS_MAX_OUTAGE: exit code 1, one line on
    stderr naming the limit and the cause (without the limit, start-up waits)."""
    env = {
        **service_env,
        "CTXD_REDIS_URL": "redis://127.0.0.1:1/0",
        "CTXD_REDIS_MAX_OUTAGE": "1",
    }
    result = run_ctxd(env, "run", timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "CTXD_REDIS_MAX_OUTAGE=1" in lines[0], lines
    assert "cause: ConnectionError" in lines[0], lines
