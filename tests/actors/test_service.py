"""The walking skeleton end to end: real `ctxd` subprocesses on a real Redis Stack."""

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
from tests_support import ServiceProcess, read_outputs, run_ctxd, unmoved_input

pytestmark = pytest.mark.slow


def test_sent_event_yields_exactly_one_output(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """`ctxd send` → one ctxd:out entry with the event's workflow_id and event_id."""
    service = start_service("run")
    service.wait_ready()
    sent = run_ctxd(
        service_env, "send", "orders-1", "Checkout latency rose after the deploy.",
        "--event-id", "ev-1", "--priority", "high",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    source_id = sent.stdout.strip()

    outputs = read_outputs(redis, f"{prefix}:out", 1)
    assert len(outputs) == 1
    fields = outputs[0][1]
    assert fields["workflow_id"] == "orders-1"
    assert fields["event_id"] == "ev-1"
    assert fields["source_id"] == source_id
    assert fields["status"] in ("ok", "escalated", "fallback", "error")
    assert json.loads(fields["route"])[0] == "context_analyzer"
    assert set(json.loads(fields["scores"])) >= {"high_quality_path", "fallback_processing"}
    assert len(fields["trace_id"]) == 32
    assert fields["checkpoint_id"]
    assert unmoved_input(redis, prefix) == 0  # ctxd:in (if used) routed

    service.signal(signal.SIGTERM)
    assert service.wait() == 0


async def _stored_state(settings: Settings, workflow_id: str) -> dict[str, object]:
    async with open_checkpointer(
        "redis", namespace=settings.stream_prefix, redis_url=settings.redis_url
    ) as saver:
        graph = build_contextual_workflow(LocalDispatch(), saver)
        snapshot = await graph.aget_state(thread_config(workflow_id))
        return dict(snapshot.values)


async def test_state_persists_and_acked_events_are_not_reprocessed(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
    settings: Settings,
) -> None:
    """After a restart the next event sees the earlier context, and nothing acked reruns."""
    first = start_service("run")
    first.wait_ready()
    assert run_ctxd(service_env, "send", "wf-persist", "alpha beta gamma delta").returncode == 0
    read_outputs(redis, f"{prefix}:out", 1)
    first.signal(signal.SIGINT)
    assert first.wait() == 0

    second = start_service("run")
    second.wait_ready()
    assert run_ctxd(service_env, "send", "wf-persist", "alpha beta epsilon").returncode == 0
    outputs = read_outputs(redis, f"{prefix}:out", 2)
    second.signal(signal.SIGTERM)
    assert second.wait() == 0

    assert len(outputs) == 2, "the restarted instance reprocessed an acknowledged event"
    assert [f["workflow_id"] for _, f in outputs] == ["wf-persist", "wf-persist"]
    state = await _stored_state(settings, "wf-persist")
    assert state["events_processed"] == 2
    assert state["window"] == ["alpha beta gamma delta", "alpha beta epsilon"]
    assert unmoved_input(redis, prefix) == 0  # ctxd:in (if used) routed


def test_send_without_a_running_service_says_what_to_do(
    service_env: dict[str, str],
) -> None:
    """With no Redis URL and no embedded Redis running, `send` explains how to start one."""
    env = {k: v for k, v in service_env.items() if k != "CTXD_REDIS_URL"}
    result = run_ctxd(env, "send", "wf", "text")
    assert result.returncode != 0
    assert "start `ctxd run` first, or set CTXD_REDIS_URL" in result.stderr
