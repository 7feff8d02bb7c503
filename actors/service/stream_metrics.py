"""Backlog gauges: ``ctxd.stream.pending`` and ``ctxd.stream.lag`` from ``XINFO GROUPS``.

``ctxd:in`` has no consumer group: its lag is the number of entries after the lowest
partition cursor (not moved into every partition yet), reported under the group name
``partitions`` (:func:`read_input_lag`).

The SDK's metric thread must not talk to Redis, so the daemon runs
:func:`poll_stream_gauges`: every ``interval`` seconds it reads ``XINFO GROUPS`` of each
watched stream on the event loop, keeps the readings, and the gauges' callback returns
the latest ones (see :meth:`telemetry.Instruments.register_stream_gauges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from actors.config import Settings
from actors.runtime.redis_io import text
from actors.service.input_routing import cursor_key, id_key
from telemetry.metrics import Instruments, StreamReading

__all__ = ["INPUT_GROUP", "poll_stream_gauges", "read_input_lag", "read_stream_backlog"]

INPUT_GROUP = "partitions"
"""The group name ``ctxd:in``'s lag is reported under (it has no consumer group)."""

_INPUT_LAG_LIMIT = 10_000
"""Entries of ``ctxd:in`` counted at most per reading (a bounded XRANGE)."""

_log = structlog.get_logger("ctxd.metrics")


async def read_stream_backlog(redis: Redis, streams: Sequence[str]) -> list[StreamReading]:
    """One ``XINFO GROUPS`` per stream: pending and lag of every consumer group.

    Streams that do not exist (yet) are skipped.

    Args:
        redis: the client.
        streams: stream keys.

    Returns:
        One reading per stream and group.
    """
    readings: list[StreamReading] = []
    for stream in streams:
        try:
            groups = cast(list[dict[Any, Any]], await redis.xinfo_groups(stream))
        except ResponseError:  # no such key
            continue
        for group in groups:
            fields = {text(k): v for k, v in group.items()}
            lag = fields.get("lag")
            readings.append(
                StreamReading(
                    stream=stream,
                    group=text(fields["name"]),
                    pending=int(fields.get("pending") or 0),
                    lag=int(lag) if lag is not None else None,
                )
            )
    return readings


async def read_input_lag(redis: Redis, settings: Settings) -> StreamReading:
    """``ctxd:in``'s lag: entries after the lowest partition cursor, counted up to
    10,000 (a partition without a cursor counts from the start)."""
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(settings.partitions):
            pipe.get(cursor_key(settings, n))
        cursors = await pipe.execute()
    lowest = min((text(c) if c is not None else "0-0" for c in cursors), key=id_key)
    after = await redis.xrange(settings.input_stream, f"({lowest}", "+", count=_INPUT_LAG_LIMIT)
    return StreamReading(settings.input_stream, INPUT_GROUP, pending=0, lag=len(after or []))


async def poll_stream_gauges(
    redis: Redis,
    streams: Sequence[str],
    instruments: Instruments,
    interval: float,
    *,
    settings: Settings | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Feed the stream gauges until cancelled.

    Args:
        redis: the client.
        streams: the streams to watch (the input stream, the actor mailboxes).
        instruments: where the gauges live.
        interval: seconds between reads.
        settings: with them, ``ctxd:in``'s lag from the partition cursors is read too.
        task_status: started once the gauges are registered.
    """
    latest: list[StreamReading] = []
    unregister = instruments.register_stream_gauges(lambda: tuple(latest))
    try:
        task_status.started()
        while True:
            try:
                readings = await read_stream_backlog(redis, streams)
                if settings is not None:
                    readings.append(await read_input_lag(redis, settings))
                latest = readings
            except RedisError as exc:  # keep the last readings; try again next time
                _log.warning("stream backlog read failed", error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(interval)
    finally:
        unregister()
