"""Redis (AOF on) killed with SIGKILL and restarted mid-run: the service reconnects with
backoff (same process, no exit) and nothing acknowledged is lost — every input the
producer had confirmed on disk (WAITAOF) gets exactly one output, and every output a
reader saw before the crash is still there afterwards (the service uses
CTXD_WAIT_AOF=true, so it acknowledges only what is on disk)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from actor_support import TextEntries
from redis import Redis
from redis_helpers import free_port, start_redis

from actors.testing import check_history
from tests_support import ServiceProcess, read_outputs

pytestmark = pytest.mark.slow

EVENTS = 300


@pytest.mark.timeout(240)
def test_redis_sigkill_and_restart_loses_nothing_acknowledged(
    start_service: Callable[..., ServiceProcess], tmp_path: Path, prefix: str
) -> None:
    """SIGKILL Redis after some outputs, restart it on its AOF: all events done once."""
    port = free_port()
    data = tmp_path / "redis"
    server = start_redis(data, port)
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url, decode_responses=True, socket_timeout=60)
    try:
        service = start_service(
            "run",
            env={
                "CTXD_REDIS_URL": url,
                "CTXD_WAIT_AOF": "true",
                "CTXD_LEASE_TTL": "3",
                "CTXD_PARTITIONS": "4",
                "CTXD_BATCH_SIZE": "4",
            },
        )
        service.wait_ready()
        inputs: list[tuple[str, str]] = []

        def produce(start: int, stop: int) -> None:
            for i in range(start, stop):
                wf, event_id = f"wf-{i % 10}", f"ev-{i:04d}"
                client.xadd(f"{prefix}:in", {"workflow_id": wf, "event_id": event_id,
                                             "content": f"event {i} of {wf}"})  # fmt: skip
                inputs.append((wf, event_id))
            client.execute_command("WAITAOF", 1, 0, 5000)  # type: ignore[no-untyped-call]

        produce(0, EVENTS // 2)
        seen_before = read_outputs(client, f"{prefix}:out", 60)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        server = start_redis(data, port)
        client.close()
        client = Redis.from_url(url, decode_responses=True, socket_timeout=60)
        produce(EVENTS // 2, EVENTS)

        outputs = read_outputs(client, f"{prefix}:out", EVENTS, timeout_ms=150000)
        assert service.proc.poll() is None, "the service exited instead of reconnecting"
        assert len(seen_before) < EVENTS // 2, "the kill came after the first half was done"
        out_ids = {entry_id for entry_id, _ in outputs}
        assert {entry_id for entry_id, _ in seen_before} <= out_ids, "a seen output was lost"
        dead = [f.get("event_id", "") for _, f in cast(TextEntries, client.xrange(f"{prefix}:dlq"))]
        verdict = check_history(
            inputs, [(f["workflow_id"], f["event_id"]) for _, f in outputs], dead
        )
        assert verdict.ok, verdict
        assert dead == []
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)
