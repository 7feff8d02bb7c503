"""The partition count, recorded in Redis with an epoch, and what every instance checks.

Every instance must hash workflows onto the same number of partitions: two instances
that disagree move one workflow's entries into two partitions, run them under two
owners, out of order, and leave entries no one reads (seen: 32 started after 16 left
60 of 600 events pending and broke per-workflow order 5 times). So the count is data
in Redis, not only configuration: the hash ``{prefix}:partitions`` holds

- ``count``: the partitions every instance uses now;
- ``epoch``: 1 for the first count, +1 at every change;
- ``state``: ``active``, or ``resizing`` while ``ctxd partitions resize`` changes it;
- ``next``: while resizing, the count it changes to;
- ``route_until``: while resizing, the ``ctxd:in`` id up to which entries are still
  moved into the old partitions (every partition's cursor comes to rest there);
- ``barriers``: while resizing, partitions ``0 … barriers-1`` may hold a barrier key
  (``{prefix}:{p<n>}:barrier``) that the move script will not move past.

The first ``ctxd run`` records its ``CTXD_PARTITIONS`` (one ``MULTI`` of ``HSETNX``:
two instances starting together agree on whichever came first); an instance configured
otherwise refuses to start (:class:`PartitionCountError`). While resizing no entry is
routed into a partition past ``route_until`` (:func:`moving_bound` in
:mod:`actors.service.input_gate`), the owners finish the old partitions,
then the record flips (actors/app/cli/partitions.py, docs/operations.md "Changing the
partition count").

A deployment from before the record (or before the ``{prefix}:{p<n>}`` key layout) is
checked before the first record is written: entries still waiting in its partition
streams were hashed with the count it ran with, so a different count must not be
recorded over them (:func:`claim_record`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.scripts import call_script
from actors.service.partitions import partition_of, partition_stream
from graph.errors import ConfigError, CtxdError

__all__ = [
    "PartitionCountChanged",
    "PartitionCountError",
    "PartitionRecord",
    "RecordState",
    "check_partition_count",
    "claim_record",
    "leftover_streams",
    "read_record",
    "record_key",
    "record_key_of",
    "routing_open",
    "unfinished_entries",
    "update_record",
    "watch_partition_count",
]

_log = structlog.get_logger("ctxd.partitions")

RecordState = Literal["active", "resizing"]


class PartitionCountError(ConfigError):
    """This instance's ``CTXD_PARTITIONS`` disagrees with the count recorded in Redis."""


class PartitionCountChanged(CtxdError):
    """The recorded count changed under a running instance: it stops, to be started
    again with the new ``CTXD_PARTITIONS`` (exit 1, so a service manager restarts it)."""


@dataclass(frozen=True)
class PartitionRecord:
    """The recorded partition count.

    Attributes:
        count: the partitions every instance hashes onto now.
        epoch: 1 for the first recorded count, one more at every change.
        state: ``active``, or ``resizing`` while the count changes to ``next``.
        next: the count a resize in progress changes to (0 when none).
        route_until: while resizing, the ``ctxd:in`` id up to which entries are still
            moved (None: move nothing).
        barriers: while resizing, how many partitions (from 0) may hold a barrier key.
    """

    count: int
    epoch: int
    state: RecordState = "active"
    next: int = 0
    route_until: str | None = None
    barriers: int = 0

    @property
    def active(self) -> bool:
        """Whether entries may be moved into partitions (no resize in progress)."""
        return self.state == "active"

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> PartitionRecord | None:
        """The record from its ``HGETALL`` reply (None when the hash or its count is
        absent). A ``state`` other than ``active`` reads as ``resizing``: when in
        doubt, nothing is moved."""
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields.get("count", "").isdigit():
            return None
        return cls(
            count=int(fields["count"]),
            epoch=int(fields.get("epoch") or "1"),
            state="active" if fields.get("state", "active") == "active" else "resizing",
            next=int(fields.get("next") or 0),
            route_until=fields.get("route_until") or None,
            barriers=int(fields.get("barriers") or 0),
        )

    def describe(self) -> str:
        """``64 partitions (epoch 2)``, with the resize in progress if any."""
        text = f"{self.count} partitions (epoch {self.epoch})"
        if self.state == "resizing" and self.next == self.count:
            text += ", switching: routing resumes once no instance runs the old count"
        elif self.state == "resizing":
            text += f", resizing to {self.next}"
        return text


def record_key(settings: Settings) -> str:
    """The record's hash: ``{prefix}:partitions``."""
    return record_key_of(settings.stream_prefix)


def record_key_of(prefix: str) -> str:
    """The record's hash for a stream prefix (producers know the prefix, not settings)."""
    return f"{prefix}:partitions"


async def read_record(redis: Redis, settings: Settings) -> PartitionRecord | None:
    """The recorded partition count, or None before the first ``ctxd run``."""
    raw = await redis.hgetall(record_key(settings))
    return PartitionRecord.from_hash(cast(Mapping[bytes | str, bytes | str], raw))


def routing_open(record: PartitionRecord | None, settings: Settings) -> bool:
    """Whether an entry may be moved into a partition now, by an instance hashing onto
    ``settings.partitions``: only while the record is active at that count (or absent).
    The movers ask :func:`actors.service.input_gate.moving_bound`, which also lets them
    go on up to ``route_until`` while resizing."""
    if record is None:
        return True
    return record.state == "active" and record.count == settings.partitions


async def update_record(
    redis: Redis, settings: Settings, expected: PartitionRecord, **changes: int | str
) -> bool:
    """Set ``changes`` on the record if it is still at ``expected``'s epoch and state.

    A value of ``""`` deletes that field. Returns False when someone changed it first.
    """
    args: list[str | int] = [expected.epoch, expected.state]
    for name, value in changes.items():
        args += [name, value]
    applied = await call_script(
        redis, scripts.PARTITIONS_UPDATE, keys=[record_key(settings)], args=args
    )
    return bool(applied)


async def claim_record(redis: Redis, settings: Settings) -> PartitionRecord:
    """The recorded count, recording ``CTXD_PARTITIONS`` with epoch 1 if there is none.

    The first record is refused while a deployment from before has entries waiting
    that were hashed onto another count (:func:`leftover_streams`).

    Raises:
        PartitionCountError: such entries are waiting; the message says what to do.
    """
    record = await read_record(redis, settings)
    if record is not None:
        return record
    await _refuse_over_leftovers(redis, settings)
    key = record_key(settings)
    async with redis.pipeline(transaction=True) as pipe:
        # One MULTI: of two instances starting together, the first one's fields win
        # whole, and both read the same record back.
        pipe.hsetnx(key, "count", settings.partitions)
        pipe.hsetnx(key, "epoch", 1)
        pipe.hsetnx(key, "state", "active")
        pipe.hgetall(key)
        *_, raw = await pipe.execute()
    claimed = PartitionRecord.from_hash(cast(Mapping[bytes | str, bytes | str], raw))
    assert claimed is not None  # written in the same transaction
    return claimed


async def check_partition_count(
    redis: Redis,
    settings: Settings,
    *,
    poll: float,
    on_wait: Callable[[PartitionRecord], None] = lambda record: None,
) -> PartitionRecord:
    """At start: the record this instance runs under (recording it if it is the first).

    An instance configured with the count being resized to waits for the resize to
    finish (``on_wait`` is told, then the record is read every ``poll`` seconds); one
    with the current count runs (during a resize it helps finish the old partitions).

    Raises:
        PartitionCountError: ``CTXD_PARTITIONS`` is neither; the line says what to do.
    """
    told = False
    while True:
        record = await claim_record(redis, settings)
        if record.count == settings.partitions:
            return record
        if record.state == "resizing" and record.next == settings.partitions:
            if not told:
                on_wait(record)
                told = True
            await anyio.sleep(poll)  # a person's resize: nothing in Redis to block on
            continue
        raise PartitionCountError(
            f"CTXD_PARTITIONS={settings.partitions}, but {record_key(settings)} records "
            f"{record.describe()}: start with CTXD_PARTITIONS={record.count}, or change "
            f"the count of every instance with `ctxd partitions resize "
            f'{settings.partitions}` (docs/operations.md, "Changing the partition count")'
        )


async def watch_partition_count(
    redis: Redis, settings: Settings, availability: RedisAvailability, *, poll: float
) -> PartitionRecord:
    """Return the record once its count is no longer ``settings.partitions`` (a resize
    flipped it); reads it every ``poll`` seconds, waiting out Redis outages."""
    while True:
        try:
            record = await read_record(redis, settings)
        except Exception as exc:
            if not is_outage(exc):
                raise
            availability.report(exc)
            await availability.wait_available()
            continue
        if record is not None and record.count != settings.partitions:
            _log.warning(
                "the partition count changed; stopping to be started with the new count",
                recorded=record.count,
                epoch=record.epoch,
                configured=settings.partitions,
            )
            return record
        await anyio.sleep(poll)  # the record changes by a person's command, rarely


async def _refuse_over_leftovers(redis: Redis, settings: Settings) -> None:
    old, current = await leftover_streams(redis, settings)
    p = settings.stream_prefix
    if old:
        waiting = sum(old.values())
        count = max(old) + 1
        raise PartitionCountError(
            f"{waiting} entries wait in the partition streams of an earlier ctxd "
            f"({p}:part:0…{p}:part:{count - 1}, {count} partitions), which this version "
            f"no longer reads (it reads {partition_stream(settings, 0)}…): run the earlier "
            "version until `ctxd status` shows nothing pending, stop it, then start this one"
        )
    if current:
        misplaced, fits = await _hash_evidence(redis, settings, current)
        if misplaced:
            advice = (
                f"start with CTXD_PARTITIONS={fits} (it is then recorded), and change the "
                "count afterwards with `ctxd partitions resize`"
                if fits
                else "no single count fits them: let the instances that wrote them finish first"
            )
            raise PartitionCountError(
                f"{sum(current.values())} entries wait in partition streams, and some of "
                f"them ({misplaced}) are not in the partition CTXD_PARTITIONS="
                f"{settings.partitions} gives their workflow (no count is recorded in "
                f"{record_key(settings)}): they were hashed onto another count; {advice}"
            )


_SAMPLE = 50
"""Entries per partition stream looked at to tell which count they were hashed onto."""


async def _hash_evidence(
    redis: Redis, settings: Settings, streams: Mapping[int, int]
) -> tuple[str, int]:
    """Whether entries sit in partitions their workflow does not hash to under
    ``CTXD_PARTITIONS`` (an example, or ""), and the smallest count they all fit (0: none).

    Looking at the entries, not at which streams exist: a stream exists only for a
    partition someone created, so the highest one does not tell the count.
    """
    placed: list[tuple[int, int]] = []  # (crc32 of the workflow id, partition)
    misplaced = ""
    for n, waiting in streams.items():
        if not waiting:
            continue
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await redis.xrevrange(partition_stream(settings, n), count=_SAMPLE),
        )
        for _, fields in entries:
            raw = fields.get(b"workflow_id")
            if not raw:
                continue
            workflow_id = _text(raw)
            # partition_of's hash itself (crc32 is below 2**32): then % count for each count.
            placed.append((partition_of(workflow_id, 1 << 32), n))
            if not misplaced and partition_of(workflow_id, settings.partitions) != n:
                misplaced = f"{workflow_id!r} in partition {n}"
    if not misplaced:
        return "", 0
    lowest = max(n for _, n in placed) + 1
    for count in range(lowest, _MAX_COUNT + 1):
        if all(crc % count == n for crc, n in placed):
            return misplaced, count
    return misplaced, 0


_MAX_COUNT = 1024


async def leftover_streams(
    redis: Redis, settings: Settings
) -> tuple[dict[int, int], dict[int, int]]:
    """Partition streams with entries not yet processed, by partition number.

    Returns:
        Those of the layout before hash tags (``{prefix}:part:<n>``), and those of the
        current layout (``{prefix}:{p<n>}:stream``): partition → unfinished entries.
        Each is empty unless some stream of its layout has entries waiting.
    """
    p = settings.stream_prefix
    old: dict[int, int] = {}
    current: dict[int, int] = {}
    for pattern, found in ((f"{p}:part:*", old), (f"{p}:{{p*}}:stream", current)):
        async for raw_key in redis.scan_iter(match=pattern, count=1000, _type="STREAM"):
            key = _text(raw_key)
            number = _partition_number(key, p)
            if number is None:
                continue
            found[number] = await unfinished_entries(redis, key, settings.group)
    # Only worth a refusal while entries wait; then every stream tells the old count.
    return (old if any(old.values()) else {}), (current if any(current.values()) else {})


def _partition_number(key: str, prefix: str) -> int | None:
    rest = key[len(prefix) + 1 :]
    if rest.startswith("part:"):
        digits = rest[len("part:") :]
    elif rest.startswith("{p") and rest.endswith("}:stream"):
        digits = rest[2 : -len("}:stream")]
    else:
        return None
    return int(digits) if digits.isdigit() else None


async def unfinished_entries(redis: Redis, stream: str, group: str) -> int:
    """Entries of ``stream`` that ``group`` has not finished: pending (read, not yet
    acknowledged) plus not yet read. 0 when the stream does not exist."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    mine = next((g for g in groups if _text(g.get("name", b"")) == group), None)
    if mine is None:  # never read by the service: every entry waits
        return int(await redis.xlen(stream))
    pending = int(mine.get("pending") or 0)
    lag = mine.get("lag")
    if lag is not None:
        return pending + int(lag)
    # Redis cannot tell the lag (entries were deleted): count what follows the group.
    after = _text(mine.get("last-delivered-id") or b"0-0")
    unread = await redis.xrange(stream, min=f"({after}", max="+", count=10_000)
    return pending + len(unread or [])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
