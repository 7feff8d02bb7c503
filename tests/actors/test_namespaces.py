"""Two deployments with different ``CTXD_STREAM_PREFIX`` on one Redis share nothing:
not streams, not dedupe keys, not checkpoints (DESIGN.md, "Revisions 2026-11-28")."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from redis import Redis

from tests_support import ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow


def test_two_prefixes_on_one_redis_never_see_each_others_state(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """The same workflow id in two deployments: each state counts only its own events,
    and every key either deployment wrote lives under its own prefix."""
    other = f"{prefix}b"
    env_a = service_env
    env_b = {**service_env, "CTXD_STREAM_PREFIX": other}
    a = start_service("run", env={"CTXD_PARTITIONS": "2"})
    b = start_service("run", env={"CTXD_STREAM_PREFIX": other, "CTXD_PARTITIONS": "2"})
    a.wait_ready()
    b.wait_ready()
    for i in range(3):
        redis.xadd(f"{prefix}:in", {"workflow_id": "wf-shared", "content": f"a event {i}"})
    for i in range(2):
        redis.xadd(f"{other}:in", {"workflow_id": "wf-shared", "content": f"b event {i}"})
    assert len(read_outputs(redis, f"{prefix}:out", 3)) == 3
    assert len(read_outputs(redis, f"{other}:out", 2)) == 2

    for env, expected in ((env_a, 3), (env_b, 2)):
        shown = run_ctxd(env, "state", "wf-shared", "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["values"]["events_processed"] == expected

    # No checkpoint key outside the prefixes for this workflow id.
    stray = [
        key
        for key in redis.scan_iter(match="*wf-shared*", count=1000)
        if not key.startswith((f"{prefix}:", f"{other}:"))
    ]
    assert stray == []
    assert any(k.startswith(f"{prefix}:checkpoint:") for k in redis.scan_iter(f"{prefix}:*"))
    assert any(k.startswith(f"{other}:checkpoint:") for k in redis.scan_iter(f"{other}:*"))
