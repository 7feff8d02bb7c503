"""Typed views of the redis-py stream replies ctxd reads.

redis-py's annotations describe every reply shape of every protocol version at once,
so callers would drown in unions and casts. These helpers do the one cast per command,
in one place, and return the shapes ctxd actually gets (RESP2, bytes or decoded text).
"""

from __future__ import annotations

from typing import Any, cast

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.exceptions import ResponseError

__all__ = [
    "Entry",
    "TextEntry",
    "autoclaim",
    "claim_pending_of",
    "ensure_group",
    "is_cluster_client",
    "pending_consumers",
    "read_group",
    "text",
    "wait_aof",
    "xread_text",
    "xrevrange_text",
]

Entry = tuple[str, dict[bytes, bytes] | None]
"""A stream entry: id, and fields (None when the entry was deleted while pending)."""

TextEntry = tuple[str, dict[str, str]]
"""A stream entry read with ``decode_responses=True``."""


def text(value: bytes | str) -> str:
    """Decode a Redis reply value."""
    return value.decode() if isinstance(value, bytes) else value


def is_cluster_client(redis: Redis | SyncRedis) -> bool:
    """Whether ``redis`` is redis-py's Redis Cluster client (typed as ``Redis`` in ctxd:
    actors/service/connections.py). On a cluster no script or ``MULTI`` may span slots,
    and redis-py refuses ``EVALSHA`` inside a pipeline."""
    return isinstance(redis, RedisCluster | SyncRedisCluster)


async def wait_aof(redis: Redis, key: str, timeout_ms: int) -> None:
    """``WAITAOF 1 0 timeout``: this server's AOF has this client's writes on disk.

    On a Redis Cluster the command goes to the master serving ``key``'s slot (the one
    that took the write): redis-py would send a keyless command to any node.
    """
    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(key)
        await redis.execute_command("WAITAOF", 1, 0, timeout_ms, target_nodes=node)
        return
    await redis.execute_command("WAITAOF", 1, 0, timeout_ms)  # type: ignore[no-untyped-call]


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` from the beginning, creating the stream if needed."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(raw: Any) -> list[Entry]:
    return [(text(entry_id), fields) for entry_id, fields in raw or []]


async def read_group(
    redis: Redis,
    *,
    group: str,
    consumer: str,
    stream: str,
    cursor: str,
    count: int,
    block: int | None,
) -> list[Entry]:
    """XREADGROUP on one stream; ``cursor`` is ``>`` or an id into this consumer's PEL."""
    reply = cast(
        Any,
        await redis.xreadgroup(group, consumer, {stream: cursor}, count=count, block=block),
    )
    return _entries(reply[0][1]) if reply else []


async def autoclaim(
    redis: Redis, *, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str
) -> tuple[str, list[Entry]]:
    """One XAUTOCLAIM page (never JUSTID: the delivery counter must count)."""
    reply = cast(
        Any,
        await redis.xautoclaim(stream, group, consumer, min_idle_ms, start_id=cursor, count=100),
    )
    return text(reply[0]), _entries(reply[1])


async def claim_pending_of(
    redis: Redis,
    *,
    stream: str,
    group: str,
    owner: str,
    consumer: str,
    min_idle_ms: int,
    count: int = 100,
) -> list[Entry]:
    """Claim up to ``count`` entries pending for consumer ``owner`` and idle at least
    ``min_idle_ms`` into ``consumer`` (``XPENDING`` of that consumer, then ``XCLAIM``,
    which counts a delivery, as ``XAUTOCLAIM`` without ``JUSTID`` does)."""
    pending = cast(
        Any,
        await redis.xpending_range(
            stream, group, min="-", max="+", count=count, consumername=owner, idle=min_idle_ms
        ),
    )
    ids: list[int | bytes | str | memoryview[int]] = [text(p["message_id"]) for p in pending]
    if not ids:
        return []
    claimed = cast(Any, await redis.xclaim(stream, group, consumer, min_idle_ms, ids))
    return _entries(claimed)


async def pending_consumers(redis: Redis, stream: str, group: str) -> list[str]:
    """The consumers of ``group`` with entries pending (``XPENDING`` summary)."""
    summary = cast(Any, await redis.xpending(stream, group))
    return [text(c["name"]) for c in summary.get("consumers") or [] if int(c["pending"])]


def xread_text(
    redis: SyncRedis, stream: str, last_id: str, *, block: int, count: int = 100
) -> list[TextEntry]:
    """XREAD after ``last_id`` on a decoding client."""
    reply = cast(Any, redis.xread({stream: last_id}, block=block, count=count))
    return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]


def xrevrange_text(redis: SyncRedis, stream: str, count: int) -> list[TextEntry]:
    """The newest ``count`` entries, newest first, on a decoding client."""
    return cast(list[TextEntry], redis.xrevrange(stream, count=count))
