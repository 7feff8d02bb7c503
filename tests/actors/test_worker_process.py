"""Actors across real processes: scale-out, SIGKILL + XAUTOCLAIM, crash loops, bursts."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import anyio
import pytest
from actor_support import TextRead, actor_settings, open_redis, running
from redis import Redis

from actors.config import Settings
from actors.runtime.mailbox import ActorReply, ActorRequest, mailbox_stream
from actors.service.tree import ROOT_INTENSITY, ActorSystem
from graph.state import JSON
from graph.work import WorkHandlers
from tests_support import ServiceProcess, read_outputs, unmoved_input

pytestmark = pytest.mark.slow

PLUGIN = f"{Path(__file__).with_name('flaky_analyzer.py')}:analyze"
WINDOW: dict[str, JSON] = {"workflow_id": "w", "window": ["checkout latency rose after the deploy"]}


def _json_lines(process: ServiceProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in process.lines if line.startswith("{")]


@pytest.mark.parametrize("command", [("run",), ("worker", "--kinds", "analysis")])
def test_actor_crashing_on_every_start_makes_the_process_exit_non_zero(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
    command: tuple[str, ...],
) -> None:
    """Bounded restarts with backoff, escalation to the root, then a non-zero exit."""
    redis.set(f"{prefix}:actor:analysis", "not a stream")  # XGROUP CREATE fails every start
    intensity = 2
    service = start_service(
        *command,
        env={"CTXD_RESTART_INTENSITY": str(intensity), "CTXD_RESTART_BACKOFF": "0.01"},
    )
    code = service.wait(timeout=60)
    restarts = [e for e in _json_lines(service) if e.get("event") == "actor restarted"]
    assert code != 0
    assert len(restarts) == (ROOT_INTENSITY + 1) * intensity + ROOT_INTENSITY
    assert {e["error_type"] for e in restarts} == {"ResponseError", "SupervisorEscalation"}
    assert any("gave up" in line for line in service.lines)
    assert not any("ctxd is running" in line for line in service.lines)


async def test_scale_out_asks_are_served_by_a_run_and_a_worker_process(
    start_service: Callable[..., ServiceProcess], settings: Settings, redis: Redis
) -> None:
    """`ctxd run` and `ctxd worker --kinds analysis,decision` share the groups."""
    run = start_service("run")
    worker = start_service("worker", "--kinds", "analysis,decision")
    run.wait_ready()
    worker.wait_ready()
    asker_settings = actor_settings(settings, instance=f"{settings.stream_prefix}-asker")
    async with open_redis(asker_settings) as client:
        system = ActorSystem(client, asker_settings, WorkHandlers(), serve=())
        async with running(system):
            assert system.mailbox is not None
            mailbox = system.mailbox
            replies: list[ActorReply] = []

            async def ask() -> None:
                replies.append(await mailbox.ask_reply("analysis", WINDOW, 10.0))

            async with anyio.create_task_group() as tg:
                for _ in range(64):
                    tg.start_soon(ask)
    run_pid, worker_pid = str(run.proc.pid), str(worker.proc.pid)
    consumers = {r.consumer for r in replies}
    assert all(r.ok for r in replies)
    assert any(f":{run_pid}:analysis:" in c for c in consumers), consumers
    assert any(f":{worker_pid}:analysis:" in c for c in consumers), consumers
    # The pipeline itself works across both: events in, one output each.
    for i in range(6):
        redis.xadd(
            f"{settings.stream_prefix}:in", {"workflow_id": f"wf-{i % 2}", "content": f"e{i}"}
        )
    assert len(read_outputs(redis, f"{settings.stream_prefix}:out", 6)) == 6
    for process in (run, worker):
        process.signal(signal.SIGTERM)
        assert process.wait() == 0


async def test_sigkilled_worker_process_requests_are_reclaimed_by_another_process(
    start_service: Callable[..., ServiceProcess], settings: Settings, redis: Redis, prefix: str
) -> None:
    """A worker process dies with SIGKILL mid-request; a peer XAUTOCLAIMs and answers it."""
    env = {"CTXD_ANALYZER": PLUGIN, "CTXD_ASK_TIMEOUT": "0.5"}
    redis.set(f"{prefix}:test:analyzer", "hang")
    doomed = start_service("worker", "--kinds", "analysis", env=env)
    doomed.wait_ready()
    reply_to = f"{prefix}:test-replies"
    request = ActorRequest("kill-1", "analysis", json.dumps(WINDOW), reply_to, time.time() + 600)
    redis.xadd(mailbox_stream(settings, "analysis"), request.to_fields())  # type: ignore[arg-type]
    started = redis.xread({f"{prefix}:test:started": "0-0"}, block=30000, count=1)
    assert started, "the doomed worker never started on the request"
    doomed.signal(signal.SIGKILL)
    assert doomed.wait() == -signal.SIGKILL
    pending = redis.xpending_range(mailbox_stream(settings, "analysis"), "ctxd", "-", "+", 10)
    assert [str(p["consumer"]).split(":")[-3] for p in pending] == [str(doomed.proc.pid)]

    redis.delete(f"{prefix}:test:analyzer")
    rescuer = start_service("worker", "--kinds", "analysis", env=env)
    rescuer.wait_ready()
    got = cast(TextRead, redis.xread({reply_to: "0-0"}, block=30000, count=1))
    assert got, "no process answered the reclaimed request"
    reply = ActorReply.from_fields(got[0][1][0][1])
    assert reply.ok, reply.body
    assert reply.id == "kill-1"
    assert reply.consumer.endswith(":analysis:reclaim")
    assert f":{rescuer.proc.pid}:" in reply.consumer
    assert redis.xpending(mailbox_stream(settings, "analysis"), "ctxd")["pending"] == 0
    assert redis.xlen(f"{prefix}:dlq") == 0
    rescuer.signal(signal.SIGTERM)
    assert rescuer.wait() == 0


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_memory_stays_bounded_under_a_ten_times_burst(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """Peak RSS after 10x the in-flight bound of events barely exceeds that after 1x."""
    env = {"CTXD_CONCURRENCY": "2", "CTXD_BATCH_SIZE": "4", "CTXD_READ_COUNT": "8",
           "CTXD_MAX_ASKS_IN_FLIGHT": "8", "CTXD_CHECKPOINTER": "redis"}  # fmt: skip
    service = start_service("run", env=env)
    service.wait_ready()
    bound = 2 * 4
    content = "checkout latency rose after the deploy; payment API errors. " * 40
    for i in range(bound):
        redis.xadd(f"{prefix}:in", {"workflow_id": f"wf-{i % 4}", "content": content})
    assert len(read_outputs(redis, f"{prefix}:out", bound, timeout_ms=60000)) == bound
    warm = _peak_rss_kib(service.proc.pid)
    for i in range(10 * bound):
        redis.xadd(f"{prefix}:in", {"workflow_id": f"wf-{i % 4}", "content": content})
    outputs = read_outputs(redis, f"{prefix}:out", 11 * bound, timeout_ms=110000)
    peak = _peak_rss_kib(service.proc.pid)
    assert len(outputs) == 11 * bound
    assert peak - warm < 16 * 1024, f"peak RSS grew by {(peak - warm) / 1024:.1f} MiB"
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_local_dispatch_stays_selectable_and_uses_no_actor_streams(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    service = start_service("run", env={"CTXD_DISPATCH": "local"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf", "content": "alpha beta gamma"})
    assert len(read_outputs(redis, f"{prefix}:out", 1)) == 1
    assert redis.keys(f"{prefix}:actor:*") == []
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_ctxd_run_rides_out_an_analysis_outage_with_fallbacks_and_no_dead_letters(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """The daemon's wiring: breaker opens, fallbacks come out, it recovers, nothing lost."""
    env = {"CTXD_ANALYZER": PLUGIN, "CTXD_BREAKER_WINDOW": "4", "CTXD_BREAKER_MINIMUM_CALLS": "4",
           "CTXD_BREAKER_OPEN_WAIT": "1", "CTXD_BREAKER_HALF_OPEN_CALLS": "2",
           "CTXD_CONCURRENCY": "2", "CTXD_BATCH_SIZE": "1"}  # fmt: skip
    redis.set(f"{prefix}:test:analyzer", "fail")
    service = start_service("run", env=env)
    service.wait_ready()
    total = 16
    for i in range(total):
        content = f"event {i}: checkout latency rose after the deploy, payment API errors"
        redis.xadd(f"{prefix}:in", {"workflow_id": f"wf-{i % 4}", "content": content})
    service.wait_for_line(lambda line: "circuit breaker opened" in line)
    redis.delete(f"{prefix}:test:analyzer")
    outputs = read_outputs(redis, f"{prefix}:out", total, timeout_ms=90000)
    service.wait_for_line(lambda line: '"to_state": "closed"' in line)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    moves = [
        (e["from_state"], e["to_state"])
        for e in _json_lines(service)
        if e.get("event") in ("circuit breaker opened", "circuit breaker transition")
        and e.get("breaker") == "actor.analysis"
    ]
    assert moves[0] == ("closed", "open")
    assert ("open", "half_open") in moves
    assert moves[-1] == ("half_open", "closed")
    assert len(outputs) == total
    assert {f["decision"] for _, f in outputs} & {"fallback_processing", "circuit_breaker_mode"}
    assert redis.xlen(f"{prefix}:dlq") == 0
    assert unmoved_input(redis, prefix) == 0


async def test_a_worker_processs_span_is_a_child_of_the_askers_send_span(
    start_service: Callable[..., ServiceProcess], settings: Settings
) -> None:
    """Across processes: the trace context travels in the mailbox entry, and the
    `ctxd worker` process exports its `process` span as a child of the asker's span."""
    from opentelemetry.trace import SpanKind

    from telemetry.testing import OtlpReceiver, capture_spans

    with OtlpReceiver() as receiver:
        worker = start_service(
            "worker",
            "--kinds",
            "analysis",
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
        )
        worker.wait_ready()
        asker_settings = actor_settings(settings, instance=f"{settings.stream_prefix}-asker")
        stream = mailbox_stream(asker_settings, "analysis")
        with capture_spans() as capture:
            async with open_redis(asker_settings) as client:
                system = ActorSystem(
                    client, asker_settings, WorkHandlers(), serve=(), tracer=capture.tracer
                )
                async with running(system):
                    assert system.mailbox is not None
                    reply = await system.mailbox.ask_reply("analysis", WINDOW, 10.0)
            send = capture.named(f"send {stream}")
        assert reply.ok
        assert f":{worker.proc.pid}:" in reply.consumer  # served by the worker process
        trace_id = format(send.context.trace_id, "032x")
        spans = receiver.wait_for_spans(
            lambda got: any(s.name == f"process {stream}" and s.trace_id == trace_id for s in got),
            timeout=30,
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    served = [s for s in spans if s.name == f"process {stream}" and s.trace_id == trace_id]
    assert len(served) == 1
    assert served[0].kind is SpanKind.CONSUMER
    assert served[0].parent_span_id == format(send.context.span_id, "016x")
