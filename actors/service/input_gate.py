"""Whether entries may be moved from ``ctxd:in`` into partitions now.

The partition count is recorded in Redis in the hash ``{prefix}:partitions`` (fields
``count``, ``epoch``, ``state``). While ``state`` is anything but ``active`` — a resize
in progress — no entry may be moved out of ``ctxd:in``: the entries waiting there are
moved under the new count once the resize is over, so a workflow's entries are never
split between two counts. Every mover asks :func:`moving_bound` before each batch, and
the producer API (:mod:`actors.producer`) reads the same record to decide between a
partition stream and ``ctxd:in``.

A resize may also name, in the field ``route_until``, a ``ctxd:in`` id up to which the
movers go on (typically the last id of ``ctxd:in`` when the resize began): then every
partition's cursor comes to rest exactly there, and the new partitions can start from
that one id, with nothing moved twice or skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from actors.config import Settings

__all__ = [
    "ACTIVE",
    "UNBOUNDED",
    "PartitionRecord",
    "moving_allowed",
    "moving_bound",
    "parse_record",
    "partitions_record_key",
    "read_record",
]

ACTIVE = "active"
"""The record's ``state`` when entries may be moved (no resize in progress)."""


def partitions_record_key(prefix: str) -> str:
    """The hash that records the partition count: ``{prefix}:partitions``."""
    return f"{prefix}:partitions"


@dataclass(frozen=True)
class PartitionRecord:
    """The recorded partition count.

    Attributes:
        count: the partition count (0 when the record has none).
        epoch: how often the count was set (0 when the record has none).
        state: ``active``, or another word while a resize is in progress.
    """

    count: int
    epoch: int
    state: str
    route_until: str | None = None

    @property
    def active(self) -> bool:
        """Whether entries may be moved into partitions under ``count``."""
        return self.state == ACTIVE


def parse_record(raw: Mapping[bytes | str, bytes | str]) -> PartitionRecord | None:
    """The record from its ``HGETALL`` reply (bytes or text); None when there is none."""
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    if not fields:
        return None
    count = fields.get("count", "0")
    epoch = fields.get("epoch", "0")
    return PartitionRecord(
        count=int(count) if count.isdigit() else 0,
        epoch=int(epoch) if epoch.isdigit() else 0,
        state=fields.get("state", ACTIVE),
        route_until=fields.get("route_until") or None,
    )


async def read_record(redis: Redis, settings: Settings) -> PartitionRecord | None:
    """The recorded partition count, or None where none is recorded yet."""
    raw = await redis.hgetall(partitions_record_key(settings.stream_prefix))
    return parse_record(raw)


UNBOUNDED = "+"
""":func:`moving_bound`'s answer when nothing limits the moves."""


async def moving_bound(redis: Redis, settings: Settings) -> str | None:
    """Up to which ``ctxd:in`` id entries may be moved now: :data:`UNBOUNDED` when the
    record is absent or ``active``; while a resize is in progress its ``route_until``
    id, or None (move nothing) when it names none."""
    record = await read_record(redis, settings)
    if record is None or record.active:
        return UNBOUNDED
    return record.route_until


async def moving_allowed(redis: Redis, settings: Settings) -> bool:
    """Whether ``ctxd:in`` entries may be moved into partitions now: the record is
    absent or ``active`` (a resize, ``state=resizing``, stops every mover at its next
    batch; what it read stays in ``ctxd:in`` behind the partitions' cursors)."""
    record = await read_record(redis, settings)
    return record is None or record.active
