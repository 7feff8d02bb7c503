"""The service's Redis client: one blocking connection pool sized with the concurrency.

redis-py's default pool raises ``MaxConnectionsError`` once its 100 connections are in
use, and at ``CTXD_CONCURRENCY=256`` with a slow analyzer they were: asks failed,
breakers opened and outputs came back ``fallback``. Running out of connections is
backpressure, not failure, so the service uses a :class:`BlockingConnectionPool` (a
caller waits for a free connection) whose size follows what can hold a connection at
once (:func:`pool_size`), and the checkpointer shares it.

The client itself retries a command briefly (a blip); anything longer is an outage,
waited out by :class:`~actors.runtime.availability.RedisAvailability`.

A Redis Cluster gets redis-py's cluster client instead (it follows ``MOVED``/``ASK``
and fail-overs). Whether ``CTXD_REDIS_URL`` names a cluster is found on the first
connection (``INFO cluster`` → ``cluster_enabled:1``), or stated in the URL with
``?cluster=true`` / ``?cluster=false`` (no probe then, :func:`cluster_enabled`
otherwise); the daemon and the worker then set ``cluster`` in their settings, which
every key layout decision reads (docs/operations.md, "Redis Cluster").
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.config import Settings, split_cluster_option
from graph.work import WorkKind

__all__ = ["cluster_enabled", "open_service_client", "pool_size"]

_SPARE = 8
"""Connections for the ownership loop, the router, the reply reader, gauges, probes."""


def pool_size(settings: Settings, *, ingress: bool, kinds: Collection[WorkKind]) -> int:
    """Connections this process can need at once.

    Blocking readers each hold one (a partition reader per partition, every actor
    worker and reclaimer); each running workflow holds one for its checkpoint or commit
    and, while it asks, one more for the ask's ``XADD`` (at most ``max_asks_in_flight``).

    Args:
        settings: concurrency, partitions, actor workers, asks in flight.
        ingress: whether this process reads partitions and runs workflows (``ctxd run``).
        kinds: the actor kinds served here.
    """
    readers = len(kinds) * (settings.actor_workers + 1)
    if ingress:
        readers += settings.partitions
        running = settings.concurrency + min(settings.max_asks_in_flight, settings.concurrency)
    else:
        running = len(kinds) * settings.actor_workers  # each worker's answer script
    return _SPARE + readers + running


def open_service_client(redis_url: str, settings: Settings, max_connections: int) -> Redis:
    """The service's client on a blocking pool of ``max_connections`` (bytes replies).

    Its socket timeout outlasts the longest command ctxd blocks on (``XREAD BLOCK``,
    ``WAITAOF``), so a hung Redis (paused, or a network partition) is noticed as an
    outage instead of hanging every loop for good.
    """
    socket_timeout = max(settings.block_ms / 1000, settings.event_timeout) + 10.0
    redis_url, _ = split_cluster_option(redis_url)
    if settings.cluster:
        return _open_cluster_client(redis_url, max_connections, socket_timeout)
    pool = BlockingConnectionPool.from_url(
        redis_url,
        max_connections=max_connections,
        timeout=None,  # wait for a connection as long as it takes: callers bound their waits
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
        retry_on_error=[BusyLoadingError, RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
    )
    return Redis(connection_pool=pool)


def _open_cluster_client(redis_url: str, max_connections: int, socket_timeout: float) -> Redis:
    """redis-py's asyncio cluster client, typed as the :class:`Redis` ctxd annotates.

    Its pool is per node and raises instead of waiting when full, so each node may have
    as many connections as the whole process can use at once (``max_connections`` is
    that bound, :func:`pool_size`): a node never runs out. ``MOVED``/``ASK`` and a
    fail-over's reconnects are the client's; an outage longer than its few retries is
    the availability monitor's, as on a single node.
    """
    client = _StreamReadingCluster.from_url(
        redis_url,
        max_connections=max_connections,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
        retry_on_error=[BusyLoadingError, RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
    )
    # The one boundary where the cluster client stands in for Redis: the commands ctxd
    # sends (streams, strings, hashes, sorted sets, EVALSHA through register_script,
    # non-transactional pipelines, INFO, PING) have the same signatures on both
    # (redis.commands.core's mixins, shared by redis.asyncio.cluster.RedisCluster).
    return cast(Redis, client)


class _StreamReadingCluster(RedisCluster):
    """redis-py's cluster client, finding the slot of ``XREAD``/``XREADGROUP`` itself.

    Both commands have "movable keys", for which redis-py asks a server with ``COMMAND
    GETKEYS`` before every call: measured on a running service, that was the most
    frequent command on the whole cluster (more than the reads themselves), one extra
    round trip per blocking read, all to the node redis-py asks, so a fail-over of that
    node failed every read. The keys of both commands are the first half of what
    follows ``STREAMS``.
    """

    async def _determine_slot(self, command: str, *args: Any) -> int:
        name = command.upper() if isinstance(command, str) else command.decode().upper()
        if name not in ("XREAD", "XREADGROUP"):
            return await super()._determine_slot(command, *args)
        # XREADGROUP GROUP <group> <consumer> …: a group or consumer may be called STREAMS.
        start = 3 if name == "XREADGROUP" else 0
        words = [a.upper() if isinstance(a, str) else a for a in args[start:]]
        if "STREAMS" in words:
            at = start + words.index("STREAMS") + 1
        elif b"STREAMS" in words:
            at = start + words.index(b"STREAMS") + 1
        else:
            return await super()._determine_slot(command, *args)
        rest = args[at:]
        slots = {self.keyslot(key) for key in rest[: len(rest) // 2]}
        if len(slots) != 1:
            raise RedisClusterException(f"{name} - all keys must map to the same key slot")
        return slots.pop()


async def cluster_enabled(redis: Redis) -> bool:
    """Whether the server ``redis`` talks to runs in cluster mode (``INFO cluster``).

    Asked through the client the process already waits for Redis with, so an outage at
    start-up is one outage, waited out and counted once.
    """
    info = await redis.info("cluster")
    return str(info.get("cluster_enabled", "0")) == "1"
