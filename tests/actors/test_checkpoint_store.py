"""CTXD_CHECKPOINT_URL: checkpoints in a store that can answer state history.

A Redis Cluster cannot (RediSearch 2.10 has no coordinator: each shard's index sees only
its own checkpoints), so every command that opens the checkpointer refuses one in one
line and exits 1, whether checkpoints would default to a cluster service Redis or
CTXD_CHECKPOINT_URL names one. A standalone store beside the service Redis works end to
end. Real servers throughout: a local 3+3 cluster (tests/cluster_helpers.py), the
session's Redis and a second standalone Redis Stack started here.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from cluster_helpers import LocalCluster
from redis import Redis
from redis_helpers import OwnRedis, free_port

from actors.app.checkpoint_store import checkpoint_store
from actors.config import load_settings
from actors.service.partitions import partition_lease, workflow_partition
from graph.errors import CheckpointStoreError, ConfigError
from tests_support import ServiceProcess, read_outputs, run_ctxd

pytestmark = pytest.mark.slow

PASSWORD = "Zq8wN#Pv4kT@Hs2mB"
_OPENING = (["run"], ["state", "wf-1"], ["state", "wf-1", "--history"], ["forget", "wf-1"])
"""Commands that open the checkpointer."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    """A standalone Redis Stack server as the separate checkpoint store."""
    server = OwnRedis(tmp_path_factory.mktemp("checkpoint-store"))
    server.start()
    yield server
    server.stop()


def _env(redis_url: str, prefix: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "CTXD_REDIS_URL": redis_url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_LOG_FORMAT": "json",
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "5",
        **extra,
    }


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1, one ``ctxd: …`` line on stderr holding ``words``, no traceback."""
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, output
    assert len(lines) == 1, output
    assert lines[0].startswith("ctxd: "), output
    assert "Traceback" not in output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_cluster_service_redis_is_refused_as_the_default_checkpoint_store(
    redis_cluster: LocalCluster, prefix: str, tmp_path: Path
) -> None:
    """Found by INFO cluster, and also when the URL states ?cluster=true."""
    for url in (redis_cluster.url, f"{redis_cluster.url}?cluster=true"):
        env = _env(url, prefix, tmp_path)
        for args in _OPENING:
            line = _one_line(
                run_ctxd(env, *args),
                "CTXD_REDIS_URL is a Redis Cluster",
                "CTXD_CHECKPOINT_URL is unset",
                "set CTXD_CHECKPOINT_URL to a standalone Redis with RedisJSON and RediSearch",
                "CTXD_CHECKPOINTER=postgres",
            )
            assert "Checkpoints on a cluster" in line


def test_a_cluster_named_as_checkpoint_store_is_refused(
    redis_cluster: LocalCluster, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    for service in (redis_url, redis_cluster.url):
        env = _env(service, prefix, tmp_path, CTXD_CHECKPOINT_URL=redis_cluster.url)
        for args in _OPENING:
            _one_line(
                run_ctxd(env, *args),
                "the checkpoint store CTXD_CHECKPOINT_URL is a Redis Cluster",
                "CTXD_CHECKPOINTER=postgres",
            )


def test_an_unreachable_checkpoint_store_is_named_without_its_password(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The line names the store's address (not the service Redis's), never the password."""
    port = free_port()  # nothing listens on it
    url = f"redis://u:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    env = _env(redis_url, prefix, tmp_path, CTXD_CHECKPOINT_URL=url)
    for args in (["state", "wf-1"], ["forget", "wf-1"]):
        result = run_ctxd(env, *args)
        line = _one_line(result, f"127.0.0.1:{port}", "connection refused")
        assert "check CTXD_CHECKPOINT_URL" in line
        output = result.stdout + result.stderr
        assert PASSWORD not in output
        for piece in ("Zq8wN", "Pv4kT", "Hs2mB"):
            assert piece not in output


def test_wrong_credentials_of_the_store_are_named_with_its_address(
    store: OwnRedis, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    url = store.url.replace("redis://", f"redis://u:{quote(PASSWORD, safe='')}@")
    env = _env(redis_url, prefix, tmp_path, CTXD_CHECKPOINT_URL=url)
    for args in (["run"], ["state", "wf-1"]):
        result = run_ctxd(env, *args)
        _one_line(result, f"127.0.0.1:{store.port}", "authentication failed", "CTXD_CHECKPOINT_URL")
        output = result.stdout + result.stderr
        for piece in ("Zq8wN", "Pv4kT", "Hs2mB"):
            assert piece not in output


def test_run_waits_for_the_checkpoint_store_like_for_redis(
    start_service: Callable[..., ServiceProcess],
    store: OwnRedis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """An unreachable store is an outage, not an error: one line, then start-up goes on."""
    store.stop()
    try:
        env = _env(redis_url, prefix, tmp_path, CTXD_CHECKPOINT_URL=store.url)
        service = start_service("run", env=env)
        line = service.wait_for_line(lambda x: "Redis unavailable" in x)
        assert f"127.0.0.1:{store.port}" in json.loads(line)["cause"]
        store.start()
        service.wait_ready()
        service.signal(signal.SIGTERM)
        assert service.wait() == 0
    finally:
        if store.process is None:
            store.start()


def test_checkpoint_url_is_a_redis_url_for_the_redis_checkpointer() -> None:
    settings = load_settings({"CTXD_CHECKPOINT_URL": "redis://store:6379/0"})
    assert settings.checkpoint_url == "redis://store:6379/0"
    assert load_settings({}).checkpoint_url is None
    with pytest.raises(ConfigError, match="CTXD_CHECKPOINT_URL has scheme 'http'"):
        load_settings({"CTXD_CHECKPOINT_URL": "http://store"})
    with pytest.raises(ConfigError, match="CTXD_CHECKPOINTER=postgres: unset one of them"):
        load_settings(
            {
                "CTXD_CHECKPOINT_URL": "redis://store:6379/0",
                "CTXD_CHECKPOINTER": "postgres",
                "CTXD_POSTGRES_URL": "postgresql://u@db/ctxd",
            }
        )


def test_a_separate_store_holds_the_checkpoints_and_the_floors(
    start_service: Callable[..., ServiceProcess],
    store: OwnRedis,
    redis: Redis,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """The service Redis keeps streams, leases and dedupe keys; the store every checkpoint
    key and the fencing-token floor of each partition taken; `ctxd state` reads it."""
    env = _env(redis_url, prefix, tmp_path, CTXD_CHECKPOINT_URL=store.url, CTXD_PARTITIONS="4")
    service = start_service("run", env=env)
    service.wait_ready()
    assert run_ctxd(env, "send", "wf-1", "Disk usage is at 91%.").returncode == 0
    assert run_ctxd(env, "send", "wf-1", "Disk usage is at 97%.").returncode == 0
    outputs = read_outputs(redis, f"{prefix}:out", 2)
    assert [fields["workflow_id"] for _, fields in outputs] == ["wf-1", "wf-1"]

    with Redis.from_url(store.url, decode_responses=True) as stored:
        store_keys = list(stored.scan_iter(match=f"{prefix}:*", count=1000))
        floors = stored.hgetall(f"{prefix}:fence_floor")
    service_keys = list(redis.scan_iter(match=f"{prefix}:*", count=1000))
    assert any(k.startswith(f"{prefix}:checkpoint:") for k in store_keys)
    assert any(k.startswith(f"{prefix}:checkpoint_latest:") for k in store_keys)
    assert not [k for k in service_keys if k.startswith(f"{prefix}:checkpoint")]
    # Each partition's floor is the token of the lease its owner holds in the service Redis.
    settings = load_settings({"CTXD_STREAM_PREFIX": prefix, "CTXD_PARTITIONS": "4"})
    lease = partition_lease(settings, workflow_partition(settings, "wf-1"))[0]
    holder = redis.get(lease)
    assert holder is not None
    assert floors[lease] == str(holder).rpartition("|")[2]

    state = run_ctxd(env, "state", "wf-1", "--history", "--json")
    assert state.returncode == 0, state.stderr
    document = json.loads(state.stdout)
    assert document["values"]["events_processed"] == 2
    assert len(document["history"]) >= 2  # history is a search of the store's index
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


def test_which_store_checkpoints_go_to() -> None:
    base = load_settings({})
    same = checkpoint_store(base, "redis://svc:6379/0")
    assert (same.url, same.setting, same.separate) == (
        "redis://svc:6379/0",
        "CTXD_REDIS_URL",
        False,
    )
    named = replace(base, checkpoint_url="redis://svc:6379/0")
    assert checkpoint_store(named, "redis://svc:6379/0").separate is False
    apart = replace(base, cluster=True, checkpoint_url="redis://store:6379/0")
    store = checkpoint_store(apart, "redis://svc:6379/0")
    assert (store.url, store.setting, store.separate) == (
        "redis://store:6379/0",
        "CTXD_CHECKPOINT_URL",
        True,
    )
    with pytest.raises(CheckpointStoreError, match="CTXD_CHECKPOINT_URL is unset"):
        checkpoint_store(replace(base, cluster=True), "redis://svc:6379/0")
    stated = replace(base, checkpoint_url="redis://store:6379/0?cluster=true")
    with pytest.raises(CheckpointStoreError, match="the checkpoint store CTXD_CHECKPOINT_URL"):
        checkpoint_store(stated, "redis://svc:6379/0")


def test_a_cluster_service_with_a_separate_store_starts(
    start_service: Callable[..., ServiceProcess],
    redis_cluster: LocalCluster,
    store: OwnRedis,
    prefix: str,
    tmp_path: Path,
) -> None:
    """The deployment this is for: streams on the cluster, checkpoints in the store. Its
    start-up checks pass and the checkpointer opens on the store (the service's own loops
    on a cluster are tested with the cluster client)."""
    env = _env(redis_cluster.url, prefix, tmp_path, CTXD_CHECKPOINT_URL=store.url)
    service = start_service("run", env=env)
    line = service.wait_for_line(lambda x: "ctxd is running" in x)
    assert json.loads(line)["checkpoint_store"] == store.url
    with Redis.from_url(store.url) as stored:
        indexes = {name.decode() for name in stored.execute_command("FT._LIST")}
    assert f"{prefix}:checkpoint" in indexes  # the saver's index was made in the store
    for master in redis_cluster.masters():
        with master.client() as node:
            assert f"{prefix}:checkpoint" not in node.execute_command("FT._LIST")
