"""Shared fixtures: a real Redis with RedisJSON + RediSearch, settings per test, and
``ctxd run`` as a real subprocess.

The Redis is the embedded one (started once per session on a free port), unless
``CTXD_REDIS_URL`` points the suite at another Redis 8 / Redis Stack server. Every test
gets its own stream prefix, so tests never see each other's streams.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from cluster_helpers import LocalCluster, open_local_cluster
from redis import Redis
from redis_helpers import free_port, start_redis

from actors.app.redis_server import open_embedded_redis
from actors.config import Settings, load_settings
from tests_support import ServiceProcess


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a Redis with RedisJSON and RediSearch for the whole session."""
    configured = os.environ.get("CTXD_REDIS_URL")
    if configured:
        yield configured
        return
    with open_embedded_redis(tmp_path_factory.mktemp("embedded-redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real local Redis Cluster (3 masters + 3 replicas, modules loaded) for a module;
    its start-up time is printed (``-s`` shows it)."""
    with open_local_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def checkpoint_url(tmp_path: Path) -> Iterator[str]:
    """A standalone Redis Stack (RedisJSON + RediSearch) of the test's own: the separate
    checkpoint store a service on a cluster needs; stopped by pid afterwards."""
    port = free_port()
    process = start_redis(tmp_path / "checkpoints", port, modules=True)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def prefix() -> str:
    """A stream/key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(redis_url: str, prefix: str, tmp_path: Path) -> Settings:
    """Settings for an in-process service on the session's Redis, isolated by prefix."""
    base = load_settings({}, overrides={})
    return replace(
        base,
        redis_url=redis_url,
        state_dir=tmp_path / "state",
        stream_prefix=prefix,
        instance=f"{prefix}-a",
        block_ms=50,
        event_timeout=5.0,
    )


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    """A synchronous client with decoded responses."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def service_env(redis_url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a ``ctxd`` subprocess on the session's Redis, isolated by prefix."""
    return {
        "CTXD_REDIS_URL": redis_url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "5",
    }


@pytest.fixture
def start_service(service_env: dict[str, str]) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``ctxd`` subprocesses; every one is stopped (by pid) after the test."""
    started: list[ServiceProcess] = []

    def start(*args: str, env: Mapping[str, str] | None = None) -> ServiceProcess:
        process = ServiceProcess(list(args) or ["run"], {**service_env, **(env or {})})
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
