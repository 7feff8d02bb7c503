"""Redis outages of any length are waited out by `ctxd run` and `ctxd worker`.

Each test starts its own Redis Stack (AOF on) on a free port, takes it away (SIGKILL,
or a graceful shutdown) and starts it again on the same port and data directory. The
service processes are real subprocesses; the verdict is actors.testing.check_history
(0 lost, 0 duplicated, 0 reordered), the processes never exit, each outage shows as
one "unavailable" and one "available again" log line per process, output resumes
within a few seconds of Redis coming back, and `ctxd status` reports the outage.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from outage_support import (
    RECOVERY_BOUND,
    OwnRedis,
    Producer,
    assert_outage_lines,
    env_for,
    output_length,
    own_redis,
    seconds_to_next_output,
    status_shows,
    stays_up,
    worker_shows,
)

from tests_support import ServiceProcess, read_outputs

pytestmark = pytest.mark.slow

__all__ = ["own_redis"]  # the fixture, used by name


@pytest.mark.timeout(300)
def test_a_60_second_outage_is_waited_out_by_run_and_worker(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    own_redis: OwnRedis,
    prefix: str,
) -> None:
    own_redis.start()
    service = env_for(own_redis)
    run = start_service("run", env=service)
    worker = start_service("worker", env=service)
    run.wait_ready()
    worker.wait_ready()
    producer = Producer(own_redis, prefix)
    producer.produce(150)
    with own_redis.client() as client:
        read_outputs(client, f"{prefix}:out", 10)  # some done, the rest in flight
    own_redis.kill()
    stays_up([run, worker], 60)
    back = own_redis.start()
    took = seconds_to_next_output(own_redis, prefix, back)
    print(f"60 s outage: first output {took:.1f} s after Redis was back")
    producer.produce(50)
    producer.verdict_and_outputs()
    assert took < RECOVERY_BOUND
    assert run.proc.poll() is None
    assert worker.proc.poll() is None
    assert_outage_lines(run, 1)
    assert_outage_lines(worker, 1)
    status_shows({**service_env, **service}, outages=1, at_least=55)
    worker_shows({**service_env, **service}, outages=1, at_least=55)
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
    service = env_for(own_redis)
    run = start_service("run", env=service)
    run.wait_ready()
    producer = Producer(own_redis, prefix)
    started = time.monotonic()
    recoveries = []
    for how in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        producer.produce(60)
        with own_redis.client() as client:
            read_outputs(client, f"{prefix}:out", output_length(own_redis, prefix) + 1)
        own_redis.kill(how)
        stays_up([run], 8)
        back = own_redis.start()
        recoveries.append(seconds_to_next_output(own_redis, prefix, back))
    assert time.monotonic() - started < 90  # three outages well within the restart window
    producer.produce(30)
    producer.verdict_and_outputs()
    print("three outages: first output after each", [f"{t:.1f} s" for t in recoveries])
    assert max(recoveries) < RECOVERY_BOUND
    assert run.proc.poll() is None
    assert_outage_lines(run, 3)
    status_shows({**service_env, **service}, outages=3, at_least=5)
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


@pytest.mark.timeout(300)
def test_redis_down_at_start_up_for_30_seconds_is_waited_for(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    own_redis: OwnRedis,
    prefix: str,
) -> None:
    service = env_for(own_redis)
    run = start_service("run", env=service)
    worker = start_service("worker", env=service)
    for process in (run, worker):
        process.wait_for_line(lambda x: "Redis unavailable" in x)
    stays_up([run, worker], 30)
    back = own_redis.start()
    run.wait_ready()
    ready = time.monotonic() - back
    producer = Producer(own_redis, prefix)
    producer.produce(100)
    took = seconds_to_next_output(own_redis, prefix, back)
    print(f"down at start-up: running {ready:.1f} s and first output {took:.1f} s after Redis")
    producer.verdict_and_outputs()
    assert took < RECOVERY_BOUND
    worker.wait_ready()
    assert run.proc.poll() is None
    assert worker.proc.poll() is None
    assert_outage_lines(run, 1)
    assert_outage_lines(worker, 1)
    status_shows({**service_env, **service}, outages=1, at_least=25)
    for process in (run, worker):
        process.signal(signal.SIGTERM)
        assert process.wait() == 0


@pytest.mark.timeout(180)
def test_max_outage_setting_exits_non_zero_with_one_line(
    start_service: Callable[..., ServiceProcess], own_redis: OwnRedis, prefix: str
) -> None:
    own_redis.start()
    run = start_service("run", env={**env_for(own_redis), "CTXD_REDIS_MAX_OUTAGE": "5"})
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
    service = {**env_for(own_redis), "CTXD_DRAIN_BUDGET": "5"}
    run = start_service("run", env=service)
    worker = start_service("worker", env=service)
    run.wait_ready()
    worker.wait_ready()
    Producer(own_redis, prefix).produce(40)
    own_redis.kill()
    # and one still starting: Redis was never there for it
    starting = start_service("run", env={**service, "CTXD_REDIS_URL": OwnRedis(own_redis.data).url})
    processes = [run, worker, starting]
    for process in processes:
        process.wait_for_line(lambda x: "Redis unavailable" in x)
    stopped = time.monotonic()
    for process in processes:
        process.signal(signal.SIGTERM)
    codes = [process.wait(timeout=30) for process in processes]
    elapsed = time.monotonic() - stopped
    print(f"SIGTERM during an outage: all stopped in {elapsed:.1f} s")
    assert codes == [0, 0, 0], [p.lines[-10:] for p in processes]
    assert elapsed < 5 + 10  # the drain budget, and process exit
