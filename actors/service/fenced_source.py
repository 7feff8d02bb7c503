"""A consumer-group source whose every read holds a lease (the partition owners).

:func:`~actors.runtime.consumer.consume_group` reads through a
:class:`~actors.runtime.consumer.GroupSource`; this one reads with
:class:`~actors.service.gateway.FencedReader` (``XREADGROUP`` inside a script that first
checks the lease), so a process that lost its lease cannot move entries into a pending
list the new holder has already read. A refused read is :class:`~graph.errors.FencedError`.
"""

from __future__ import annotations

from redis.asyncio import Redis

from actors.runtime.redis_io import Entry, ensure_group
from actors.service.gateway import FencedReader

__all__ = ["FencedGroupSource"]


class FencedGroupSource:
    """A :class:`~actors.runtime.consumer.GroupSource` whose reads hold a lease.

    Args:
        redis: the client.
        reader: the fenced ``XREADGROUP`` of the consumer.
        stream: the stream read.
        group: the consumer group.
        lease: ``(key, value)`` the reads are fenced by.
        block_ms: how long to wait for new entries when there are none.

    Raises (from :meth:`read`):
        FencedError: the lease no longer holds our value.
    """

    def __init__(
        self,
        redis: Redis,
        reader: FencedReader,
        *,
        stream: str,
        group: str,
        lease: tuple[str, str],
        block_ms: int,
    ) -> None:
        self._redis = redis
        self._reader = reader
        self._stream = stream
        self._group = group
        self._lease = lease
        self._block_ms = block_ms

    @property
    def stream(self) -> str:
        """The stream read."""
        return self._stream

    async def read(self, cursor: str, count: int) -> tuple[list[Entry], str]:
        """The fenced read; a lost lease is :class:`~graph.errors.FencedError`."""
        return await self._reader.read(self._stream, cursor, count, lease=self._lease)

    async def wait(self, after: str) -> None:
        """``XREAD BLOCK`` from the stream's last id (a script cannot block)."""
        await self._reader.wait(self._stream, after, self._block_ms)

    async def recreate_group(self) -> None:
        """Create the consumer group again."""
        await ensure_group(self._redis, self._stream, self._group)
