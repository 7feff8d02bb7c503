"""``ctxd resume``/``ctxd rollback`` whose control entry the service dead-letters (found
by the adversary review of issue 11): it waited out ``--wait``, printed "no result yet:
the service applies it when it reads the entry" and exited 0, though the entry was
refused at once. It must print why (the DLQ entry's reason and error) and exit 1."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from redis import Redis

from tests_support import TECH, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow


def test_a_dead_lettered_resume_or_rollback_says_why_and_exits_non_zero(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    service = start_service("run")
    service.wait_ready()
    redis.xadd(f"{prefix}:in", {"workflow_id": "wf-ctl", "content": TECH})
    read_outputs(redis, f"{prefix}:out", 1)

    deep = json.dumps([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]])
    resumed = run_ctxd(service_env, "resume", "wf-ctl", "--value", deep, "--wait", "60")
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    line = resumed.stdout.splitlines()[-1]
    assert line.startswith("resume: refused (invalid_value): "), line
    assert "nested 33 levels" in line

    rolled = run_ctxd(service_env, "rollback", "wf-ctl", "--to", "not a checkpoint", "--wait", "60")
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    line = rolled.stdout.splitlines()[-1]
    assert line.startswith("rollback: refused (invalid_checkpoint_id): "), line
    assert "no result yet" not in rolled.stdout
    assert redis.xlen(f"{prefix}:dlq") == 2
    assert service.proc.poll() is None
