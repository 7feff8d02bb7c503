"""Whether, and up to where, entries may be moved from ``ctxd:in`` into partitions now.

The partition count is recorded in Redis (:mod:`actors.service.partition_record`, the
hash ``{prefix}:partitions``). While its ``state`` is ``resizing`` no entry is moved out
of ``ctxd:in`` past the record's ``route_until`` id (none at all while it names none):
the entries waiting there are moved under the new count once the resize is over, so a
workflow's entries are never split between two counts. An instance whose
``CTXD_PARTITIONS`` is not the recorded count moves nothing either (it hashes onto
another count; it stops once it notices the flip). Every mover asks
:func:`moving_bound` before each batch; the producer API (:mod:`actors.producer`) reads
the same record to decide between a partition stream and ``ctxd:in``.

This check is made before a batch is read, so a batch checked just before a resize
closed the gate can land after it (check-then-move). The resize therefore also sets a
barrier key in every old partition's slot, which the move script itself checks
(:data:`~actors.runtime.scripts.ROUTE_PARTITION`): no cursor passes it, whenever the
batch was checked (:mod:`actors.service.resize`).
"""

from __future__ import annotations

from redis.asyncio import Redis

from actors.config import Settings
from actors.service.partition_record import PartitionRecord, read_record, record_key_of

__all__ = [
    "ACTIVE",
    "UNBOUNDED",
    "PartitionRecord",
    "bound_of",
    "moving_allowed",
    "moving_bound",
    "parse_record",
    "partitions_record_key",
    "read_record",
]

ACTIVE = "active"
"""The record's ``state`` when entries may be moved (no resize in progress)."""

partitions_record_key = record_key_of
"""The record's hash for a prefix (one record module: :mod:`~actors.service.partition_record`)."""

parse_record = PartitionRecord.from_hash
"""The record from its ``HGETALL`` reply (None when there is none)."""

UNBOUNDED = "+"
""":func:`moving_bound`'s answer when nothing limits the moves."""


def bound_of(record: PartitionRecord | None, settings: Settings) -> str | None:
    """Up to which ``ctxd:in`` id an instance configured with ``settings`` may move
    entries under ``record``: :data:`UNBOUNDED` when it is absent, or active at this
    instance's count; while resizing its ``route_until`` (None when it names none);
    None at another count."""
    if record is None:
        return UNBOUNDED
    if record.count != settings.partitions:
        return None
    if record.active:
        return UNBOUNDED
    return record.route_until


async def moving_bound(redis: Redis, settings: Settings) -> str | None:
    """:func:`bound_of` the record as stored now (read fresh: no cache)."""
    return bound_of(await read_record(redis, settings), settings)


async def moving_allowed(redis: Redis, settings: Settings) -> bool:
    """Whether ``ctxd:in`` entries may be moved into partitions now without a bound."""
    return await moving_bound(redis, settings) == UNBOUNDED
