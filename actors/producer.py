"""Send events to ctxd straight to their partition (docs/operations.md, "Producers").

ctxd splits its input into partitions; a workflow's events are all processed from one
partition, in the order they were appended. Appending to ``ctxd:in`` works always (the
partitions' owners move each entry to its partition), but every entry then takes one
more hop. A producer that hashes the workflow id the way the service does can append
straight to the partition stream instead:

    partition = crc32(workflow_id as UTF-8) % count     (zlib.crc32, unsigned)
    stream    = f"{prefix}:{{p{partition}}}:stream"      e.g. ctxd:{p7}:stream

``count`` is the partition count recorded in Redis (hash ``{prefix}:partitions``, field
``count``). While no count is recorded, or its ``state`` is not ``active`` (a resize is
in progress), events go to ``ctxd:in``: the service moves them once the resize is over.
The append to a partition checks the partition's barrier in the same step
(:data:`APPEND_UNLESS_BARRIER`): a resize that began after the record was read turns
it away to ``ctxd:in``.

Example::

    from redis import Redis
    from actors.producer import Producer

    producer = Producer(Redis.from_url("redis://localhost:6379/0"))
    sent = producer.send("orders-42", "Checkout latency rose", event_id="ev-1001")
    print(sent.stream, sent.entry_id)

The fields are ``ctxd:in``'s (DESIGN.md "Stream contract"); the service treats an entry
appended here exactly like a routed one (validation, DLQ, ``event_id`` dedupe), except
that its ``source_id`` is the entry's id in the partition stream. Give every event an
``event_id``: a send retried after a lost reply is then suppressed as a duplicate.
Events of one workflow keep their order when they all go the same way; a workflow's
events sent partly here and partly to ``ctxd:in`` have no order between the two paths.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from actors.service.partition_record import PartitionRecord, record_key_of

__all__ = [
    "AsyncProducer",
    "Producer",
    "Sent",
    "event_fields",
    "input_stream",
    "partition_barrier_name",
    "partition_for",
    "partition_stream_name",
]

_WORKFLOW_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")

APPEND_UNLESS_BARRIER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV))
"""
"""Append to a partition stream unless a resize has set the partition's barrier.

The record is read before the append, so a resize may begin in between; its barrier
(in the partition's slot, set before it checks that the old partitions are drained)
turns such an append away, and the event goes to ``ctxd:in`` instead, where it waits
for the new count in order. KEYS: the partition stream, its barrier. ARGV: the
entry's field/value pairs. Reply: the entry id, or nil when turned away."""
_SOURCE_FIELD = "ctxd_source_id"  # the service's own field: never taken from a producer


def partition_for(workflow_id: str, count: int) -> int:
    """The partition of ``workflow_id`` among ``count``: ``crc32(utf-8) % count``.

    The same function as the service's (actors/service/partitions.py ``partition_of``).
    """
    return zlib.crc32(workflow_id.encode()) % count


def partition_stream_name(prefix: str, partition: int) -> str:
    """A partition's stream: ``{prefix}:{p<n>}:stream`` (the braces are a cluster hash tag)."""
    return f"{prefix}:{{p{partition}}}:stream"


def partition_barrier_name(prefix: str, partition: int) -> str:
    """A partition's barrier, set while a resize drains it: ``{prefix}:{p<n>}:barrier``."""
    return f"{prefix}:{{p{partition}}}:barrier"


def input_stream(prefix: str) -> str:
    """The shared input stream, ``{prefix}:in``."""
    return f"{prefix}:in"


def event_fields(
    workflow_id: str,
    content: str,
    *,
    event_id: str | None = None,
    priority: str | None = None,
    deadline: str | None = None,
    max_cost: float | None = None,
    metadata: Mapping[str, object] | str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
) -> dict[str, str]:
    """An input entry's fields (the service validates them; bad ones reach the DLQ)."""
    fields = {"workflow_id": workflow_id, "content": content}
    if metadata is not None and not isinstance(metadata, str):
        metadata = json.dumps(metadata)
    optional = {
        "event_id": event_id,
        "priority": priority,
        "deadline": deadline,
        "max_cost": None if max_cost is None else repr(max_cost),
        "metadata": metadata
        if metadata is None or isinstance(metadata, str)
        else json.dumps(metadata),
        "traceparent": traceparent,
        "tracestate": tracestate,
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    return fields


@dataclass(frozen=True)
class Sent:
    """Where an event went.

    Attributes:
        stream: the stream it was appended to (a partition stream, or ``ctxd:in``).
        entry_id: its entry id there (the output's ``source_id`` for a partition).
        partition: its partition, or None when it went to ``ctxd:in``.
    """

    stream: str
    entry_id: str
    partition: int | None


class _Target:
    """The choice of stream, with the record cached for ``record_ttl`` seconds."""

    def __init__(self, prefix: str, record_ttl: float) -> None:
        self.prefix = prefix
        self.record_key = record_key_of(prefix)
        self._ttl = record_ttl
        self._record: PartitionRecord | None = None
        self._read_at = float("-inf")

    def fresh(self) -> bool:
        return time.monotonic() - self._read_at < self._ttl

    def remember(self, raw: Mapping[bytes | str, bytes | str]) -> None:
        self._record = PartitionRecord.from_hash(raw)
        self._read_at = time.monotonic()

    def choose(
        self, fields: Mapping[str, str], via_input: bool
    ) -> tuple[str, int | None, dict[str, str]]:
        own = {k: v for k, v in fields.items() if k != _SOURCE_FIELD}
        workflow_id = own.get("workflow_id", "")
        record = self._record
        if (
            via_input
            or record is None
            or not record.active
            or record.count < 1
            or not _WORKFLOW_ID.fullmatch(workflow_id)  # the service dead-letters it
        ):
            return input_stream(self.prefix), None, own
        n = partition_for(workflow_id, record.count)
        return partition_stream_name(self.prefix, n), n, own


class Producer:
    """Appends events straight to their partition stream (or to ``ctxd:in``).

    Args:
        redis: a client of the Redis ctxd uses (a cluster client on a cluster).
        prefix: ``CTXD_STREAM_PREFIX`` of the deployment (default ``ctxd``).
        record_ttl: seconds the partition record is reused before it is read again.
            0 (default) reads it for every event: a resize is seen at once. A longer
            time saves a round trip per event; an event sent to an old partition
            during a resize is still processed once (the service moves it to its
            workflow's partition) but may overtake earlier events of its workflow.
    """

    def __init__(self, redis: Redis, *, prefix: str = "ctxd", record_ttl: float = 0.0) -> None:
        self._redis = redis
        self._target = _Target(prefix, record_ttl)
        self._append = redis.register_script(APPEND_UNLESS_BARRIER)

    def send(
        self,
        workflow_id: str,
        content: str,
        *,
        event_id: str | None = None,
        priority: str | None = None,
        deadline: str | None = None,
        max_cost: float | None = None,
        metadata: Mapping[str, object] | str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        via_input: bool = False,
    ) -> Sent:
        """Append one event (the fields of :func:`event_fields`) and say where it went;
        ``via_input`` sends it to ``ctxd:in`` whatever the record says."""
        return self.send_fields(
            event_fields(
                workflow_id,
                content,
                event_id=event_id,
                priority=priority,
                deadline=deadline,
                max_cost=max_cost,
                metadata=metadata,
                traceparent=traceparent,
                tracestate=tracestate,
            ),
            via_input=via_input,
        )

    def send_fields(self, fields: Mapping[str, str], *, via_input: bool = False) -> Sent:
        """Append an entry of ``ctxd:in``'s fields; ``via_input`` forces ``ctxd:in``."""
        if not via_input and not self._target.fresh():
            self._target.remember(self._redis.hgetall(self._target.record_key))
        stream, n, own = self._target.choose(fields, via_input)
        if n is not None:
            keys = [stream, partition_barrier_name(self._target.prefix, n)]
            entry_id = self._append(keys=keys, args=_flat(own))
            if entry_id is not None:
                return Sent(stream, _text(entry_id), n)
            stream, n = input_stream(self._target.prefix), None  # a resize holds it
        entry_id = self._redis.xadd(stream, own)  # type: ignore[arg-type]
        return Sent(stream, _text(entry_id), n)


class AsyncProducer:
    """:class:`Producer` for asyncio (a ``redis.asyncio`` client); the same arguments."""

    def __init__(self, redis: AsyncRedis, *, prefix: str = "ctxd", record_ttl: float = 0.0) -> None:
        self._redis = redis
        self._target = _Target(prefix, record_ttl)
        self._append = redis.register_script(APPEND_UNLESS_BARRIER)

    async def send(
        self,
        workflow_id: str,
        content: str,
        *,
        event_id: str | None = None,
        priority: str | None = None,
        deadline: str | None = None,
        max_cost: float | None = None,
        metadata: Mapping[str, object] | str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        via_input: bool = False,
    ) -> Sent:
        """Append one event (the fields of :func:`event_fields`) and say where it went;
        ``via_input`` sends it to ``ctxd:in`` whatever the record says."""
        return await self.send_fields(
            event_fields(
                workflow_id,
                content,
                event_id=event_id,
                priority=priority,
                deadline=deadline,
                max_cost=max_cost,
                metadata=metadata,
                traceparent=traceparent,
                tracestate=tracestate,
            ),
            via_input=via_input,
        )

    async def send_fields(self, fields: Mapping[str, str], *, via_input: bool = False) -> Sent:
        """Append an entry of ``ctxd:in``'s fields; ``via_input`` forces ``ctxd:in``."""
        if not via_input and not self._target.fresh():
            self._target.remember(await self._redis.hgetall(self._target.record_key))
        stream, n, own = self._target.choose(fields, via_input)
        if n is not None:
            keys = [stream, partition_barrier_name(self._target.prefix, n)]
            entry_id = await self._append(keys=keys, args=_flat(own))
            if entry_id is not None:
                return Sent(stream, _text(entry_id), n)
            stream, n = input_stream(self._target.prefix), None  # a resize holds it
        entry_id = await self._redis.xadd(stream, own)  # type: ignore[arg-type]
        return Sent(stream, _text(entry_id), n)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat(fields: Mapping[str, str]) -> list[str]:
    return [part for pair in fields.items() for part in pair]
