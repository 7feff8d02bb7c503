"""Reading ctxd's results and dead letters, on one Redis or on a Redis Cluster.

On a single Redis every result is in one stream, ``ctxd:out``, and every dead letter in
``ctxd:dlq``. On a Redis Cluster (``settings.cluster``) each partition commits its
results to its own stream ``{prefix}:{p<n>}:out`` and its dead letters to
``{prefix}:{p<n>}:dlq``, in the partition's slot, so that the commit (dedupe key, output,
acknowledgement) stays one atomic script. A reader therefore reads a *set* of streams:
:func:`output_streams` and :func:`dead_letter_streams` name it for any deployment.

One command cannot read streams of different slots on a cluster, so the readers here
issue one read per stream, pipelined (redis-py's cluster pipeline sends each node its
share in one round trip). On a single node they read every stream in one blocking
command.

Ordering: a workflow lives in one partition, so its results are in one stream, in the
order they were committed, which is its input order. Results of *different* workflows
come from different streams and have no order between them: a batch is sorted by entry
id (time on the writing node), which is only roughly the commit order across nodes.

:class:`ResultConsumer` is the consumer pattern for applications (docs/operations.md,
"Reading results from a cluster"): one consumer group over all the output streams, own
pending entries first after a restart, explicit acknowledgement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.service.partitions import dlq_stream_of, output_stream_of

__all__ = [
    "Result",
    "ResultConsumer",
    "dead_letter_streams",
    "entry_order",
    "output_streams",
    "partitions_record_key",
    "partitions_to_read",
]


@dataclass(frozen=True)
class Result:
    """One entry of an output or dead-letter stream, decoded.

    Attributes:
        stream: the stream it is in (``ctxd:out``, ``ctxd:{p3}:out``, a DLQ…): what to
            acknowledge it in, and where to look it up again.
        entry_id: its id in that stream.
        fields: its fields (``workflow_id``, ``event_id``, ``status``, ``error``, …).
    """

    stream: str
    entry_id: str
    fields: Mapping[str, str]

    @property
    def workflow_id(self) -> str:
        """The workflow the result belongs to ("" when the entry has none)."""
        return self.fields.get("workflow_id", "")

    @property
    def event_id(self) -> str:
        """The event the result answers ("" when the entry has none)."""
        return self.fields.get("event_id", "")


def entry_order(entry_id: str) -> tuple[int, int]:
    """A sort key for stream entry ids (``ms-seq``), numeric, not textual."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def partitions_record_key(settings: Settings) -> str:
    """The hash where the deployment records its partition count (``{prefix}:partitions``)."""
    return settings.key("partitions")


def partitions_to_read(settings: Settings, record: Mapping[str, str | None]) -> int:
    """How many partitions' streams a reader must cover.

    The largest of the configured count and the recorded ``count`` and ``next`` (a
    resize in progress writes to both): a reader configured with an old count still sees
    every partition that can hold results.
    """
    counts = [settings.partitions]
    for name in ("count", "next"):
        value = record.get(name)
        if value and value.isdigit():
            counts.append(int(value))
    return max(counts)


def output_streams(settings: Settings, partitions: int | None = None) -> list[str]:
    """Every stream results are written to: ``[ctxd:out]``, or one per partition on a cluster.

    Args:
        settings: the deployment's settings (``cluster``, prefix, ``partitions``).
        partitions: the partition count to cover (default ``settings.partitions``; see
            :func:`partitions_to_read`).
    """
    if not settings.cluster:
        return [settings.output_stream]
    return [output_stream_of(settings, n) for n in range(partitions or settings.partitions)]


def dead_letter_streams(settings: Settings, partitions: int | None = None) -> list[str]:
    """Every dead-letter stream: ``[ctxd:dlq]``, or one per partition plus ``ctxd:dlq``.

    On a cluster the shared ``ctxd:dlq`` stays in the list: dead letters that belong to
    no partition (an actor pool's poisoned requests) are still written there.
    """
    if not settings.cluster:
        return [settings.dlq_stream]
    count = partitions or settings.partitions
    return [*(dlq_stream_of(settings, n) for n in range(count)), settings.dlq_stream]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _result(stream: str, entry_id: bytes | str, fields: Mapping[Any, Any] | None) -> Result:
    return Result(
        stream=stream,
        entry_id=_text(entry_id),
        fields={_text(k): _text(v) for k, v in (fields or {}).items()},
    )


class ResultConsumer:
    """A consumer group over every output stream of a deployment (any layout).

    Each stream gets the group (created at ``start_id`` when missing). :meth:`read`
    first returns this consumer's own pending entries (those it read but did not
    acknowledge before a restart), then new ones; :meth:`ack` acknowledges. Several
    consumers with different names in one group share the work; every result goes to
    one of them, and stays pending until acknowledged.

    On a cluster there is one ``XREADGROUP`` per stream (pipelined, grouped per node by
    the client); while nothing is new it polls every ``poll_interval`` seconds until
    ``block_ms`` ran out, since a blocking read can wait on one slot only. On a single
    node it is one blocking ``XREADGROUP`` over all the streams.

    The partition count is re-read from ``{prefix}:partitions`` every
    ``refresh_interval`` seconds, so the streams of partitions added by a resize are
    joined without a restart.

    Results cut by retention (``CTXD_OUTPUT_MAXLEN``) before they were read are gone;
    their pending ids are acknowledged and not returned.

    Redis errors are the caller's: during an outage or a master's fail-over :meth:`read`
    raises redis-py's ``ConnectionError`` (or ``ClusterDownError``); wait and call it
    again, nothing is lost (unacknowledged results stay pending, read first again).

    Args:
        redis: an asyncio client (``redis.asyncio.Redis`` or ``RedisCluster``).
        settings: the deployment's settings (its layout and prefix).
        group: the consumer group's name (one per application).
        consumer: this consumer's stable name within the group (e.g. host name and slot).
        start_id: where a new group starts: ``"0"`` all retained results, ``"$"`` only new.
        count: at most this many entries per stream and read.
        poll_interval: seconds between reads while idle on a cluster.
        refresh_interval: seconds between re-reads of the partition count.
        per_stream: one read per stream (``None``: on a cluster client only; ``True``
            on a single node behaves as on a cluster, for tests).
        clock: a monotonic clock (tests inject one).
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        settings: Settings,
        *,
        group: str,
        consumer: str,
        start_id: str = "0",
        count: int = 100,
        poll_interval: float = 0.1,
        refresh_interval: float = 5.0,
        per_stream: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._group = group
        self._consumer = consumer
        self._start_id = start_id
        self._count = count
        self._poll = poll_interval
        self._refresh_every = refresh_interval
        self._clock = clock
        self._per_stream = isinstance(redis, RedisCluster) if per_stream is None else per_stream
        self._refresh_at = float("-inf")
        # Per stream: "0" (own pending first), the last pending id read, or ">" (new).
        self._cursors: dict[str, str] = {}

    @property
    def streams(self) -> list[str]:
        """The streams this consumer reads (after the first :meth:`read`)."""
        return list(self._cursors)

    async def read(self, block_ms: int = 1000) -> list[Result]:
        """The next results for this consumer, sorted by entry id (may be empty).

        Waits at most ``block_ms`` milliseconds for one when there is none (0: no wait).
        """
        await self._refresh()
        deadline = self._clock() + block_ms / 1000
        reading_pending = any(c != ">" for c in self._cursors.values())
        results = await self._read_once(block_ms)
        while not results and reading_pending:  # own pending done: now new ones
            reading_pending = any(c != ">" for c in self._cursors.values())
            results = await self._read_once(block_ms)
        while self._per_stream and not results and self._clock() < deadline:
            await anyio.sleep(min(self._poll, deadline - self._clock()))
            results = await self._read_once(block_ms)
        return sorted(results, key=lambda r: entry_order(r.entry_id))

    async def ack(self, results: Iterable[Result]) -> int:
        """Acknowledge ``results`` in their streams; returns how many were pending."""
        by_stream: dict[str, list[str]] = {}
        for result in results:
            by_stream.setdefault(result.stream, []).append(result.entry_id)
        if not by_stream:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self._group, *ids)
        return sum(int(n) for n in await pipe.execute())

    async def _read_once(self, block_ms: int) -> list[Result]:
        if self._per_stream:
            return await self._read_per_stream()
        return await self._read_one_command(block_ms)

    async def _refresh(self) -> None:
        """Join the output streams of every partition that can hold results."""
        if self._clock() < self._refresh_at:
            return
        self._refresh_at = self._clock() + self._refresh_every
        count = self._settings.partitions
        if self._settings.cluster:
            record = await self._redis.hmget(
                partitions_record_key(self._settings), ["count", "next"]
            )
            fields = {
                name: _text(value) if value is not None else None
                for name, value in zip(("count", "next"), record, strict=True)
            }
            count = partitions_to_read(self._settings, fields)
        new = [s for s in output_streams(self._settings, count) if s not in self._cursors]
        await self._ensure_groups(new)
        for stream in new:
            self._cursors[stream] = "0"

    async def _ensure_groups(self, streams: Sequence[str]) -> None:
        if not streams:
            return
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xgroup_create(stream, self._group, id=self._start_id, mkstream=True)
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply

    async def _read_one_command(self, block_ms: int) -> list[Result]:
        """Every stream in one XREADGROUP (a single node: no slots to respect)."""
        # Own pending entries are served at once; only a read of new ones blocks.
        # (BLOCK 0 would wait for ever: 0 here means no wait.)
        waiting = block_ms > 0 and all(c == ">" for c in self._cursors.values())
        block = block_ms if waiting else None
        try:
            reply = await self._redis.xreadgroup(
                self._group,
                self._consumer,
                cast(Any, dict(self._cursors)),  # redis-py's key/id mapping type is invariant
                count=self._count,
                block=block,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._ensure_groups(list(self._cursors))  # a stream was deleted
            return []
        replies = {_text(stream): entries for stream, entries in cast(Any, reply) or []}
        return await self._collect(replies)

    async def _read_per_stream(self) -> list[Result]:
        """One non-blocking XREADGROUP per stream, pipelined (a cluster)."""
        streams = list(self._cursors)
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xreadgroup(
                self._group, self._consumer, {stream: self._cursors[stream]}, count=self._count
            )
        replies: dict[str, Any] = {}
        lost: list[str] = []
        for stream, reply in zip(streams, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(reply, Exception):
                if "NOGROUP" not in str(reply):
                    raise reply
                lost.append(stream)
                continue
            replies[stream] = reply[0][1] if reply else []
        await self._ensure_groups(lost)
        return await self._collect(replies)

    async def _collect(self, replies: Mapping[str, Any]) -> list[Result]:
        """Results from per-stream replies; cursors advanced; trimmed pending ids acked."""
        results: list[Result] = []
        gone: list[Result] = []
        for stream, cursor in list(self._cursors.items()):
            entries = replies.get(stream) or []
            if cursor != ">":
                # Reading own pending entries: go on after the last one, or switch to
                # new entries once fewer than a full page came back.
                self._cursors[stream] = (
                    _text(entries[-1][0]) if len(entries) >= self._count else ">"
                )
            for entry_id, fields in entries:
                result = _result(stream, entry_id, fields)
                (results if fields else gone).append(result)
        if gone:
            await self.ack(gone)
        return results
