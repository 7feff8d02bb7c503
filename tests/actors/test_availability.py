"""The Redis availability monitor: which errors are outages, one log line per change of
state, waiters released when Redis is back, the max-outage limit, and outages kept out
of breakers and actor restarts. Real Redis servers, started and killed here."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
import structlog
from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_helpers import free_port, start_redis

from actors.config import Settings
from actors.runtime.availability import (
    RedisAvailability,
    RedisOutageError,
    RedisUnavailableError,
    is_out_of_memory,
    is_outage,
    is_transient,
    quiet_library_outage_logs,
)
from actors.service.connections import pool_size
from actors.service.dispatch import breaker_config
from graph.errors import RedisModulesMissingError
from graph.work import WorkKind


def _caused(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "error",
    [
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused."),
        RedisTimeoutError("Timeout reading from socket"),
        BusyLoadingError("Redis is loading the dataset in memory"),
        ReadOnlyError("You can't write against a read only replica."),
        MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        TryAgainError("Multiple keys request during rehashing of slot"),
        ClusterDownError("The cluster is down"),
        ResponseError("LOADING Redis is loading the dataset in memory"),
        MaxConnectionsError("Too many connections"),
        RedisUnavailableError("no reply while Redis was unavailable"),
        _caused(RedisModulesMissingError("cannot list modules"), RedisConnectionError("refused")),
        ExceptionGroup("run", [ValueError("x"), RedisConnectionError("reset")]),
    ],
    ids=lambda e: type(e).__name__,
)
def test_outages_are_transient(error: Exception) -> None:
    assert is_transient(error)
    assert is_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        AuthenticationError("invalid username-password pair"),
        NoPermissionError("this user has no permissions to run the 'xadd' command"),
        _caused(RedisModulesMissingError("cannot list modules"), AuthenticationError("WRONGPASS")),
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        RedisConnectionError(
            "Error 1 connecting to 127.0.0.1:6390. [SSL: CERTIFICATE_VERIFY_FAILED] "
            "certificate verify failed: self-signed certificate (_ssl.c:1006)."
        ),
        _caused(RedisConnectionError("Error 1 connecting"), ssl.SSLCertVerificationError(1)),
        TimeoutError("event timeout"),
        ConnectionError("analysis backend unreachable"),
        ValueError("bad input"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_authentication_acl_and_other_errors_are_not_outages(error: Exception) -> None:
    assert not is_outage(error)


def test_out_of_memory_is_an_outage_not_a_transient_connection_error() -> None:
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    in_script = ResponseError(
        "Error in script: OOM command not allowed when used memory > 'maxmemory'."
    )
    assert is_out_of_memory(oom)
    assert is_out_of_memory(in_script)
    assert is_outage(oom)
    assert is_outage(in_script)
    assert not is_out_of_memory(RedisConnectionError("refused"))


def test_breakers_do_not_count_outages(settings: Settings) -> None:
    config = breaker_config(settings)
    assert not config.counts_as_failure(MaxConnectionsError("Too many connections"))
    assert not config.counts_as_failure(RedisConnectionError("refused"))
    assert not config.counts_as_failure(RedisUnavailableError("no reply"))
    assert config.counts_as_failure(TimeoutError("ask timed out"))


def test_pool_is_sized_with_concurrency_and_actor_slots(settings: Settings) -> None:
    small = pool_size(settings, ingress=True, kinds=tuple(WorkKind))
    big = pool_size(replace(settings, concurrency=256), ingress=True, kinds=tuple(WorkKind))
    assert big - small == 2 * (256 - settings.concurrency)
    assert big > 2 * 256 + settings.partitions
    worker = pool_size(settings, ingress=False, kinds=(WorkKind.ANALYSIS,))
    assert worker >= 2 * settings.actor_workers + 1


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, Path, list[subprocess.Popen[bytes]]]]:
    """A Redis Stack of this test's own (port, data dir, [process]); stopped after."""
    port, data = free_port(), tmp_path / "redis"
    servers = [start_redis(data, port)]
    yield port, data, servers
    for server in servers:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)


def _kill(server: subprocess.Popen[bytes]) -> None:
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


async def test_one_line_down_one_line_back_however_many_loops_wait(
    own_redis: tuple[int, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """Ten loops meet the outage; one "unavailable" line, one "available again" line,
    and every loop goes on once Redis is back on the same port."""
    port, data, servers = own_redis
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=2)
    availability = RedisAvailability(redis, probe_key="t:probe", backoff_cap=0.5)
    released = 0
    try:
        _kill(servers[0])
        with structlog.testing.capture_logs() as logs:

            async def loop() -> None:
                nonlocal released
                await availability.call(redis.ping)
                released += 1

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(loop)
                with anyio.fail_after(30):
                    await availability.wait_unavailable()  # a loop reported the outage
                assert not availability.available
                await anyio.to_thread.run_sync(lambda: servers.append(start_redis(data, port)))
        events = [entry["event"] for entry in logs]
        down = [e for e in events if "Redis unavailable" in e]
        back = [e for e in events if "Redis available again" in e]
        assert (len(down), len(back), released) == (1, 1, 10), events
        stats = availability.statistics()
        assert stats.available
        assert stats.outages == 1
        assert stats.kind == "unavailable"
        assert stats.last_seconds is not None
        assert stats.last_seconds > 0
        assert "ConnectionError" in stats.cause
    finally:
        await redis.aclose()


async def test_watch_raises_once_the_outage_outlasts_the_limit(
    own_redis: tuple[int, Path, list[subprocess.Popen[bytes]]],
) -> None:
    port, _, servers = own_redis
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=2)
    availability = RedisAvailability(redis, probe_key="t:probe", max_outage=1.0)
    try:
        _kill(servers[0])
        started = anyio.current_time()

        async def wait_for_redis() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(availability.watch)
                await availability.call(redis.ping)

        with anyio.fail_after(30), pytest.raises(ExceptionGroup) as caught:
            await wait_for_redis()
        assert caught.group_contains(RedisOutageError, match="CTXD_REDIS_MAX_OUTAGE=1 s")
        assert anyio.current_time() - started >= 1.0
    finally:
        await redis.aclose()


async def test_out_of_memory_waits_until_writes_succeed(
    own_redis: tuple[int, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """maxmemory reached: one out-of-memory line; back once a write succeeds again."""
    port, _, _ = own_redis
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    availability = RedisAvailability(redis, probe_key="t:probe", backoff_cap=0.2)
    try:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        with structlog.testing.capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(availability.call, lambda: redis.set("t:key", "v"))
                with anyio.fail_after(30):
                    await availability.wait_unavailable()
                assert availability.statistics().kind == "out_of_memory"
                await redis.config_set("maxmemory", 0)
        events = [entry["event"] for entry in logs]
        assert len([e for e in events if "out of memory" in e and "maxmemory" in e]) == 1
        assert len([e for e in events if "available again" in e]) == 1
        assert await redis.get("t:key") == b"v"
    finally:
        await redis.aclose()


def test_library_tracebacks_of_outages_are_dropped_other_errors_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redisvl logs each failed checkpoint write with a traceback; during an outage the
    monitor's one line says it all."""
    quiet_library_outage_logs()
    logger = logging.getLogger("redisvl.index.index")
    for error in (OutOfMemoryError("command not allowed"), ValueError("a real bug")):
        try:
            raise error
        except Exception:
            logger.exception("Error while loading data to Redis")
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [error]
