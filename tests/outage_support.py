"""Helpers of the Redis outage and pressure tests: a Redis of the test's own that can go
away and come back on its port, a producer that checks the history at the end, and
checks of the service's outage log lines and `ctxd status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis
from redis_helpers import free_port, start_redis

from actors.testing import check_history
from tests_support import ServiceProcess, read_outputs, run_ctxd

RECOVERY_BOUND = 20.0
"""Seconds from Redis being back to the next output (generous: the machine is loaded)."""


@dataclass
class OwnRedis:
    """A Redis Stack of the test's own that can go away and come back on its port."""

    data: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> float:
        """Start it (same port, same data); return when it was ready (monotonic)."""
        self.proc = start_redis(self.data, self.port)
        return time.monotonic()

    def kill(self, signum: signal.Signals = signal.SIGKILL) -> None:
        """SIGKILL (a crash) or SIGTERM (a graceful shutdown, AOF flushed)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signum)
        self.proc.wait(timeout=30)
        self.proc = None

    def client(self) -> Redis:
        return Redis.from_url(self.url, decode_responses=True, socket_timeout=60)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of the test's own, killed after the test if it still runs."""
    server = OwnRedis(tmp_path / "redis")
    yield server
    if server.proc is not None:
        server.kill()


class Producer:
    """Appends events to `{prefix}:in`, on disk before it goes on (WAITAOF)."""

    def __init__(self, server: OwnRedis, prefix: str) -> None:
        self.server, self.prefix = server, prefix
        self.inputs: list[tuple[str, str]] = []

    def produce(self, count: int) -> None:
        with self.server.client() as client:
            for _ in range(count):
                i = len(self.inputs)
                wf, event_id = f"wf-{i % 10}", f"ev-{i:04d}"
                client.xadd(f"{self.prefix}:in", {"workflow_id": wf, "event_id": event_id,
                                                  "content": f"event {i} of {wf}"})  # fmt: skip
                self.inputs.append((wf, event_id))
            client.execute_command("WAITAOF", 1, 0, 5000)

    def verdict_and_outputs(self, timeout_ms: int = 120_000) -> list[dict[str, str]]:
        with self.server.client() as client:
            outputs = read_outputs(
                client, f"{self.prefix}:out", len(self.inputs), timeout_ms=timeout_ms
            )
            dead = [f.get("event_id", "") for _, f in client.xrange(f"{self.prefix}:dlq")]
        fields = [f for _, f in outputs]
        verdict = check_history(
            self.inputs, [(f["workflow_id"], f["event_id"]) for f in fields], dead
        )
        assert verdict.ok, verdict
        assert dead == []
        return fields


def output_length(server: OwnRedis, prefix: str) -> int:
    with server.client() as client:
        return int(client.xlen(f"{prefix}:out"))


def seconds_to_next_output(server: OwnRedis, prefix: str, back_at: float) -> float:
    """Seconds from ``back_at`` until an output beyond those already there arrives."""
    with server.client() as client:
        before = int(client.xlen(f"{prefix}:out"))
        got = read_outputs(client, f"{prefix}:out", before + 1, timeout_ms=60_000)
    assert len(got) > before, "no output after Redis came back"
    return time.monotonic() - back_at


def stays_up(processes: list[ServiceProcess], seconds: float) -> None:
    """The outage itself: ``seconds`` pass, and no process exits meanwhile."""
    deadline = time.monotonic() + seconds
    for process in processes:
        with pytest.raises(subprocess.TimeoutExpired):
            process.proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def count(process: ServiceProcess, text: str) -> int:
    return sum(1 for line in process.lines if text in line)


def assert_outage_lines(process: ServiceProcess, outages: int) -> None:
    down = count(process, "Redis unavailable")
    back = count(process, "Redis available again")
    assert (down, back) == (outages, outages), "\n".join(process.lines[-60:])


def status_shows(env: dict[str, str], outages: int, at_least: float) -> dict[str, object]:
    """`ctxd status --json` once the heartbeat reports the finished outage(s)."""
    deadline = time.monotonic() + 30
    while True:
        result = run_ctxd(env, "status", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        info: dict[str, object] = {}
        for instance in doc["instances"]:
            info = instance.get("redis") or {}
            if info.get("outages") == outages and info.get("available"):
                break
        if info.get("outages") == outages and info.get("available"):
            break
        assert time.monotonic() < deadline, doc["instances"]
        time.sleep(0.5)  # the next heartbeat: a third of the lease TTL away
    last_seconds = info["last_seconds"]
    assert isinstance(last_seconds, int | float), info
    assert last_seconds >= at_least, info
    text = run_ctxd(env, "status")
    assert f"redis outages: {outages}" in text.stdout, text.stdout
    return info


def worker_shows(env: dict[str, str], outages: int, at_least: float) -> dict[str, object]:
    """`ctxd status --json` once a ``ctxd worker``'s heartbeat reports the outage(s)."""
    deadline = time.monotonic() + 30
    while True:
        result = run_ctxd(env, "status", "--json")
        assert result.returncode == 0, result.stderr
        workers = json.loads(result.stdout)["workers"]
        info = next(
            (
                w["redis"]
                for w in workers
                if w["redis"]["outages"] == outages and w["redis"]["available"]
            ),
            None,
        )
        if info is not None:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)  # the next heartbeat: a third of the lease TTL away
    last_seconds = info["last_seconds"]
    assert isinstance(last_seconds, int | float), info
    assert last_seconds >= at_least, info
    text = run_ctxd(env, "status")
    assert "workers: 1" in text.stdout, text.stdout
    assert f"redis outages: {outages}" in text.stdout.split("workers:", 1)[1], text.stdout
    return dict(info)


def env_for(server: OwnRedis) -> dict[str, str]:
    return {
        "CTXD_REDIS_URL": server.url,
        "CTXD_WAIT_AOF": "true",
        "CTXD_LEASE_TTL": "3",
        "CTXD_PARTITIONS": "4",
        "CTXD_BATCH_SIZE": "4",
    }
