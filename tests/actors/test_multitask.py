"""CTXD_MULTITASK: what happens to an event that arrives while its workflow is busy.

A slow analyzer plug-in keeps the first event in progress; the second event is sent
once the service logged that the first one's run started."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest
from redis import Redis

from actors.config import Settings
from graph.checkpointer import open_checkpointer
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow, thread_config
from tests_support import ServiceProcess, read_outputs

pytestmark = pytest.mark.slow


def _start(start_service: Callable[..., ServiceProcess], strategy: str) -> ServiceProcess:
    service = start_service(
        "run",
        env={
            "CTXD_MULTITASK": strategy,
            "CTXD_ANALYZER": "tests/actors/plugins/slow_analyzer.py:analyze",
            "SLOW_ANALYZER_SECONDS": "0.3",
            "CTXD_LOG_LEVEL": "debug",
            "CTXD_DURABILITY": "sync",
            "CTXD_EVENT_TIMEOUT": "30",
        },
    )
    service.wait_ready()
    return service


def _busy_pair(service: ServiceProcess, redis: Redis, prefix: str) -> None:
    """e0 done first; then e1, and e2 while e1 is in progress."""
    stream = f"{prefix}:in"
    redis.xadd(stream, {"workflow_id": f"m-{prefix}", "event_id": "e0", "content": "alpha beta"})
    read_outputs(redis, f"{prefix}:out", 1)
    before = _checkpoints(redis, prefix)
    redis.xadd(stream, {"workflow_id": f"m-{prefix}", "event_id": "e1", "content": "gamma delta"})
    service.wait_for_line(lambda line: "run started" in line and '"e1"' in line)
    # Wait until e1's run has written a checkpoint (durability=sync), so there is
    # something to roll back.
    while _checkpoints(redis, prefix) <= before:
        redis.xread({f"{prefix}:out": "$"}, block=50)  # a bounded wait, then look again
    redis.xadd(stream, {"workflow_id": f"m-{prefix}", "event_id": "e2", "content": "epsilon zeta"})


def _checkpoints(redis: Redis, prefix: str) -> int:
    return sum(1 for _ in redis.scan_iter(f"{prefix}:checkpoint:m-{prefix}:*", count=1000))


async def _state(settings: Settings, prefix: str) -> dict[str, object]:
    async with open_checkpointer(
        "redis", namespace=settings.stream_prefix, redis_url=settings.redis_url
    ) as saver:
        graph = build_contextual_workflow(LocalDispatch(), saver)
        return dict((await graph.aget_state(thread_config(f"m-{prefix}"))).values)


def _stop(service: ServiceProcess) -> None:
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_enqueue_runs_both_in_order(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """enqueue (default): the second event waits, both get normal outputs, in order."""
    service = _start(start_service, "enqueue")
    _busy_pair(service, redis, prefix)
    outputs = read_outputs(redis, f"{prefix}:out", 3)
    assert [f["event_id"] for _, f in outputs] == ["e0", "e1", "e2"]
    assert all(f["status"] != "error" for _, f in outputs)
    assert redis.xlen(f"{prefix}:dlq") == 0
    _stop(service)


def test_reject_dead_letters_the_newcomer(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """reject: the event arriving while busy goes to the DLQ with an actionable reason."""
    service = _start(start_service, "reject")
    _busy_pair(service, redis, prefix)
    dead = read_outputs(redis, f"{prefix}:dlq", 1)
    outputs = read_outputs(redis, f"{prefix}:out", 2)
    assert [f["event_id"] for _, f in outputs] == ["e0", "e1"]
    assert dead[0][1]["event_id"] == "e2"
    assert dead[0][1]["reason"] == "workflow_busy"
    assert "CTXD_MULTITASK=enqueue" in dead[0][1]["error"]
    _stop(service)


async def test_interrupt_cancels_the_running_event(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str, settings: Settings
) -> None:
    """interrupt: e1 is cancelled (one output, status=error, "interrupted"), e2 runs."""
    service = _start(start_service, "interrupt")
    _busy_pair(service, redis, prefix)
    outputs = read_outputs(redis, f"{prefix}:out", 3)
    assert [f["event_id"] for _, f in outputs] == ["e0", "e1", "e2"]
    e1, e2 = outputs[1][1], outputs[2][1]
    assert e1["status"] == "error"
    assert "interrupted" in e1["error"]
    assert e2["status"] != "error"
    assert redis.xlen(f"{prefix}:dlq") == 0
    _stop(service)
    assert "epsilon zeta" in json.dumps(await _state(settings, prefix))


async def test_rollback_restores_the_checkpoint_before_the_cancelled_run(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str, settings: Settings
) -> None:
    """rollback: like interrupt, and the state has no trace of e1 (durability=sync wrote
    checkpoints during e1's run; the head is a copy of the one before it)."""
    service = _start(start_service, "rollback")
    _busy_pair(service, redis, prefix)
    outputs = read_outputs(redis, f"{prefix}:out", 3)
    assert [f["event_id"] for _, f in outputs] == ["e0", "e1", "e2"]
    assert outputs[1][1]["status"] == "error"
    assert "rollback" in outputs[1][1]["error"]
    _stop(service)
    state = await _state(settings, prefix)
    assert any("workflow rolled back" in line for line in service.lines)
    assert "gamma delta" not in json.dumps(state), "the cancelled event left a trace"
    assert "epsilon zeta" in json.dumps(state)
    assert state["events_processed"] == 2
