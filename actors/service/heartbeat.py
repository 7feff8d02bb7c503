"""Instance heartbeats: who is alive, and what each instance reports about itself.

Each instance keeps ``{prefix}:instance:{name}`` (JSON, TTL 1.5 lease TTLs) and its name
in the sorted set ``{prefix}:instances`` scored by the time of its last beat. Live
instances are those that beat within the last ``lease_ttl`` (four beats); the set is
pruned of older names. The times are Redis's (``TIME``), never a host's clock: with a
lease TTL of a second or two, a host whose clock ran a few seconds ahead would otherwise
see every other instance as dead and prune it. An instance beats right after it renewed
its leases, so a dead one leaves the live set just after its leases lapsed: the
survivors, which read the set (:meth:`Heartbeat.live`, one round trip) between their
beats, then take its partitions at once. ``ctxd status`` reads the same keys.

A ``ctxd worker`` (actors only, no partitions) publishes the same kind of record under
``{prefix}:worker:{name}`` and ``{prefix}:workers``, apart from the instances, so it
never takes part in the partition assignment; ``ctxd status`` lists it (its kinds, its
Redis outages).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import cast

from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.pool import Liveness
from actors.runtime.redis_io import is_cluster_client
from actors.service.lease import renew_period

__all__ = [
    "Heartbeat",
    "instance_key",
    "instances_key",
    "process_liveness",
    "worker_key",
    "workers_key",
]


def instances_key(settings: Settings) -> str:
    """The sorted set of instance names by last beat (ms since the epoch)."""
    return settings.key("instances")


def instance_key(settings: Settings, name: str) -> str:
    """The JSON heartbeat of one instance."""
    return settings.key("instance", name)


def workers_key(settings: Settings) -> str:
    """The sorted set of ``ctxd worker`` names by last beat (ms since the epoch)."""
    return settings.key("workers")


def worker_key(settings: Settings, name: str) -> str:
    """The JSON heartbeat of one ``ctxd worker``."""
    return settings.key("worker", name)


def _ms(reply: object) -> int:
    """Milliseconds since the epoch from a ``TIME`` reply (seconds, microseconds)."""
    seconds, micros = cast(tuple[int, int], reply)
    return int(seconds) * 1000 + int(micros) // 1000


async def _scored_members(redis: Redis, *keys: str) -> tuple[int, list[object]]:
    """Redis's clock (ms) and each sorted set's members with scores, in one round trip
    on a single node. A cluster pipeline cannot carry ``TIME`` (no key to route it by),
    so there the clock is read first, on its own."""
    if is_cluster_client(redis):
        now = _ms(await redis.time())
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrange(key, 0, -1, withscores=True)
            return now, list(await pipe.execute())
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for key in keys:
            pipe.zrange(key, 0, -1, withscores=True)
        clock, *rows = await pipe.execute()
    return _ms(clock), rows


def _names(reply: object, *, after_ms: int | None = None) -> list[str]:
    """Decoded member names of a ``ZRANGE`` reply (``WITHSCORES`` when ``after_ms`` is
    given: only the members scored after it)."""
    if after_ms is None:
        members = cast(list[bytes | str], reply)
    else:
        scored = cast(list[tuple[bytes | str, float]], reply)
        members = [m for m, score in scored if score > after_ms]
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


def process_liveness(redis: Redis, settings: Settings) -> Liveness:
    """Which ``ctxd run`` and ``ctxd worker`` processes are alive, for the actor pools:
    a pool claims the pending requests of a process that left both live sets at once
    (idle for at least a lease TTL), so their askers get answers seconds after the
    process died instead of timing out (docs/operations.md, "Fail-over and the lease TTL").
    """
    window_ms = int(settings.lease_ttl * 1000)

    async def live() -> set[str]:
        now, (instances, workers) = await _scored_members(
            redis, instances_key(settings), workers_key(settings)
        )
        oldest = now - window_ms
        return {*_names(instances, after_ms=oldest), *_names(workers, after_ms=oldest)}

    return Liveness(live, every=renew_period(settings.lease_ttl), min_idle=settings.lease_ttl)


class Heartbeat:
    """Publishes this instance's heartbeat and lists the live instances.

    Args:
        redis: the client.
        settings: validated settings (instance name, lease TTL).
    """

    def __init__(self, redis: Redis, settings: Settings, *, worker: bool = False) -> None:
        self._redis = redis
        self._settings = settings
        self.started = time.time()  # this host's clock: only shown, never compared
        self._one, self._all = (
            (worker_key(settings, settings.instance), workers_key(settings))
            if worker
            else (instance_key(settings, settings.instance), instances_key(settings))
        )

    async def beat(self, info: Mapping[str, object]) -> list[str]:
        """Publish ``info`` and return the live instance names (this one included)."""
        s = self._settings
        now_ms = _ms(await self._redis.time())
        window_ms = int(s.lease_ttl * 1000)
        body = json.dumps(
            {"instance": s.instance, "started": self.started, "beat": now_ms / 1000, **info},
            default=str,
        )
        # A Redis Cluster has the two keys in different slots: no MULTI there. Nothing
        # needs the beat to be atomic (a beat is a refresh; the set is pruned each time).
        async with self._redis.pipeline(transaction=not s.cluster) as pipe:
            pipe.set(self._one, body, px=window_ms * 3 // 2)
            pipe.zadd(self._all, {s.instance: now_ms})
            pipe.zremrangebyscore(self._all, 0, now_ms - window_ms)
            pipe.zrange(self._all, 0, -1)
            *_, names = await pipe.execute()
        return _names(names)

    async def live(self) -> list[str]:
        """The live instance names, read only (no beat): what the next beat would list.

        Cheap enough to ask several times per beat: the ownership loop watches it to
        notice a dead instance (its last beat older than the lease TTL) at once.
        """
        now, (scored,) = await _scored_members(self._redis, self._all)
        return _names(scored, after_ms=now - int(self._settings.lease_ttl * 1000))

    async def remove(self) -> None:
        """Leave: delete the heartbeat so peers rebalance at once."""
        s = self._settings
        async with self._redis.pipeline(transaction=not s.cluster) as pipe:
            pipe.delete(self._one)
            pipe.zrem(self._all, s.instance)
            await pipe.execute()
