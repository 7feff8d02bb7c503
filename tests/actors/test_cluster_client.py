"""CTXD_REDIS_URL naming a Redis Cluster: detected on the first connection or stated
with ``?cluster=true``, served by redis-py's cluster clients; one server stays as it was.

Runs against a real local cluster (3 masters + 3 replicas, tests/cluster_helpers.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from cluster_helpers import LocalCluster
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster

from actors.app.cli.common import client_redis, command_settings
from actors.config import Settings, load_settings, split_cluster_option
from actors.service.connections import cluster_enabled, open_service_client
from actors.service.partitions import partition_key
from graph.errors import ConfigError

pytestmark = pytest.mark.slow


def test_local_cluster_is_healthy_with_modules(redis_cluster: LocalCluster) -> None:
    """Three masters, each with an online replica, RedisJSON and RediSearch loaded."""
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert len(redis_cluster.replicas()) == 3
    for master in masters:
        assert redis_cluster.replica_of(master).alive
        with master.client() as client:
            modules = {m["name"] for m in client.execute_command("MODULE LIST")}
        assert {"ReJSON", "search"} <= modules
    print(f"cluster start-up: {redis_cluster.startup_seconds:.2f} s")


async def test_cluster_is_detected_without_an_option(
    redis_cluster: LocalCluster, settings: Settings
) -> None:
    """A plain redis:// URL of a cluster node: INFO cluster (asked through the plain
    client start-up waits for Redis with) says it is one."""
    plain = AsyncRedis.from_url(redis_cluster.url)
    try:
        assert await cluster_enabled(plain) is True
    finally:
        await plain.aclose()


async def test_one_server_stays_single_node(settings: Settings, redis_url: str) -> None:
    """The session's single Redis is detected as such: the default layout is unchanged."""
    plain = AsyncRedis.from_url(redis_url)
    try:
        assert await cluster_enabled(plain) is False
    finally:
        await plain.aclose()


async def test_service_client_on_a_cluster_reaches_every_partition(
    redis_cluster: LocalCluster, settings: Settings
) -> None:
    """``?cluster=true`` works (it used to fail in redis-py's URL parsing): the service
    client is redis-py's cluster client and writes keys of many partitions, which land
    on more than one master."""
    cluster_settings = replace(settings, cluster=True, partitions=16)
    redis = open_service_client(f"{redis_cluster.url}?cluster=true", cluster_settings, 8)
    try:
        assert isinstance(redis, RedisCluster)
        keys = [partition_key(cluster_settings, n, "probe") for n in range(16)]
        for key in keys:
            await redis.set(key, b"1")
        assert [await redis.get(key) for key in keys] == [b"1"] * 16
    finally:
        await redis.aclose()
    owners = {redis_cluster.master_of_slot(_slot(key)).port for key in keys}
    assert len(owners) == 3


def test_cli_client_on_a_cluster(redis_cluster: LocalCluster, settings: Settings) -> None:
    """The CLI's client is redis-py's sync cluster client, found with INFO cluster, and
    :func:`command_settings` says so."""
    with client_redis(replace(settings, redis_url=redis_cluster.url)) as redis:
        assert isinstance(redis, SyncRedisCluster)
        assert command_settings(settings, redis).cluster is True
        redis.set(partition_key(settings, 5, "cli"), "x")
        assert redis.get(partition_key(settings, 5, "cli")) == "x"


def test_cli_client_on_one_server(settings: Settings) -> None:
    """On one server the CLI keeps the plain client and ``cluster`` stays False."""
    with client_redis(settings) as redis:
        assert isinstance(redis, Redis)
        assert command_settings(settings, redis).cluster is False


def test_cluster_option_is_removed_and_checked() -> None:
    """redis-py never sees ``cluster=``; other options stay as written; a bad value is one
    readable configuration error."""
    assert split_cluster_option("redis://h:1/0?cluster=true") == ("redis://h:1/0", True)
    assert split_cluster_option("redis://h:1/0?socket_timeout=3&cluster=no") == (
        "redis://h:1/0?socket_timeout=3",
        False,
    )
    assert split_cluster_option("redis://h:1/0") == ("redis://h:1/0", None)
    with pytest.raises(ConfigError, match=r"\?cluster='maybe' is not understood"):
        load_settings({"CTXD_REDIS_URL": "redis://h:1/0?cluster=maybe"})


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return key_slot(key.encode())
