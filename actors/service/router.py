"""The router: ``ctxd:in`` → one partition stream per workflow hash.

Exactly one instance routes at a time: the holder of the router lease (with a fencing
token). It reads ``ctxd:in`` through the consumer group under the fixed consumer name
``router``, so a new router first reads the pending entries of the one before it and
the input order is kept across failovers. Reads are fenced by the lease too
(:class:`~actors.service.gateway.FencedReader`): a router that lost its lease cannot move
entries into that pending list behind the new router's back. Each entry is validated
and, in one Lua script that first checks the router lease, appended to its partition
stream (valid) or to the DLQ (invalid, with the reason) and acknowledged in
``ctxd:in``. A crash before the script leaves the entry pending for the next router; a
crash after it leaves nothing to redo; a router that lost its lease is refused.

The router also trims acknowledged entries from ``ctxd:in`` and the partition streams
every ``CTXD_TRIM_INTERVAL`` seconds (:func:`actors.service.streams.trim_acknowledged`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.consumer import consume_group
from actors.runtime.redis_io import Entry, autoclaim
from actors.service.fenced_source import FencedGroupSource
from actors.service.gateway import FencedReader, route_entries
from actors.service.lease import Leases
from actors.service.partition_record import read_record, routing_open
from actors.service.partitions import lease_key, partition_of, partition_stream
from actors.service.streams import (
    dlq_entry,
    ensure_group,
    trim_acknowledged,
    trim_bounded_streams,
)
from actors.service.validation import as_invalid_entry, routing_key
from graph.errors import FencedError

__all__ = ["ROUTER_CONSUMER", "SOURCE_FIELD", "Router"]

ROUTER_CONSUMER = "router"
SOURCE_FIELD = "ctxd_source_id"
"""Partition entries carry the id of their ``ctxd:in`` entry in this field."""

_log = structlog.get_logger("ctxd.router")

TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class Router:
    """Moves ``ctxd:in`` entries to partitions while this instance holds the router lease.

    Args:
        redis: the client.
        settings: validated settings.
        leases: this instance's lease helper.
        reading_allowed: asked before each read (a breaker is open: leave input unread).
        availability: the process's Redis monitor; routing pauses during an outage.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        leases: Leases,
        reading_allowed: Callable[[], bool] | None = None,
        availability: RedisAvailability | None = None,
    ) -> None:
        self._redis = redis
        self._availability = availability or RedisAvailability.for_settings(redis, settings)
        self._reading_allowed = reading_allowed or (lambda: True)
        self._settings = settings
        self._leases = leases
        self._reader = FencedReader(redis, group=settings.group, consumer=ROUTER_CONSUMER)
        self._key, self._fence = lease_key(settings, "router")
        self.active = False
        """True while this instance holds the router lease."""
        self.routed = 0
        self.dead_lettered = 0
        self._last_trim = time.monotonic()

    async def run(self, stopping: anyio.Event) -> None:
        """Compete for the router lease and route while holding it, until ``stopping``."""
        s = self._settings
        while not stopping.is_set():
            try:
                await self._availability.wait_available_or(stopping)
                if stopping.is_set():
                    return
                await ensure_group(self._redis, s.input_stream, s.group)
                if not await self.routing_open():
                    await _sleep_unless(stopping, s.lease_ttl / 3)
                    continue
                value = await self._leases.acquire(self._key, self._fence)
                if value is not None:
                    _log.info("router lease acquired", lease=value)
                    self.active = True
                    try:
                        await self._route(value, stopping)
                    finally:
                        self.active = False
                        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                            await self._leases.release(self._key, value)
            except FencedError:
                _log.warning("router lease lost; another instance routes now")
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # Reading pauses until Redis is back; the entry stays pending meanwhile.
                self._availability.report(exc)
                await self._availability.wait_available_or(stopping)
                continue
            await _sleep_unless(stopping, s.lease_ttl / 3)

    async def _route(self, value: str, stopping: anyio.Event) -> None:
        s = self._settings
        renew_every = s.lease_ttl / 3
        renewed = time.monotonic()
        await self._adopt_strays()
        # The previous router's pending entries first (the loop reads cursor 0 before
        # >): the input order is kept. Outages are raised to run(), which waits them
        # out and takes the lease again.
        source = FencedGroupSource(
            self._redis,
            self._reader,
            stream=s.input_stream,
            group=s.group,
            lease=(self._key, value),
            block_ms=max(1, min(s.block_ms, int(renew_every * 1000))),
        )

        async def ready() -> int | None:
            nonlocal renewed
            if time.monotonic() - renewed >= renew_every:
                if not await self._leases.renew(self._key, value):
                    raise FencedError(f"router lease {self._key} expired before its renewal")
                renewed = time.monotonic()
            if not self._availability.available:
                return None  # an outage: run() waits it out, then takes the lease again
            if not await self.routing_open():
                _log.info("partition count being changed; routing paused")
                return None  # run() releases the lease, which the resize takes
            await self._trim_if_due()
            if not self._reading_allowed():  # a breaker is open: leave the input unread
                await _sleep_unless(stopping, min(renew_every, s.block_ms / 1000))
                return 0
            return s.read_count

        async def handle(entries: list[Entry], redelivered: bool) -> None:
            await self._move_entries(value, entries)

        await consume_group(source, handle, count=s.read_count, ready=ready, stop=stopping)

    async def routing_open(self) -> bool:
        """Whether entries may be moved now: the partition record is active at this
        instance's count. Read fresh before every batch (no cache): a resize holds the
        router lease from before its drain to its flip, so a batch checked after this
        instance took the lease cannot land in a partition of the old count after it."""
        return routing_open(await read_record(self._redis, self._settings), self._settings)

    async def _trim_if_due(self) -> None:
        """Trim acknowledged entries every ``CTXD_TRIM_INTERVAL`` (and the bounded streams)."""
        s = self._settings
        if s.trim_interval and time.monotonic() - self._last_trim >= s.trim_interval:
            self._last_trim = time.monotonic()
            streams = [s.input_stream] + [partition_stream(s, n) for n in range(s.partitions)]
            for stream in streams:
                await trim_acknowledged(self._redis, stream)
            await trim_bounded_streams(self._redis, s)  # ctxd:out and the DLQ

    async def _adopt_strays(self) -> None:
        """Claim ``ctxd:in`` entries pending for other consumer names (a deployment of
        the single-stream ingress before partitions) into ``router``, so they are routed
        too; only entries idle longer than twice the event timeout."""
        s = self._settings
        cursor = "0-0"
        while True:
            cursor, claimed = await autoclaim(
                self._redis,
                stream=s.input_stream,
                group=s.group,
                consumer=ROUTER_CONSUMER,
                min_idle_ms=int(s.event_timeout * 2000),
                cursor=cursor,
            )
            if claimed:
                _log.info("adopted pending entries of other consumers", entries=len(claimed))
            if cursor == "0-0":
                return

    async def _move_entries(
        self, value: str, entries: list[tuple[str, dict[bytes, bytes] | None]]
    ) -> None:
        s = self._settings
        moves: list[tuple[str, str, Mapping[bytes, bytes]]] = []
        for entry_id, raw in entries:
            if raw is None:  # trimmed while pending: nothing to route
                await self._redis.xack(s.input_stream, s.group, entry_id)
                continue
            moves.append((entry_id, *self._target(entry_id, raw)))
        await route_entries(
            self._redis,
            lease=(self._key, value),
            input_stream=s.input_stream,
            group=s.group,
            moves=moves,
        )

    def _target(self, entry_id: str, raw: Mapping[bytes, bytes]) -> tuple[str, dict[bytes, bytes]]:
        """Where the entry goes, and the fields it goes with: the partition (fields as
        read, unchanged; the owner validates them) or, when it is too large to move or
        names no usable workflow, the DLQ (a bounded copy with the reason)."""
        s = self._settings
        own = {k: v for k, v in raw.items() if k != _SOURCE_KEY}  # a producer's is not ours
        try:
            workflow_id = routing_key(raw, s)
        except Exception as exc:  # noqa: BLE001 - one entry's problem never stops the router
            invalid = as_invalid_entry(exc)
            self.dead_lettered += 1
            _log.warning(
                "entry dead-lettered", source_id=entry_id, reason=invalid.reason, error=str(invalid)
            )
            out = dlq_entry(
                own,
                reason=invalid.reason,
                error=str(invalid),
                attempts=1,
                source_id=entry_id,
                field_bytes=s.dlq_field_bytes,
                max_fields=s.max_fields,
            )
            return s.dlq_stream, out
        self.routed += 1
        own[_SOURCE_KEY] = entry_id.encode()
        return partition_stream(s, partition_of(workflow_id, s.partitions)), own


_SOURCE_KEY = SOURCE_FIELD.encode()


async def _sleep_unless(event: anyio.Event, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        await event.wait()
