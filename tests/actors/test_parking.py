"""Human in the loop through the real service: escalation pauses, parked events,
``ctxd resume`` / ``ctxd rollback`` control entries and ``ctxd state``, across SIGKILL."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest
from redis import Redis

from actors.config import Settings
from actors.service.parking import parked_stream
from tests_support import TECH, ServiceProcess, read_outputs, run_ctxd, unmoved_input

pytestmark = pytest.mark.slow


def _send(env: dict[str, str], workflow_id: str, text: str, event_id: str, *extra: str) -> None:
    sent = run_ctxd(env, "send", workflow_id, text, "--event-id", event_id, *extra)
    assert sent.returncode == 0, sent.stderr


def test_paused_workflow_parks_events_in_order_across_sigkill_and_resumes(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """escalated → events parked (none lost over SIGKILL) → resume → parked events
    replayed in order, then the resume's own output; rollback forks an old checkpoint."""
    env = {**service_env, "CTXD_ESCALATION_PAUSES": "true"}
    workflow_id = f"{prefix}-hitl"
    out, parked = f"{prefix}:out", parked_stream(Settings(stream_prefix=prefix), workflow_id)
    service = start_service("run", env=env)
    service.wait_ready()

    _send(env, workflow_id, "ok", "e1", "--priority", "critical")
    first = read_outputs(redis, out, 1)
    assert [f["event_id"] for _, f in first] == ["e1"]
    assert first[0][1]["status"] == "escalated"
    assert first[0][1]["decision"] == "escalation_required"

    _send(env, workflow_id, TECH, "e2")
    _send(env, workflow_id, TECH + " Again.", "e3")
    assert len(read_outputs(redis, parked, 2)) == 2
    service.signal(signal.SIGKILL)
    service.wait()

    restarted = start_service("run", env=env)
    restarted.wait_ready()
    _send(env, workflow_id, TECH + " Third.", "e4")
    assert [f["event_id"] for _, f in read_outputs(redis, parked, 3)] == ["e2", "e3", "e4"]
    assert redis.xlen(out) == 1  # nothing ran while paused

    state = run_ctxd(env, "state", workflow_id)
    assert state.returncode == 0, state.stderr
    assert "PAUSED" in state.stdout
    assert "3 event(s) parked" in state.stdout

    answer = '{"decision": "standard_quality_path"}'
    resumed = run_ctxd(env, "resume", workflow_id, "--value", answer)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resume: status=ok decision=standard_quality_path" in resumed.stdout
    outputs = read_outputs(redis, out, 5)
    assert [f["event_id"] for _, f in outputs][:4] == ["e1", "e2", "e3", "e4"]
    control = outputs[4][1]
    assert control["status"] == "ok"
    assert control["decision"] == "standard_quality_path"
    assert redis.xlen(parked) == 0
    assert unmoved_input(redis, prefix) == 0

    history = run_ctxd(env, "state", workflow_id, "--history", "--limit", "100", "--json")
    assert history.returncode == 0, history.stderr
    document = json.loads(history.stdout)
    assert document["paused"] is False
    assert document["values"]["events_processed"] == 4
    assert document["values"]["decisions"][-1]["event_id"] == "e4"
    oldest = document["history"][-1]
    assert oldest["events_processed"] == 1

    rolled = run_ctxd(env, "rollback", workflow_id, "--to", oldest["checkpoint_id"])
    assert rolled.returncode == 0, rolled.stderr + rolled.stdout
    assert "rollback: status=ok" in rolled.stdout
    after = json.loads(
        run_ctxd(env, "state", workflow_id, "--history", "--limit", "100", "--json").stdout
    )
    assert after["values"]["events_processed"] == 1
    assert after["checkpoint_id"] != oldest["checkpoint_id"]  # a fork, not a rewrite
    assert {h["checkpoint_id"] for h in document["history"]} <= {
        h["checkpoint_id"] for h in after["history"]
    }  # history is kept
    assert len(read_outputs(redis, out, 6)) == 6

    bad = run_ctxd(env, "rollback", workflow_id, "--to", "no-such-checkpoint")
    assert bad.returncode == 1
    assert "rollback: status=error" in bad.stdout
    readable = run_ctxd(env, "state", workflow_id, "--history")
    assert "checkpoints (newest first)" in readable.stdout
    assert "events processed 1" in readable.stdout

    restarted.signal(signal.SIGTERM)
    assert restarted.wait() == 0


def test_service_runs_the_example_analyzer_plugin(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """CTXD_ANALYZER=examples/keyword_analyzer.py:analyze: its analysis and field land."""
    env = {**service_env, "CTXD_ANALYZER": "examples/keyword_analyzer.py:analyze"}
    workflow_id = f"{prefix}-plugin"
    service = start_service("run", env=env)
    service.wait_ready()
    text = "Outage after the deploy: errors and latency rose, rollback started. Incident open."
    _send(env, workflow_id, text, "k1")
    assert read_outputs(redis, f"{prefix}:out", 1)[0][1]["event_id"] == "k1"
    shown = run_ctxd(env, "state", workflow_id, "--json")
    assert shown.returncode == 0, shown.stderr
    values = json.loads(shown.stdout)["values"]
    assert values["analysis"].startswith("Analysis: ")
    assert "an incident is under way" in values["analysis"]
    assert values["analysis_fields"]["keywords"] >= 5
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
