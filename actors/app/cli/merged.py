"""Reading several streams as one, for the commands (``tail``, ``dlq``, ``status``).

On a Redis Cluster the results and dead letters are spread over one stream per
partition (:mod:`actors.results`). A multi-key command may only name keys of one slot,
so every read here is one command per stream, pipelined (the cluster client sends each
node its share in one round trip), and the entries are merged by id. On a single node a
follow reads all the streams in one blocking ``XREAD``.

The merge is by entry id, that is by time on the node that wrote the entry: each
stream's own order is kept exactly (a workflow's results are in one stream, so its
order holds), while entries of different streams are only roughly in commit order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

from redis import Redis as SyncRedis
from redis.cluster import RedisCluster

from actors.config import Settings
from actors.results import Result, entry_order, partitions_record_key, partitions_to_read
from actors.service.partitions import partition_of

__all__ = [
    "Follower",
    "Newest",
    "is_cluster_client",
    "newest",
    "oldest",
    "partition_count",
    "stream_lengths",
    "workflow_partitions",
]


def is_cluster_client(redis: SyncRedis) -> bool:
    """Whether ``redis`` is redis-py's cluster client (typed as ``Redis`` by the commands)."""
    return isinstance(redis, RedisCluster)


def _record(redis: SyncRedis, settings: Settings) -> dict[str, str | None]:
    values = cast(list[str | None], redis.hmget(partitions_record_key(settings), ["count", "next"]))
    return dict(zip(("count", "next"), values, strict=True))


def partition_count(redis: SyncRedis, settings: Settings) -> int:
    """How many partitions' streams to read (the recorded count wins when larger)."""
    if not settings.cluster:
        return settings.partitions
    return partitions_to_read(settings, _record(redis, settings))


def workflow_partitions(redis: SyncRedis, settings: Settings, workflow_id: str) -> list[int]:
    """The partitions that can hold ``workflow_id``'s results.

    The partition under the recorded count (a command's own ``CTXD_PARTITIONS`` may be
    unset or stale), and during a resize also the one under the next count.
    """
    record = _record(redis, settings)
    counts = [int(v) for v in record.values() if v and v.isdigit()] or [settings.partitions]
    return sorted({partition_of(workflow_id, count) for count in counts})


def _entries(stream: str, reply: object) -> list[Result]:
    return [
        Result(stream=stream, entry_id=entry_id, fields=fields or {})
        for entry_id, fields in cast(list[tuple[str, dict[str, str] | None]], reply or [])
    ]


class Newest(NamedTuple):
    """The newest entries over several streams, and where a follow goes on from."""

    entries: list[Result]
    """The newest ``count`` over all the streams, oldest first."""
    cursors: dict[str, str]
    """Per stream, the id of its newest entry (``0-0`` when empty): a follow from these
    misses nothing and repeats nothing, whichever entries made the merged cut."""


def newest(redis: SyncRedis, streams: Sequence[str], count: int) -> Newest:
    """The newest ``count`` entries over ``streams``, and each stream's newest id."""
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xrevrange(stream, count=max(count, 1))
    merged: list[Result] = []
    cursors: dict[str, str] = {}
    for stream, reply in zip(streams, pipe.execute(), strict=True):
        entries = _entries(stream, reply)
        cursors[stream] = entries[0].entry_id if entries else "0-0"
        merged += entries
    merged.sort(key=lambda r: entry_order(r.entry_id))
    return Newest(merged[-count:] if count > 0 else [], cursors)


def oldest(redis: SyncRedis, streams: Sequence[str], count: int) -> list[Result]:
    """The oldest ``count`` entries over ``streams``, oldest first."""
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xrange(stream, count=count)
    merged = [
        entry
        for stream, reply in zip(streams, pipe.execute(), strict=True)
        for entry in _entries(stream, reply)
    ]
    merged.sort(key=lambda r: entry_order(r.entry_id))
    return merged[:count] if count > 0 else []


def stream_lengths(redis: SyncRedis, streams: Sequence[str]) -> dict[str, int]:
    """``XLEN`` of every stream, pipelined (0 for a stream that does not exist)."""
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xlen(stream)
    return {s: int(n) for s, n in zip(streams, pipe.execute(), strict=True)}


class Follower:
    """New entries of several streams, each after its own cursor.

    On a single node one ``XREAD BLOCK`` covers every stream. On a cluster (or with
    ``per_stream=True``) each read is one non-blocking ``XREAD`` per stream, pipelined,
    repeated every ``poll_interval`` seconds until something arrives or ``block_ms`` ran
    out: a blocking read can wait on one slot only.

    Args:
        redis: a decoding client, single node or cluster.
        cursors: per stream, the id after which to read (``0-0``: from the start).
        per_stream: read stream by stream (``None``: on a cluster client only).
        poll_interval: seconds between polls while idle, per stream reads only.
        clock: a monotonic clock.
    """

    def __init__(
        self,
        redis: SyncRedis,
        cursors: Mapping[str, str],
        *,
        per_stream: bool | None = None,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self.cursors = dict(cursors)
        self._per_stream = is_cluster_client(redis) if per_stream is None else per_stream
        self._poll = poll_interval
        self._clock = clock

    def read(self, block_ms: int, count: int = 100) -> list[Result]:
        """Entries newer than the cursors, sorted by id; the cursors move past them."""
        if self._per_stream:
            deadline = self._clock() + block_ms / 1000
            found = self._poll_once(count)
            while not found and self._clock() < deadline:
                time.sleep(min(self._poll, deadline - self._clock()))
                found = self._poll_once(count)
        else:
            reply = cast(
                Any, self._redis.xread(cast(Any, self.cursors), count=count, block=block_ms)
            )
            found = [e for stream, entries in reply or [] for e in _entries(stream, entries)]
        for entry in found:  # within a stream, ids grow: the last one is the new cursor
            self.cursors[entry.stream] = entry.entry_id
        return sorted(found, key=lambda r: entry_order(r.entry_id))

    def _poll_once(self, count: int) -> list[Result]:
        streams = list(self.cursors)
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xread({stream: self.cursors[stream]}, count=count)
        return [
            entry
            for stream, reply in zip(streams, pipe.execute(), strict=True)
            for _, entries in cast(Any, reply) or []
            for entry in _entries(stream, entries)
        ]
