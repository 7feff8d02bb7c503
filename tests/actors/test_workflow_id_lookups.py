"""Valid but awkward workflow ids against a running ``ctxd run``: the checkpoint
lookups by workflow (``ctxd state --history``, the search for the last good checkpoint
when a stored state does not fit) find exactly that workflow's checkpoints.

RediSearch tag queries are case-insensitive and ``@thread_id:{_}`` is a syntax error,
so a lookup through the saver's search index for ``_`` failed, and one for ``acme``
also returned the checkpoints of ``ACME`` (found by the adversary review of issue 11).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from redis import Redis
from state_corruption import checkpoint_key

from tests_support import MARKET, TECH, ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow


def _send(redis: Redis, prefix: str, workflow_id: str, event_id: str, text: str) -> None:
    redis.xadd(f"{prefix}:in", {"workflow_id": workflow_id, "content": text, "event_id": event_id})


def _wait(
    redis: Redis, prefix: str, count: int, service: ServiceProcess
) -> dict[tuple[str, str], dict[str, str]]:
    entries = read_outputs(redis, f"{prefix}:out", count, timeout_ms=120_000)
    assert len(entries) >= count, "\n".join(service.lines[-30:])
    return {(f["workflow_id"], f["event_id"]): f for _, f in entries}


def _history_ids(env: dict[str, str], workflow_id: str) -> list[str]:
    shown = run_ctxd(env, "state", "--history", "--limit", "1000", "--json", "--", workflow_id)
    assert shown.returncode == 0, (workflow_id, shown.stdout[-500:], shown.stderr[-500:])
    assert "Traceback" not in shown.stderr
    return [str(item["checkpoint_id"]) for item in json.loads(shown.stdout)["history"]]


def test_checkpoint_lookups_by_workflow_are_exact(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    service = start_service("run")
    service.wait_ready()
    # Two runs each: a good checkpoint, then the current one (corrupted below).
    for wf in ("_", "acme"):
        _send(redis, prefix, wf, "e1", TECH)
    outputs = _wait(redis, prefix, 2, service)
    for wf in ("_", "acme"):
        _send(redis, prefix, wf, "e2", MARKET)
    outputs = _wait(redis, prefix, 4, service)
    good = {wf: outputs[(wf, "e1")]["checkpoint_id"] for wf in ("_", "acme")}
    latest = {wf: outputs[(wf, "e2")]["checkpoint_id"] for wf in ("_", "acme")}
    # A busy workflow whose id differs only in case: its checkpoints are all newer,
    # more of them than the search for a good checkpoint looks at (200).
    busy = 30
    for i in range(busy):
        _send(redis, prefix, "ACME", f"b{i}", TECH if i % 2 else MARKET)
    outputs = _wait(redis, prefix, 4 + busy, service)
    other = {f["checkpoint_id"] for (wf, _), f in outputs.items() if wf == "ACME"}

    for wf in ("_", "acme"):
        ids = _history_ids(service_env, wf)
        assert {good[wf], latest[wf]} <= set(ids), (wf, ids[:5])
        assert not other & set(ids), f"{wf}: history shows ACME's checkpoints"

    for wf in ("_", "acme"):
        redis.json().set(
            checkpoint_key(redis, wf, latest[wf]), "$.checkpoint.channel_values.window", 5
        )
        _send(redis, prefix, wf, "e3", TECH)
    outputs = _wait(redis, prefix, 6 + busy, service)
    for wf in ("_", "acme"):
        error = outputs[(wf, "e3")].get("error", "")
        assert f"rolled back to checkpoint {good[wf]}" in error, (wf, error[:300])
    assert redis.xlen(f"{prefix}:dlq") == 0
    assert service.proc.poll() is None
