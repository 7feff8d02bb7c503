"""The one consumer-group read loop: this consumer's pending entries first, then new ones.

Every reader of a stream through a consumer group in ctxd — the owner of each partition,
each actor pool worker — follows the same discipline
(DESIGN.md, "Stream consumer"): on (re)start it reads its own pending list (cursor
``0``) before new entries (``>``), so what a crashed predecessor under the same consumer
name had read is handled first and in order; reads are ``COUNT``- and ``BLOCK``-bounded;
a Redis outage pauses reading and re-reads the pending list once Redis is back; a group
that was deleted (``NOGROUP``) is created again. :func:`consume_group` is that loop,
written once; what differs between the readers is a :class:`GroupSource` (a plain
``XREADGROUP``, or a read fenced by a lease) and the hooks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.redis_io import Entry, ensure_group, read_group

__all__ = ["BatchHandler", "GroupSource", "PlainGroupSource", "ReadyHook", "consume_group"]

_log = structlog.get_logger("ctxd.consumer")

BatchHandler = Callable[[list[Entry], bool], Awaitable[None]]
"""Handles one read: the entries, and whether they came from the pending list (read
before, so their delivery counts may matter)."""

ReadyHook = Callable[[], Awaitable[int | None]]
"""Asked before each read: how many entries may be read now (at most the loop's count);
0 after waiting a little (backpressure, a paused breaker) to be asked again; None to end
the loop (the lease is gone, the caller stops)."""


class GroupSource(Protocol):
    """Where a consumer loop reads: one stream, one group, one consumer name."""

    @property
    def stream(self) -> str:
        """The stream read."""
        ...

    async def read(self, cursor: str, count: int) -> tuple[list[Entry], str]:
        """Up to ``count`` entries after ``cursor`` (``>`` or an id into the pending
        list), and the id to wait after when nothing new came ("" if the read blocked)."""
        ...

    async def wait(self, after: str) -> None:
        """Block until the stream may have entries after ``after`` (or a bound passed)."""
        ...

    async def recreate_group(self) -> None:
        """Create the consumer group again (it was deleted)."""
        ...


class PlainGroupSource:
    """``XREADGROUP`` without a fence; a read of new entries blocks up to ``block_ms``.

    Args:
        redis: the client (bytes replies).
        stream: the stream.
        group: the consumer group.
        consumer: the consumer name.
        block_ms: how long a read of new entries blocks.
    """

    def __init__(
        self, redis: Redis, *, stream: str, group: str, consumer: str, block_ms: int
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._block_ms = block_ms

    @property
    def stream(self) -> str:
        """The stream read."""
        return self._stream

    async def read(self, cursor: str, count: int) -> tuple[list[Entry], str]:
        """One ``XREADGROUP``; blocking only for new entries (a pending read never waits)."""
        entries = await read_group(
            self._redis,
            group=self._group,
            consumer=self._consumer,
            stream=self._stream,
            cursor=cursor,
            count=count,
            block=None if cursor != ">" else self._block_ms,
        )
        return entries, ""

    async def wait(self, after: str) -> None:
        """Nothing to do: the read of new entries has blocked already."""

    async def recreate_group(self) -> None:
        """``XGROUP CREATE ... MKSTREAM`` from the start of the stream."""
        await ensure_group(self._redis, self._stream, self._group)


async def consume_group(
    source: GroupSource,
    handle: BatchHandler,
    *,
    count: int,
    ready: ReadyHook | None = None,
    availability: RedisAvailability | None = None,
    stop: anyio.Event | None = None,
) -> None:
    """Read ``source`` — pending entries first, then new ones — and ``handle`` each batch.

    Returns when ``stop`` is set or ``ready`` says None; raises what ``source`` or
    ``handle`` raise, except that with an ``availability`` monitor a Redis outage is
    reported and waited out (never raised: it is not a crash), after which this
    consumer's pending list is read again (a read may have happened that the outage hid
    from us). Without a monitor, outages are raised for the caller to wait out.

    Args:
        source: the stream, group and consumer, and how to read them.
        handle: called with each non-empty batch.
        count: the most entries one read returns.
        ready: asked before each read (see :data:`ReadyHook`).
        availability: the process's Redis monitor, if the loop waits out outages itself.
        stop: ends the loop once set.
    """
    cursor = "0"
    while stop is None or not stop.is_set():
        if availability is not None and not availability.available:
            await _wait_available(availability, stop)
            cursor = "0"
            continue
        bound = count
        if ready is not None:
            room = await ready()
            if room is None:
                return
            if room <= 0:
                continue
            bound = min(room, count)
        try:
            entries, last = await source.read(cursor, bound)
            if cursor != ">":
                if not entries:
                    cursor = ">"  # the pending list is done: new entries from now on
                    continue
                cursor = entries[-1][0]
                await handle(entries, True)
            elif entries:
                await handle(entries, False)
            else:
                await source.wait(last)
        except ResponseError as exc:
            if availability is not None and is_outage(exc):
                availability.report(exc)
                cursor = "0"
                continue
            if "NOGROUP" not in str(exc):
                raise
            _log.error("consumer group gone; recreating it", stream=source.stream)
            await source.recreate_group()
            cursor = "0"
        except Exception as exc:
            if availability is None or not is_outage(exc):
                raise
            availability.report(exc)  # the loop's top waits it out
            cursor = "0"


async def _wait_available(availability: RedisAvailability, stop: anyio.Event | None) -> None:
    if stop is None:
        await availability.wait_available()
    else:
        await availability.wait_available_or(stop)
