"""The fenced-write gateway: every write the stream service makes with a guarantee.

Each function here runs one script of :mod:`actors.runtime.scripts` and says, in its
types, what it writes. A write fenced by a lease raises
:class:`~graph.errors.FencedError` when the lease moved (the script checked it in the
same step as the write), so callers catch a type, not an error string.

- :class:`OutputCommitter` is the one commit path: for each event, ``SET
  done:{workflow_id}/{event_id} NX`` (:func:`~actors.service.streams.done_key`), then
  ``XADD out`` only if the key was new, then settle the input — acknowledged in a
  partition (a batch) or deleted from a parked stream (a replay). A crash before the
  script leaves the input pending (redelivered; the workflow's outbox answers it
  without reprocessing); a crash after it leaves nothing to redo. A repeated
  ``event_id`` within a workflow is settled without a second output.
- :func:`dead_letter` is the one DLQ path, for stream entries and actor requests: the
  bounded copy (:func:`~actors.service.streams.dlq_entry`) and the settling in one script.
- :class:`FencedReader` reads a consumer group only while holding a lease.
- :func:`route_partition` is a partition owner's move of its entries of ``ctxd:in``
  into its partition (cursor, exactly once); :func:`route_entries` moves entries of one
  partition to the partition their workflow hashes to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from redis.asyncio import Redis
from redis.crc import key_slot
from redis.typing import EncodableT, FieldT

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.redis_io import is_cluster_client, text
from actors.runtime.scripts import call_script
from actors.service.streams import DLQ_MIN_FIELDS, dlq_entry, done_key, output_fields
from graph.errors import FencedError

__all__ = [
    "CommitItem",
    "FencedReader",
    "Lease",
    "OutputCommitter",
    "RouteCall",
    "RouteReply",
    "Settle",
    "dead_letter",
    "move_home",
    "output_item",
    "route_entries",
    "route_partition",
    "route_partitions",
    "same_slot",
]

Lease = tuple[str, str]
"""A lease a write is fenced by: its key and the value this process holds in it."""

_XReadReply = list[tuple[bytes, list[tuple[bytes, list[bytes] | None]]]]

Settle = Literal["ack", "delete"]
"""How a consumed input is settled: acknowledged in its group, or deleted (parked)."""


@dataclass(frozen=True)
class CommitItem:
    """One event's output, ready to commit.

    Attributes:
        source_id: the input entry id to settle.
        done_key: the dedupe key of the event id.
        fields: the output entry's fields (none: settle the input only).
    """

    source_id: str
    done_key: str
    fields: Mapping[str, str]


def output_item(
    settings: Settings,
    workflow_id: str,
    event_id: str,
    source_id: str,
    result: Mapping[str, object] | None,
    *,
    trace_id: str,
    checkpoint_id: str,
) -> CommitItem:
    """What one event commits: its output (:func:`~actors.service.streams.output_fields`)
    under its done key, settling input entry ``source_id``; no output when ``result`` is
    None (a duplicate, or an event settled elsewhere). Every commit builds its items here.
    """
    fields = {}
    if result is not None:
        fields = output_fields(result, trace_id=trace_id, checkpoint_id=checkpoint_id)
    return CommitItem(
        source_id=source_id, done_key=done_key(settings, workflow_id, event_id), fields=fields
    )


class OutputCommitter:
    """Writes outputs and settles inputs atomically, suppressing duplicates.

    Args:
        redis: the client.
        input_stream: the stream whose entries are acknowledged by default.
        output_stream: the stream results are appended to.
        group: the consumer group.
        dedupe_ttl: seconds a done key lives (the window in which duplicates are caught).
    """

    def __init__(
        self, redis: Redis, *, input_stream: str, output_stream: str, group: str, dedupe_ttl: int
    ) -> None:
        self._redis = redis
        self._input = input_stream
        self._output = output_stream
        self._group = group
        self._ttl = dedupe_ttl

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> OutputCommitter:
        """The committer of ``ctxd:in`` → ``ctxd:out`` for these settings."""
        return cls(
            redis,
            input_stream=settings.input_stream,
            output_stream=settings.output_stream,
            group=settings.group,
            dedupe_ttl=settings.dedupe_ttl,
        )

    async def commit(
        self,
        items: Sequence[CommitItem],
        *,
        input_stream: str | None = None,
        output_stream: str | None = None,
        lease: Lease | None = None,
        settle: Settle = "ack",
    ) -> list[str]:
        """Commit ``items`` in one script; return output ids ("" where a duplicate).

        Args:
            items: the events' outputs.
            input_stream: the stream their inputs are in (default: the committer's).
            output_stream: where the outputs go (default: the committer's); on a Redis
                Cluster, the partition's own output stream, in the partition's slot.
            lease: the lease the write is fenced by (unfenced when None).
            settle: ``ack`` the inputs in the group, or ``delete`` them (parked entries).

        Raises:
            FencedError: ``lease`` does not hold our value any more; nothing was written.
        """
        if not items:
            return []
        output = output_stream or self._output
        lease_key, lease_value = lease or (output, "")
        keys = [
            lease_key,
            output,
            input_stream or self._input,
            *(item.done_key for item in items),
        ]
        args: list[str | int] = [lease_value, self._group, self._ttl, settle, len(items)]
        for item in items:
            args += [item.source_id, len(item.fields)]
            for name, value in item.fields.items():
                args += [name, value]
        result = await call_script(self._redis, scripts.COMMIT, keys=keys, args=args)
        return [text(r) if isinstance(r, bytes) else str(r) for r in cast(list[object], result)]


async def dead_letter(
    redis: Redis,
    *,
    dlq_stream: str,
    input_stream: str,
    group: str,
    source_id: str,
    fields: Mapping[str, str | bytes] | Mapping[bytes, bytes] | Mapping[str | bytes, str | bytes],
    reason: str,
    error: str,
    attempts: int,
    lease: Lease | None = None,
    field_bytes: int = 4096,
    max_fields: int = DLQ_MIN_FIELDS,
    original_id: str | None = None,
    done_key: str | None = None,
    settle: Settle = "ack",
) -> str:
    """Append the entry to the DLQ with why, and settle it, atomically.

    With ``done_key``, an event whose output is already committed is only settled and
    "" returned: a run whose commit reply was lost looks failed to its process, and
    must not end as a dead letter as well as an output.

    The copy is bounded by :func:`~actors.service.streams.dlq_entry` (``field_bytes``,
    ``max_fields``), which also says where the DLQ's ``source_id`` comes from
    (``original_id`` first).

    Raises:
        FencedError: ``lease`` does not hold our value any more; nothing was written.
    """
    entry = dlq_entry(
        fields,
        reason=reason,
        error=error,
        attempts=attempts,
        source_id=source_id,
        field_bytes=field_bytes,
        max_fields=max_fields,
        original_id=original_id,
    )
    if lease is None and done_key is None and not same_slot(redis, dlq_stream, input_stream):
        return await _dead_letter_across_slots(
            redis, dlq_stream, input_stream, group, source_id, entry, settle
        )
    lease_key, lease_value = lease or (dlq_stream, "")
    args: list[str | bytes] = [lease_value, group, source_id, settle]
    for name, value in entry.items():
        args += [name, value]
    keys = [lease_key, dlq_stream, input_stream, *([done_key] if done_key else [])]
    dlq_id = await call_script(redis, scripts.DEAD_LETTER, keys=keys, args=args)
    return text(dlq_id) if isinstance(dlq_id, bytes) else str(dlq_id)


def same_slot(redis: Redis, *keys: str) -> bool:
    """Whether one script may touch all ``keys``: always on one server; on a Redis
    Cluster only when they hash to one slot."""
    return not is_cluster_client(redis) or len({key_slot(k.encode()) for k in keys}) == 1


async def _dead_letter_across_slots(
    redis: Redis,
    dlq_stream: str,
    input_stream: str,
    group: str,
    source_id: str,
    entry: Mapping[bytes, bytes],
    settle: Settle,
) -> str:
    """An unfenced dead letter whose DLQ and input are in different cluster slots (an
    actor request: its mailbox and ``ctxd:dlq``): append, then settle.

    Not atomic: a crash between the two leaves the request pending, and its next
    delivery dead-letters it again (a second DLQ copy, never a lost one). Partition
    entries never come here: their DLQ is in their partition's slot.
    """
    copy: dict[FieldT, EncodableT] = dict(entry.items())
    dlq_id = await redis.xadd(dlq_stream, copy)
    async with redis.pipeline(transaction=False) as pipe:  # one slot: the input stream
        if settle == "delete":
            pipe.xdel(input_stream, source_id)
        else:
            pipe.xack(input_stream, group, source_id)
        await pipe.execute()
    return text(dlq_id)


async def route_entries(
    redis: Redis,
    *,
    lease: Lease,
    input_stream: str,
    group: str,
    moves: Sequence[tuple[str, str, Mapping[bytes, bytes]]],
) -> None:
    """Append each ``(source_id, target_stream, fields)`` to its target and acknowledge
    its source in ``input_stream``, all in one script fenced by ``lease`` (the router's,
    or a partition's when an entry is moved to the partition its workflow hashes to).

    Raises:
        FencedError: the lease does not hold our value any more.
    """
    if not moves:
        return
    keys = [lease[0], input_stream]
    args: list[str | bytes | int] = [lease[1], group, len(moves)]
    for source_id, target, fields in moves:
        keys.append(target)
        args += [source_id, len(fields)]
        for name, value in fields.items():
            args += [name, value]
    await call_script(redis, scripts.MOVE, keys=keys, args=args)


async def move_home(
    redis: Redis,
    *,
    lease: Lease,
    stream: str,
    group: str,
    entry_id: str,
    target: str,
    fields: Mapping[bytes, bytes],
    marker: str,
    marker_ttl: int,
) -> None:
    """Move one entry from ``stream`` (its partition) to ``target`` (its workflow's).

    On a single node one script appends and acknowledges, fenced by ``lease``
    (:func:`route_entries`). On a cluster the two streams are in different slots, so it
    takes two scripts: append once in the target's slot (``marker``, a key there, says
    it was done: a retry after a crash, or a zombie, appends nothing again), then
    acknowledge in the source's slot, fenced by ``lease``.

    Raises:
        FencedError: the lease does not hold our value any more (nothing acknowledged).
    """
    if isinstance(redis, Redis):
        await route_entries(
            redis, lease=lease, input_stream=stream, group=group, moves=[(entry_id, target, fields)]
        )
        return
    args: list[str | bytes | int] = [marker_ttl]
    for name, value in fields.items():
        args += [name, value]
    await call_script(redis, scripts.MOVE_ONCE, keys=[marker, target], args=args)
    await call_script(
        redis, scripts.FENCED_ACK, keys=[lease[0], stream], args=[lease[1], group, entry_id]
    )


@dataclass(frozen=True)
class RouteReply:
    """What :func:`route_partition` did.

    Attributes:
        status: ``ok`` (moved, cursor advanced), ``resync`` (the stored cursor is not the
            one the caller expected: nothing moved, start again from ``cursor``) or
            ``exists`` (an upgrade's first cursor was set already: nothing moved).
        cursor: the partition's cursor now (the last ``ctxd:in`` id moved or scanned).
        moved: entries appended (to the partition or the DLQ).
        barrier: the partition's barrier, if one is set (nothing past it moves).
    """

    status: Literal["ok", "resync", "exists"]
    cursor: str
    moved: int
    barrier: str | None = None


async def route_partition(
    redis: Redis,
    *,
    lease: Lease,
    cursor_key: str,
    stream: str,
    dlq_stream: str,
    barrier_key: str,
    expected: str,
    scanned: str,
    items: Sequence[tuple[str, Literal["stream", "dlq"], Mapping[bytes, bytes]]],
) -> RouteReply:
    """Append a partition's entries of ``ctxd:in`` (``(source_id, target, fields)`` in
    ``ctxd:in`` order) to its stream or DLQ, skipping those at or below its cursor, and
    move its cursor to ``scanned``: one script, every key in the partition's slot.

    Args:
        lease: the partition lease (value '' = unfenced: the upgrade's first cursor).
        cursor_key: the partition's cursor key.
        stream: the partition stream.
        dlq_stream: where ``dlq`` items go (the partition's DLQ).
        barrier_key: the partition's barrier (nothing past its id is moved while set).
        expected: the cursor this caller last saw ('' = any, '!' = only if none yet).
        scanned: the last ``ctxd:in`` id the caller read for this call.
        items: the entries to move.

    Raises:
        FencedError: the lease does not hold our value any more; nothing was written.
    """
    call = RouteCall(lease, cursor_key, stream, dlq_stream, barrier_key, expected, scanned, items)
    reply = await call_script(redis, scripts.ROUTE_PARTITION, keys=call.keys(), args=call.args())
    return _route_reply(reply)


@dataclass(frozen=True)
class RouteCall:
    """One partition's part of a batch: the arguments of :func:`route_partition`."""

    lease: Lease
    cursor_key: str
    stream: str
    dlq_stream: str
    barrier_key: str
    expected: str
    scanned: str
    items: Sequence[tuple[str, Literal["stream", "dlq"], Mapping[bytes, bytes]]]

    def keys(self) -> list[str]:
        """The script's KEYS."""
        return [self.lease[0], self.cursor_key, self.stream, self.dlq_stream, self.barrier_key]

    def args(self) -> list[str | bytes | int]:
        """The script's ARGV."""
        args: list[str | bytes | int] = [
            self.lease[1],
            self.expected,
            self.scanned,
            len(self.items),
        ]
        for source_id, target, fields in self.items:
            args += [source_id, target, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        return args


async def route_partitions(
    redis: Redis, calls: Sequence[RouteCall]
) -> list[RouteReply | FencedError]:
    """:func:`route_partition` for several partitions: one round trip on a single node
    (a pipeline; each script is still atomic on its own), one call each otherwise (a
    cluster client, whose partitions are on several nodes). A refused call's result is
    its :class:`~graph.errors.FencedError`; the others are done all the same."""
    if not isinstance(redis, Redis):  # a cluster client: one call per partition
        results: list[RouteReply | FencedError] = []
        for call in calls:
            try:
                results.append(await route_partition(redis, **call.__dict__))
            except FencedError as exc:
                results.append(exc)
        return results
    async with redis.pipeline(transaction=False) as pipe:
        for call in calls:
            await call_script(
                redis, scripts.ROUTE_PARTITION, keys=call.keys(), args=call.args(), client=pipe
            )
        replies = await pipe.execute(raise_on_error=False)
    out: list[RouteReply | FencedError] = []
    for reply in replies:
        if isinstance(reply, Exception):
            if not scripts.is_fenced(reply):
                raise reply
            out.append(FencedError(str(reply).removeprefix("FENCED ")))
        else:
            out.append(_route_reply(reply))
    return out


def _route_reply(reply: object) -> RouteReply:
    status, cursor, moved, barrier = cast(list[bytes | str | int], reply)
    return RouteReply(
        status=cast(Literal["ok", "resync", "exists"], text(cast(bytes | str, status))),
        cursor=text(cast(bytes | str, cursor)),
        moved=int(moved),
        barrier=text(cast(bytes | str, barrier)) or None,
    )


class FencedReader:
    """``XREADGROUP`` that only reads while the caller holds a lease.

    A reader whose lease expired (a paused process, a "zombie") must not move new
    entries into the group's pending list: the new lease holder has already read that
    list and would never see them, and they would be lost or reordered. Checking the
    lease and reading in one script closes that gap. Scripts cannot block, so when
    nothing new is there the caller waits with a plain ``XREAD BLOCK`` (:meth:`wait`)
    from the stream's last id.

    Args:
        redis: the client.
        group: the consumer group.
        consumer: the consumer name.
    """

    def __init__(self, redis: Redis, *, group: str, consumer: str) -> None:
        self._redis = redis
        self._group = group
        self._consumer = consumer

    async def read(
        self, stream: str, cursor: str, count: int, *, lease: Lease
    ) -> tuple[list[tuple[str, dict[bytes, bytes] | None]], str]:
        """Read up to ``count`` entries after ``cursor`` (``>`` or a PEL id).

        Returns:
            The entries and the stream's last entry id ("0-0" when empty).

        Raises:
            FencedError: the lease no longer holds our value; nothing was read.
        """
        reply = await call_script(
            self._redis,
            scripts.FENCED_READ,
            keys=[lease[0], stream],
            args=[lease[1], self._group, self._consumer, count, cursor],
        )
        got, last = cast(tuple[_XReadReply, list[tuple[bytes, object]]], reply)
        entries: list[tuple[str, dict[bytes, bytes] | None]] = []
        for _, stream_entries in got or []:
            for entry_id, flat in stream_entries:
                fields = None
                if flat is not None:
                    fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
                entries.append((text(entry_id), fields))
        last_id = text(last[0][0]) if last else "0-0"
        return entries, last_id

    async def wait(self, stream: str, after: str, block_ms: int) -> None:
        """Block until ``stream`` has an entry after ``after`` (or ``block_ms`` passed)."""
        await self._redis.xread({stream: after}, count=1, block=block_ms)
