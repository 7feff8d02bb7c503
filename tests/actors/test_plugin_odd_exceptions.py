"""Analyzer plug-ins that raise what looks like cancellation, against a running
``ctxd run`` (found by the adversary review of issue 11).

A plug-in raising ``asyncio.CancelledError`` when nothing cancelled it (a client
library's own timeout leaking it) is a plug-in failure like any other: it crashes only
its actor. It used to end the worker silently; the supervisor restarted it, the request
came back, and after three restarts within 30 s ``ctxd run`` gave up and exited 1.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
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
    dead = [f for _, f in redis.xrange(f"{prefix}:dlq")]
    assert [(f["kind"], f["reason"]) for f in dead] == [("analysis", "poison")]
    assert "CancelledError" in dead[0]["error"]
    assert service.proc.poll() is None
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
