"""Backlog gauges: ``ctxd.stream.pending`` and ``ctxd.stream.lag`` from ``XINFO GROUPS``.

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

from actors.runtime.redis_io import text
from telemetry.metrics import Instruments, StreamReading

__all__ = ["poll_stream_gauges", "read_stream_backlog"]

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


async def poll_stream_gauges(
    redis: Redis,
    streams: Sequence[str],
    instruments: Instruments,
    interval: float,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Feed the stream gauges until cancelled.

    Args:
        redis: the client.
        streams: the streams to watch (the input stream, the actor mailboxes).
        instruments: where the gauges live.
        interval: seconds between reads.
        task_status: started once the gauges are registered.
    """
    latest: list[StreamReading] = []
    unregister = instruments.register_stream_gauges(lambda: tuple(latest))
    try:
        task_status.started()
        while True:
            try:
                latest = await read_stream_backlog(redis, streams)
            except RedisError as exc:  # keep the last readings; try again next time
                _log.warning("stream backlog read failed", error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(interval)
    finally:
        unregister()
