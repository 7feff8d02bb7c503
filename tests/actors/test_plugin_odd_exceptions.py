"""Analyzer plug-ins that raise what looks like cancellation, against a running
``ctxd run`` (found by the adversary review of issue 11).

A plug-in raising ``asyncio.CancelledError`` when nothing cancelled it (a client
library's own timeout leaking it) is a plug-in failure like any other: it crashes only
its actor. It used to end the worker silently; the supervisor restarted it, the request
came back, and after three restarts within 30 s ``ctxd run`` gave up and exited 1.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from actor_support import TextEntries
from redis import Redis

from tests_support import TECH, ServiceProcess, read_outputs

pytestmark = pytest.mark.slow

_PLUGINS = Path(__file__).parent / "plugins" / "odd_analyzer.py"


def test_a_plugins_own_cancelled_error_crashes_only_its_actor(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    service = start_service("run", env={"CTXD_ANALYZER": f"{_PLUGINS}:stray_cancel"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-x", "content": "please cancelme now"})
    for name in ("wf-c", "wf-d"):
        redis.xadd(f"{prefix}:in", {"workflow_id": name, "content": TECH})
    outputs = {f["workflow_id"]: f for _, f in read_outputs(redis, f"{prefix}:out", 3)}
    assert set(outputs) == {"wf-x", "wf-c", "wf-d"}, "\n".join(service.lines[-20:])
    assert outputs["wf-x"]["status"] in ("fallback", "error")
    assert "CancelledError" in outputs["wf-x"]["error"]
    assert outputs["wf-c"]["error"] == outputs["wf-d"]["error"] == ""
    dead = [f for _, f in cast(TextEntries, redis.xrange(f"{prefix}:dlq"))]
    assert [(f["kind"], f["reason"]) for f in dead] == [("analysis", "poison")]
    assert "CancelledError" in dead[0]["error"]
    assert service.proc.poll() is None
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_a_plugin_result_that_cannot_be_stored_is_a_failed_step_not_poison(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """An analysis holding a lone surrogate could not be written to Redis: the whole
    run failed CTXD_MAX_DELIVERIES times and the event went to the DLQ as poison, with
    a UnicodeEncodeError that does not say the plug-in returned it. A result outside the
    plug-in contract is a failed analysis step instead: an output naming it."""
    service = start_service("run", env={"CTXD_ANALYZER": f"{_PLUGINS}:lone_surrogate"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-s", "content": "a surrogate please"})
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-s", "content": TECH, "event_id": "next"})
    outputs = [f for _, f in read_outputs(redis, f"{prefix}:out", 2, timeout_ms=60_000)]
    assert len(outputs) == 2, "\n".join(service.lines[-10:])
    first = outputs[0]
    assert first["status"] in ("fallback", "error")
    assert "plug-in" in first["error"]
    assert "surrogate" in first["error"]
    assert outputs[1]["error"] == ""
    assert redis.xlen(f"{prefix}:dlq") == 0
    assert not any("workflow run failed" in line for line in service.lines)


@pytest.mark.parametrize("word", ["number", "setfield", "nanfield", "plaindict"])
def test_a_plugin_result_of_the_wrong_type_is_a_failed_step_naming_it(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str, word: str
) -> None:
    service = start_service("run", env={"CTXD_ANALYZER": f"{_PLUGINS}:wrong_types"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-t", "content": f"give me a {word}"})
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-t", "content": TECH, "event_id": "next"})
    outputs = [f for _, f in read_outputs(redis, f"{prefix}:out", 2, timeout_ms=60_000)]
    assert len(outputs) == 2, "\n".join(service.lines[-10:])
    assert outputs[0]["status"] in ("fallback", "error"), outputs[0]
    assert "analyzer plug-in returned" in outputs[0]["error"], outputs[0]["error"]
    assert outputs[1]["error"] == ""
    assert redis.xlen(f"{prefix}:dlq") == 0


def _outputs_or_exit(
    redis: Redis, prefix: str, service: ServiceProcess, count: int
) -> list[dict[str, str]]:
    """The outputs once ``count`` are there, or what there is when the process exited."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and service.proc.poll() is None:
        if redis.xlen(f"{prefix}:out") >= count:
            break
        time.sleep(0.1)  # polling two conditions (an output, the exit) with a deadline
    return [f for _, f in cast(TextEntries, redis.xrange(f"{prefix}:out"))]


@pytest.mark.parametrize(
    ("function", "word"),
    [("exits", "exitnow"), ("interrupts", "ctrlc"), ("group_with_interrupt", "grouped")],
)
def test_a_plugins_system_exit_or_keyboard_interrupt_crashes_only_its_actor(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
    function: str,
    word: str,
) -> None:
    service = start_service("run", env={"CTXD_ANALYZER": f"{_PLUGINS}:{function}"})
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-e", "content": f"now {word} please"})
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-f", "content": TECH})
    outputs = _outputs_or_exit(redis, prefix, service, 2)
    assert service.proc.poll() is None, f"ctxd run exited {service.proc.returncode}"
    assert len(outputs) == 2
    assert "PluginError" in "".join(f["error"] for f in outputs)
