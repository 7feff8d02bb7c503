"""Honest outputs through the real service (issue 11, done-means 7 and 10).

Every output carries ``error``; a failed analysis is never ``status=ok``; a poison
event's DLQ entry holds the real exception (also when written after a restart); failed
``ctxd rollback`` / ``ctxd resume`` say why; a plug-in raising a BaseException subclass
crashes only its actor.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import cast

import pytest
from actor_support import TextEntries
from redis import Redis

from actors.app.cli.events import format_output
from actors.config import Settings
from actors.service.partitions import attempts_key, partition_stream
from tests_support import TECH, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

_PLUGINS = "tests/actors/plugins/boom_analyzer.py"


def _analysis_restarts(env: dict[str, str], timeout: float = 30.0) -> int:
    """The analysis pool's restarts in ``ctxd status``, once the heartbeat shows any."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(run_ctxd(env, "status", "--json").stdout)
        restarts = int(status["instances"][0]["pools"]["analysis"]["restarts"])
        if restarts or time.monotonic() > deadline:  # published once per heartbeat
            return restarts


def _by_workflow(entries: list[tuple[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    return {fields["workflow_id"]: fields for _, fields in entries}


def test_a_failed_analysis_is_not_ok_and_its_output_names_the_error(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """A plug-in raising on "boom" (actors dispatch): that event's output is not ok and
    its ``error`` names the exception; a normal event's ``error`` is empty."""
    service = start_service("run", env={"CTXD_ANALYZER": f"{_PLUGINS}:raise_on_boom"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-boom", "content": "boom went the server"})
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-fine", "content": TECH})
    outputs = _by_workflow(read_outputs(redis, f"{prefix}:out", 2))
    failed, fine = outputs["wf-boom"], outputs["wf-fine"]
    assert failed["status"] in ("fallback", "error"), failed
    assert "RuntimeError" in failed["error"], failed
    assert "the analysis backend refused the text (boom)" in failed["error"], failed
    assert float(failed["quality_score"]) == 0.0
    assert fine["error"] == ""
    assert fine["status"] != "error"
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_an_ask_time_out_is_not_ok_and_its_output_names_it(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """A plug-in slower than CTXD_ASK_TIMEOUT: every analysis ask times out."""
    env = {
        "CTXD_ANALYZER": "tests/actors/plugins/slow_analyzer.py:analyze",
        "SLOW_ANALYZER_SECONDS": "1",
        "CTXD_ASK_TIMEOUT": "0.2",
    }
    service = start_service("run", env=env)
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-slow", "content": TECH})
    output = read_outputs(redis, f"{prefix}:out", 1)[0][1]
    assert output["status"] in ("fallback", "error"), output
    assert output["error"].startswith("TimeoutError: "), output
    assert float(output["quality_score"]) == 0.0
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_failed_rollback_and_resume_print_why_and_exit_non_zero(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    service = start_service("run")
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-ctl", "content": TECH})
    read_outputs(redis, f"{prefix}:out", 1)

    rolled = run_ctxd(service_env, "rollback", "wf-ctl", "--to", "no-such-checkpoint")
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    line = rolled.stdout.splitlines()[-1]
    assert line.startswith("rollback: status=error: WorkflowError: ")
    assert "has no checkpoint 'no-such-checkpoint'" in line
    assert "ctxd state wf-ctl --history" in line

    resumed = run_ctxd(service_env, "resume", "wf-ctl")
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    line = resumed.stdout.splitlines()[-1]
    assert line.startswith("resume: status=error: WorkflowError: ")
    assert "'wf-ctl' is not paused" in line

    controls = [f for _, f in read_outputs(redis, f"{prefix}:out", 3)][1:]
    assert [f["route"] for f in controls] == ['["rollback"]', '["resume"]']
    assert all(f["status"] == "error" and f["error"] for f in controls)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_a_poison_events_dlq_entry_holds_the_plugins_exception(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """CTXD_DISPATCH=local: a plug-in's BaseException fails the run (as a PluginError);
    after CTXD_MAX_DELIVERIES runs the event is dead-lettered with that error, and the
    workflow goes on with its next event."""
    env = {
        "CTXD_DISPATCH": "local",
        "CTXD_ANALYZER": f"{_PLUGINS}:base_exception_on_boom",
        "CTXD_MAX_DELIVERIES": "2",
    }
    service = start_service("run", env=env)
    service.wait_ready()
    poison = redis.xadd(f"{prefix}:in", {"workflow_id": "wf-p", "content": "boom, again"})
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-p", "content": TECH})
    dead = read_outputs(redis, f"{prefix}:dlq", 1)
    assert len(dead) == 1
    entry = dead[0][1]
    assert (entry["source_id"], entry["reason"], entry["attempts"]) == (poison, "poison", "2")
    assert entry["error"].startswith("failed 2 times (limit 2); last error: PluginError: ")
    assert "Boom: the plug-in blew up on boom" in entry["error"]
    assert "see the service log" not in entry["error"]
    after = read_outputs(redis, f"{prefix}:out", 1)
    assert after[0][1]["workflow_id"] == "wf-p"
    assert after[0][1]["error"] == ""
    assert service.proc.poll() is None  # still serving
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_a_dlq_entry_written_after_a_restart_still_says_what_failed(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """Entries an earlier process ran and failed (attempts recorded in Redis) are
    dead-lettered by the next one: with the recorded error, or, when the runs ended
    with the process, saying so."""
    layout = Settings(stream_prefix=prefix, partitions=1)
    stream, attempts = partition_stream(layout, 0), attempts_key(layout, 0)
    # A decoding client: the ids are text.
    raised = cast(str, redis.xadd(stream, {"workflow_id": "wf-r1", "content": "raised"}))
    died = cast(str, redis.xadd(stream, {"workflow_id": "wf-r2", "content": "died"}))
    redis.xgroup_create(stream, "ctxd", id="0", mkstream=True)
    redis.xreadgroup("ctxd", "owner", {stream: ">"}, count=10)  # pending with the owner
    redis.hset(
        attempts,
        mapping={
            f"0/{raised}": 5,
            f"0/{raised}/error": "TimeoutError: the run did not finish within 5s",
            f"0/{died}": 5,
        },
    )
    service = start_service("run", env={"CTXD_PARTITIONS": "1"})
    service.wait_ready()
    dead = {f["source_id"]: f for _, f in read_outputs(redis, f"{prefix}:dlq", 2)}
    assert dead[raised]["reason"] == dead[died]["reason"] == "poison"
    assert dead[raised]["error"] == (
        "failed 5 times (limit 5); last error: TimeoutError: the run did not finish within 5s"
    )
    assert dead[died]["error"].startswith(
        "the run did not finish in 5 attempts (limit 5): the process stopped"
    )
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_a_plugin_base_exception_restarts_only_its_actor(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """``class Boom(BaseException)`` from the plug-in: the analysis worker crashes and is
    restarted (log line, ``ctxd status``), once per bad request: its redelivery is
    dead-lettered with the crash, and the asker told. ``ctxd run`` keeps running, the
    event's output names the PluginError, other events get their outputs."""
    env = {"CTXD_ANALYZER": f"{_PLUGINS}:base_exception_on_boom"}
    service = start_service("run", env=env)
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-b", "content": "boom says the plug-in"})
    restarted = service.wait_for_line(lambda line: '"actor restarted"' in line)
    assert json.loads(restarted)["error_type"] == "PluginError"
    crashed = service.wait_for_line(lambda line: "analyzer plug-in crashed its worker" in line)
    assert "Boom: the plug-in blew up on boom" in crashed
    for name in ("wf-c", "wf-d"):
        redis.xadd(f"{prefix}:in", {"workflow_id": name, "content": TECH})
    outputs = _by_workflow(read_outputs(redis, f"{prefix}:out", 3))
    assert set(outputs) == {"wf-b", "wf-c", "wf-d"}
    assert outputs["wf-b"]["status"] in ("fallback", "error")
    assert "it crashed its worker: PluginError: " in outputs["wf-b"]["error"]
    assert outputs["wf-c"]["error"] == outputs["wf-d"]["error"] == ""
    dead = [f for _, f in cast(TextEntries, redis.xrange(f"{prefix}:dlq"))]
    assert [(f["kind"], f["reason"], f["attempts"]) for f in dead] == [("analysis", "poison", "2")]
    assert "Boom: the plug-in blew up on boom" in dead[0]["error"]
    assert service.proc.poll() is None
    assert _analysis_restarts(service_env) == 1
    assert sum('"actor restarted"' in line for line in service.lines) == 1
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    assert not any("ExceptionGroup" in line for line in service.lines)


def test_tail_shows_an_outputs_error() -> None:
    """``ctxd tail`` prints a failed step's error after the route; nothing when empty."""
    fields = {"workflow_id": "w", "event_id": "e1", "status": "fallback", "route": "[]"}
    failed = format_output("1700000000000-0", {**fields, "error": "TimeoutError: no reply"})
    assert failed.endswith(" error: TimeoutError: no reply")
    assert "error:" not in format_output("1700000000000-0", {**fields, "error": ""})
