"""What routing ``ctxd:in`` into partitions needs to know, shared by the movers
(:mod:`actors.service.router`) and the upgrade (:mod:`actors.service.router_upgrade`):
each partition's cursor in ``ctxd:in``, where an entry goes, stream id order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.redis_io import text
from actors.service.partitions import partition_key, partition_of
from actors.service.streams import dlq_entry
from actors.service.validation import as_invalid_entry, routing_key

__all__ = [
    "SOURCE_FIELD",
    "Target",
    "barrier_key",
    "cursor_key",
    "id_after",
    "id_key",
    "lowest_cursor",
    "route_target",
]

SOURCE_FIELD = "ctxd_source_id"
"""Partition entries moved from ``ctxd:in`` carry their ``ctxd:in`` id in this field."""

_SOURCE_KEY = SOURCE_FIELD.encode()

Target = tuple[int, Literal["stream", "dlq"], dict[bytes, bytes]]
"""Where an entry goes: its partition, the partition's stream or DLQ, and its fields."""


def cursor_key(settings: Settings, n: int) -> str:
    """Partition ``n``'s cursor in ``ctxd:in``: ``{prefix}:{p<n>}:cursor``."""
    return partition_key(settings, n, "cursor")


def barrier_key(settings: Settings, n: int) -> str:
    """Partition ``n``'s barrier ``{prefix}:{p<n>}:barrier``: while it holds a ``ctxd:in``
    id, nothing past that id is moved into the partition (a resize sets it)."""
    return partition_key(settings, n, "barrier")


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def id_after(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b``."""
    return id_key(a) > id_key(b)


def route_target(settings: Settings, entry_id: str, raw: Mapping[bytes, bytes]) -> Target:
    """Where a ``ctxd:in`` entry goes: ``(partition, "stream", fields)`` with its
    ``ctxd:in`` id added as :data:`SOURCE_FIELD` (the fields otherwise as read: the
    owner validates them), or ``(0, "dlq", bounded copy)`` when it is too large to move
    or names no usable workflow."""
    own = {k: v for k, v in raw.items() if k != _SOURCE_KEY}  # a producer's is not ours
    try:
        workflow_id = routing_key(raw, settings)
    except Exception as exc:  # noqa: BLE001 - one entry's problem never stops routing
        invalid = as_invalid_entry(exc)
        copy = dlq_entry(
            own,
            reason=invalid.reason,
            error=str(invalid),
            attempts=1,
            source_id=entry_id,
            field_bytes=settings.dlq_field_bytes,
            max_fields=settings.max_fields,
        )
        return 0, "dlq", copy
    own[_SOURCE_KEY] = entry_id.encode()
    return partition_of(workflow_id, settings.partitions), "stream", own


async def lowest_cursor(redis: Redis, settings: Settings) -> str | None:
    """The lowest cursor of all partitions, or None while any partition has none (then
    nothing of ``ctxd:in`` may be trimmed: that partition has moved nothing yet)."""
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(settings.partitions):
            pipe.get(cursor_key(settings, n))
        values = await pipe.execute()
    if any(v is None for v in values):
        return None
    return min((text(v) for v in values), key=id_key)
