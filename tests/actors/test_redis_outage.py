"""Redis outages of any length are waited out by `ctxd run` and `ctxd worker`.

Each test starts its own Redis Stack (AOF on) on a free port, takes it away (SIGKILL,
or a graceful shutdown) and starts it again on the same port and data directory. The
service processes are real subprocesses; the verdict is tests/history.check_history
(0 lost, 0 duplicated, 0 reordered), the processes never exit, each outage shows as
one "unavailable" and one "available again" log line per process, output resumes
within a few seconds of Redis coming back, and `ctxd status` reports the outage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from history import check_history
from redis import Redis
from redis_helpers import free_port, start_redis

from tests_support import ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

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


def _output_length(server: OwnRedis, prefix: str) -> int:
    with server.client() as client:
        return int(client.xlen(f"{prefix}:out"))


def _seconds_to_next_output(server: OwnRedis, prefix: str, back_at: float) -> float:
    """Seconds from ``back_at`` until an output beyond those already there arrives."""
    with server.client() as client:
        before = int(client.xlen(f"{prefix}:out"))
        got = read_outputs(client, f"{prefix}:out", before + 1, timeout_ms=60_000)
    assert len(got) > before, "no output after Redis came back"
    return time.monotonic() - back_at


def _stays_up(processes: list[ServiceProcess], seconds: float) -> None:
    """The outage itself: ``seconds`` pass, and no process exits meanwhile."""
    deadline = time.monotonic() + seconds
    for process in processes:
        with pytest.raises(subprocess.TimeoutExpired):
            process.proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _count(process: ServiceProcess, text: str) -> int:
    return sum(1 for line in process.lines if text in line)


def _assert_outage_lines(process: ServiceProcess, outages: int) -> None:
    down = _count(process, "Redis unavailable")
    back = _count(process, "Redis available again")
    assert (down, back) == (outages, outages), "\n".join(process.lines[-60:])


def _status_shows(env: dict[str, str], outages: int, at_least: float) -> dict[str, object]:
    """`ctxd status --json` once the heartbeat reports the finished outage(s)."""
    deadline = time.monotonic() + 30
    while True:
        result = run_ctxd(env, "status", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        info = {}
        for instance in doc["instances"]:
            info = instance.get("redis") or {}
            if info.get("outages") == outages and info.get("available"):
                break
        if info.get("outages") == outages and info.get("available"):
            break
        assert time.monotonic() < deadline, doc["instances"]
        time.sleep(0.5)  # the next heartbeat: a third of the lease TTL away
    assert float(info["last_seconds"]) >= at_least, info
    text = run_ctxd(env, "status")
    assert f"redis outages: {outages}" in text.stdout, text.stdout
    return info


def _env(server: OwnRedis) -> dict[str, str]:
    return {
        "CTXD_REDIS_URL": server.url,
        "CTXD_WAIT_AOF": "true",
        "CTXD_LEASE_TTL": "3",
        "CTXD_PARTITIONS": "4",
        "CTXD_BATCH_SIZE": "4",
    }


@pytest.mark.timeout(300)
def test_a_60_second_outage_is_waited_out_by_run_and_worker(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    own_redis: OwnRedis,
    prefix: str,
) -> None:
    own_redis.start()
    env = _env(own_redis)
    run = start_service("run", env=env)
    worker = start_service("worker", env=env)
    run.wait_ready()
    worker.wait_ready()
    producer = Producer(own_redis, prefix)
    producer.produce(150)
    with own_redis.client() as client:
        read_outputs(client, f"{prefix}:out", 10)  # some done, the rest in flight
    own_redis.kill()
    _stays_up([run, worker], 60)
    back = own_redis.start()
    took = _seconds_to_next_output(own_redis, prefix, back)
    print(f"60 s outage: first output {took:.1f} s after Redis was back")
    producer.produce(50)
    producer.verdict_and_outputs()
    assert took < RECOVERY_BOUND
    assert run.proc.poll() is None
    assert worker.proc.poll() is None
    _assert_outage_lines(run, 1)
    _assert_outage_lines(worker, 1)
    _status_shows({**service_env, **env}, outages=1, at_least=55)
    for process in (run, worker):
        process.signal(signal.SIGTERM)
        assert process.wait() == 0


@pytest.mark.timeout(300)
def test_three_outages_within_a_minute_are_waited_out(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    own_redis: OwnRedis,
    prefix: str,
) -> None:
    own_redis.start()
    env = _env(own_redis)
    run = start_service("run", env=env)
    run.wait_ready()
    producer = Producer(own_redis, prefix)
    started = time.monotonic()
    recoveries = []
    for how in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        producer.produce(60)
        with own_redis.client() as client:
            read_outputs(client, f"{prefix}:out", _output_length(own_redis, prefix) + 1)
        own_redis.kill(how)
        _stays_up([run], 8)
        back = own_redis.start()
        recoveries.append(_seconds_to_next_output(own_redis, prefix, back))
    assert time.monotonic() - started < 90  # three outages well within the restart window
    producer.produce(30)
    producer.verdict_and_outputs()
    print("three outages: first output after each", [f"{t:.1f} s" for t in recoveries])
    assert max(recoveries) < RECOVERY_BOUND
    assert run.proc.poll() is None
    _assert_outage_lines(run, 3)
    _status_shows({**service_env, **env}, outages=3, at_least=5)
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


@pytest.mark.timeout(300)
def test_redis_down_at_start_up_for_30_seconds_is_waited_for(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    own_redis: OwnRedis,
    prefix: str,
) -> None:
    env = _env(own_redis)
    run = start_service("run", env=env)
    worker = start_service("worker", env=env)
    for process in (run, worker):
        process.wait_for_line(lambda x: "Redis unavailable" in x)
    _stays_up([run, worker], 30)
    back = own_redis.start()
    run.wait_ready()
    ready = time.monotonic() - back
    producer = Producer(own_redis, prefix)
    producer.produce(100)
    took = _seconds_to_next_output(own_redis, prefix, back)
    print(f"down at start-up: running {ready:.1f} s and first output {took:.1f} s after Redis")
    producer.verdict_and_outputs()
    assert took < RECOVERY_BOUND
    worker.wait_ready()
    assert run.proc.poll() is None
    assert worker.proc.poll() is None
    _assert_outage_lines(run, 1)
    _assert_outage_lines(worker, 1)
    _status_shows({**service_env, **env}, outages=1, at_least=25)
    for process in (run, worker):
        process.signal(signal.SIGTERM)
        assert process.wait() == 0


@pytest.mark.timeout(180)
def test_max_outage_setting_exits_non_zero_with_one_line(
    start_service: Callable[..., ServiceProcess], own_redis: OwnRedis, prefix: str
) -> None:
    own_redis.start()
    run = start_service("run", env={**_env(own_redis), "CTXD_REDIS_MAX_OUTAGE": "5"})
    run.wait_ready()
    Producer(own_redis, prefix).produce(20)
    own_redis.kill()
    killed = time.monotonic()
    code = run.wait(timeout=60)
    elapsed = time.monotonic() - killed
    print(f"CTXD_REDIS_MAX_OUTAGE=5: exited {elapsed:.1f} s after Redis went away")
    assert code == 1
    assert 5 <= elapsed < 30
    plain = [line for line in run.lines if not line.startswith("{")]
    assert len(plain) == 1, plain
    assert plain[0].startswith("ctxd: Redis has been unavailable for more than")
    assert "CTXD_REDIS_MAX_OUTAGE=5" in plain[0]


@pytest.mark.timeout(180)
def test_sigterm_during_an_outage_stops_promptly(
    start_service: Callable[..., ServiceProcess], own_redis: OwnRedis, prefix: str
) -> None:
    own_redis.start()
    env = {**_env(own_redis), "CTXD_DRAIN_BUDGET": "5"}
    run = start_service("run", env=env)
    worker = start_service("worker", env=env)
    run.wait_ready()
    worker.wait_ready()
    Producer(own_redis, prefix).produce(40)
    own_redis.kill()
    for process in (run, worker):
        process.wait_for_line(lambda x: "Redis unavailable" in x)
    stopped = time.monotonic()
    for process in (run, worker):
        process.signal(signal.SIGTERM)
    codes = [process.wait(timeout=30) for process in (run, worker)]
    elapsed = time.monotonic() - stopped
    print(f"SIGTERM during an outage: both stopped in {elapsed:.1f} s")
    assert codes == [0, 0], run.lines[-20:]
    assert elapsed < 5 + 10  # the drain budget, and process exit
