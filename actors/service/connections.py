"""The service's Redis client: one blocking connection pool sized with the concurrency.

redis-py's default pool raises ``MaxConnectionsError`` once its 100 connections are in
use, and at ``CTXD_CONCURRENCY=256`` with a slow analyzer they were: asks failed,
breakers opened and outputs came back ``fallback``. Running out of connections is
backpressure, not failure, so the service uses a :class:`BlockingConnectionPool` (a
caller waits for a free connection) whose size follows what can hold a connection at
once (:func:`pool_size`), and the checkpointer shares it.

The client itself retries a command briefly (a blip); anything longer is an outage,
waited out by :class:`~actors.runtime.availability.RedisAvailability`.
"""

from __future__ import annotations

from collections.abc import Collection

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.config import Settings
from graph.work import WorkKind

__all__ = ["open_service_client", "pool_size"]

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
