"""A running ``ctxd run`` whose stored workflow state is corrupted in Redis the way an
attacker or an older version would: the next event's output names the problem in
``error`` (the workflow rolled back, or a fresh segment), later events are normal,
nothing goes to the DLQ, and ``ctxd state [--history]`` print it without a traceback."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis
from state_corruption import CASES, checkpoint_key, inject_pickled_write

from graph.checkpointer import open_checkpointer
from tests_support import MARKET, TECH, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

PICKLED = "undecodable pickled write"
FRESH = "only checkpoint bad"


def _send(redis: Redis, prefix: str, workflow_id: str, event_id: str, text: str) -> None:
    # Event ids unique over workflows too (dedupe was global before issue 11).
    fields = {"workflow_id": workflow_id, "content": text, "event_id": f"{workflow_id}/{event_id}"}
    redis.xadd(f"{prefix}:in", fields)  # type: ignore[arg-type]


def _outputs_by_event(
    redis: Redis, prefix: str, count: int, service: ServiceProcess
) -> dict[tuple[str, str], dict[str, str]]:
    entries = read_outputs(redis, f"{prefix}:out", count, timeout_ms=90_000)
    assert len(entries) >= count, "\n".join(service.lines[-30:])
    return {(f["workflow_id"], f["event_id"].split("/")[-1]): f for _, f in entries}


async def test_corrupted_stored_state_is_recovered_by_the_running_service(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    cases = [*CASES, PICKLED, FRESH]
    workflows = {case: f"wf-{i}-{prefix}" for i, case in enumerate(cases)}
    service = start_service("run")
    service.wait_ready()

    # Two runs each (a good checkpoint, then the one to corrupt); one run for FRESH.
    for wf in workflows.values():
        _send(redis, prefix, wf, "e1", TECH)
    seen = len(workflows)
    _outputs_by_event(redis, prefix, seen, service)
    for case, wf in workflows.items():
        if case != FRESH:
            _send(redis, prefix, wf, "e2", MARKET)
            seen += 1
    outputs = _outputs_by_event(redis, prefix, seen, service)
    latest = {
        case: outputs[(wf, "e1" if case == FRESH else "e2")]["checkpoint_id"]
        for case, wf in workflows.items()
    }
    good = {case: outputs[(wf, "e1")]["checkpoint_id"] for case, wf in workflows.items()}

    marker = tmp_path / "pwned"
    for case, wf in workflows.items():
        if case == PICKLED:
            # The saver as the service opens it (under its CTXD_STREAM_PREFIX).
            async with open_checkpointer("redis", namespace=prefix, redis_url=redis_url) as saver:
                await inject_pickled_write(saver, wf, latest[case], marker)
        elif case == FRESH:
            key = checkpoint_key(redis, wf, latest[case])
            redis.json().set(key, "$.checkpoint.channel_values.window", 5)
        else:
            CASES[case][0](redis, checkpoint_key(redis, wf, latest[case]))

    expected = {case: CASES[case][1] for case in CASES}
    expected[PICKLED] = "could not be decoded"
    expected[FRESH] = "window: expected list, got int 5"

    # `ctxd state` on a bad current checkpoint: shown, marked, no traceback.
    for case, wf in workflows.items():
        shown = run_ctxd(service_env, "state", wf, "--history")
        assert shown.returncode == 0, (case, shown.stdout, shown.stderr)
        assert "Traceback" not in shown.stdout + shown.stderr
        assert "does not fit the schema" in shown.stdout, (case, shown.stdout)
        assert expected[case].split(" (")[0] in shown.stdout, (case, shown.stdout)

    for wf in workflows.values():
        _send(redis, prefix, wf, "e3", TECH)
    seen += len(workflows)
    outputs = _outputs_by_event(redis, prefix, seen, service)
    for case, wf in workflows.items():
        error = outputs[(wf, "e3")].get("error", "")
        assert expected[case] in error, (case, error)
        assert f"checkpoint {latest[case]} did not fit the schema" in error, (case, error)
        if case == FRESH:
            assert "started a fresh context segment" in error
        else:
            assert f"rolled back to checkpoint {good[case]}" in error, (case, error)

    for wf in workflows.values():
        _send(redis, prefix, wf, "e4", MARKET)
    seen += len(workflows)
    outputs = _outputs_by_event(redis, prefix, seen, service)
    for case, wf in workflows.items():
        assert outputs[(wf, "e4")].get("error", "") == "", case
        assert outputs[(wf, "e4")]["status"] in ("ok", "fallback"), case
    assert redis.xlen(f"{prefix}:dlq") == 0
    assert not marker.exists()

    for case, wf in workflows.items():
        shown = run_ctxd(service_env, "state", wf, "--history")
        assert shown.returncode == 0, (case, shown.stderr)
        assert "Traceback" not in shown.stdout + shown.stderr
        bad_lines = [x for x in shown.stdout.splitlines() if latest[case] in x]
        assert any("does not fit the schema" in x for x in bad_lines), (case, shown.stdout)
        as_json = run_ctxd(service_env, "state", wf, "--history", "--json")
        assert as_json.returncode == 0, (case, as_json.stderr)
        assert "Traceback" not in as_json.stderr

    service.signal(signal.SIGTERM)
    assert service.wait() == 0


async def test_recovery_under_the_rollback_multitask_strategy(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """CTXD_MULTITASK=rollback reads the head before the run: an undecodable one is left
    to the load check, not counted as a failed run (no DLQ)."""
    service = start_service("run", env={"CTXD_MULTITASK": "rollback"})
    service.wait_ready()
    wf = f"wf-rb-{prefix}"
    _send(redis, prefix, wf, "e1", TECH)
    first = _outputs_by_event(redis, prefix, 1, service)
    _send(redis, prefix, wf, "e2", MARKET)
    second = _outputs_by_event(redis, prefix, 2, service)
    bad = second[(wf, "e2")]["checkpoint_id"]
    marker = tmp_path / "pwned"
    async with open_checkpointer("redis", namespace=prefix, redis_url=redis_url) as saver:
        await inject_pickled_write(saver, wf, bad, marker)

    _send(redis, prefix, wf, "e3", TECH)
    _outputs_by_event(redis, prefix, 3, service)
    _send(redis, prefix, wf, "e4", TECH)  # after e3's output: rollback would interrupt e3
    outputs = _outputs_by_event(redis, prefix, 4, service)
    error = outputs[(wf, "e3")].get("error", "")
    assert "could not be decoded" in error
    assert f"rolled back to checkpoint {first[(wf, 'e1')]['checkpoint_id']}" in error
    assert outputs[(wf, "e4")].get("error", "") == ""
    assert redis.xlen(f"{prefix}:dlq") == 0
    assert not marker.exists()
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
