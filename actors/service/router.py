"""Routing ``ctxd:in``: every partition's owner moves its own entries into its partition.

There is no router lease and no single router. Every instance reads ``ctxd:in`` with a
plain ``XREAD`` from a cursor (one read serves all the partitions it owns) and moves the
entries of each partition it owns, in ``ctxd:in`` order, into that partition's stream:
one script per partition (:func:`~actors.service.gateway.route_partition`) whose keys
all lie in the partition's slot — its lease, its stream, its DLQ on a cluster, and its
**cursor** ``{prefix}:{p<n>}:cursor``, the last ``ctxd:in`` id the partition has moved
or scanned past. The script checks the lease, skips ids at or below the cursor and
advances it in the same step as the appends, so:

- one owner per partition (the lease) means one mover per partition, so a workflow's
  entries reach its partition in ``ctxd:in`` order;
- a crash before the script leaves the cursor where it was (the next owner moves the
  entries); a crash after it leaves nothing to redo; a paused owner whose lease lapsed
  is refused: every entry is moved exactly once, also across owner changes;
- a killed instance's routing moves with its partition leases, so one death stops the
  output of its partitions only, and only until their leases are taken over.

Entries without a usable routing key (no or a bad workflow id, too large) belong to
partition 0: its owner dead-letters them (``reason``/``error`` as the owner's validation
says, built by :func:`~actors.service.streams.dlq_entry`), exactly once by the same
cursor. Before each batch the mover asks :func:`~actors.service.input_gate.moving_bound`
how far it may move (everything; nothing while a resize is in progress; or up to the
resize's ``route_until`` id, where every cursor then comes to rest). The owner of
partition 0 trims ``ctxd:in`` to the lowest cursor of all partitions (never past an entry
some partition has not moved), and every owner trims the acknowledged entries of its
partition streams, every ``CTXD_TRIM_INTERVAL``.

An idle partition's cursor is written at most once a second (it has nothing to move; a
lower cursor only means a longer re-scan after a crash). A deployment upgraded from the
single leased router is taken over once by :mod:`actors.service.router_upgrade`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.redis_io import Entry, text
from actors.service.gateway import RouteCall, route_partitions
from actors.service.input_gate import UNBOUNDED, moving_bound
from actors.service.input_routing import (
    SOURCE_FIELD,
    barrier_key,
    cursor_key,
    id_after,
    id_key,
    lowest_cursor,
    route_target,
)
from actors.service.partitions import dlq_stream_of, partition_lease, partition_stream
from actors.service.router_upgrade import take_over_router_group
from actors.service.streams import trim_acknowledged, trim_bounded_streams
from graph.errors import FencedError

__all__ = [
    "SOURCE_FIELD",
    "TRANSIENT_ERRORS",
    "MoveBound",
    "PartitionRouter",
]

TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

_log = structlog.get_logger("ctxd.router")

_IDLE_PERSIST = 1.0
"""Seconds an owned partition's scanned position may run ahead of its stored cursor."""

_FLUSH_BUDGET = 2.0
"""Seconds the cursors' last write may take when routing ends."""

_BLOCK_MS = 250
"""Longest wait of one ``XREAD`` of ``ctxd:in``: a partition taken over while the input
is quiet starts moving its backlog within this time."""

MoveBound = Callable[[Redis, Settings], Awaitable[str | None]]
"""Asked before each batch up to which ``ctxd:in`` id entries may be moved now."""


Item = tuple[str, Literal["stream", "dlq"], dict[bytes, bytes]]
"""One entry to move: its ``ctxd:in`` id, where it goes, its fields."""


@dataclass
class _Position:
    """What this instance knows of one owned partition's routing (one tenure)."""

    value: str  # the lease value it is moved under
    stored: str  # the cursor as last stored (what the script must find)
    scanned: str  # how far ctxd:in has been scanned for it (>= stored)
    stored_at: float
    held_until: float = 0.0  # at its barrier: not scanned again before this time


class PartitionRouter:
    """Moves the ``ctxd:in`` entries of the partitions this instance owns.

    Args:
        redis: the client.
        settings: validated settings.
        owned: the partitions to route now and this instance's lease value on each
            (the ownership's readable partitions).
        on_fenced: told ``(partition, value)`` when a move was refused (lease lost).
        reading_allowed: asked before each read (a breaker is open: leave input unread).
        availability: the process's Redis monitor; routing pauses during an outage.
        bound: asked before each batch up to which ``ctxd:in`` id moving is allowed
            (``+``: all; None: nothing, a resize is in progress).
        clock: monotonic clock (idle cursor writes, trims).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        owned: Callable[[], Mapping[int, str]],
        *,
        on_fenced: Callable[[int, str], None] = lambda n, value: None,
        reading_allowed: Callable[[], bool] | None = None,
        availability: RedisAvailability | None = None,
        bound: MoveBound = moving_bound,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._owned = owned
        self._on_fenced = on_fenced
        self._reading_allowed = reading_allowed or (lambda: True)
        self._availability = availability or RedisAvailability.for_settings(redis, settings)
        self._bound = bound
        self._clock = clock
        self._positions: dict[int, _Position] = {}
        self._refused: set[tuple[int, str]] = set()
        self._last_trim = clock()
        self.routed = 0
        """Entries this instance moved into partitions."""
        self.dead_lettered = 0
        """Entries this instance dead-lettered (partition 0's invalid entries)."""

    @property
    def active(self) -> bool:
        """Whether this instance routes any partition now."""
        return bool(self._positions)

    async def run(self, stopping: anyio.Event) -> None:
        """Route the owned partitions until ``stopping``; outages are waited out.

        On the way out (stopped or cancelled) the cursors scanned ahead of their stored
        value are written, so the next owner does not scan that stretch again.
        """
        try:
            await self._run(stopping)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_FLUSH_BUDGET):
                try:
                    await self._store_idle(at_once=True)
                except Exception as exc:  # noqa: BLE001 - harmless: the next owner scans again
                    _log.info("cursors not written on the way out", error=repr(exc)[:200])

    async def _run(self, stopping: anyio.Event) -> None:
        upgraded = False
        while not stopping.is_set():
            try:
                await self._availability.wait_available_or(stopping)
                if stopping.is_set():
                    return
                if not upgraded:
                    await take_over_router_group(self._redis, self._settings, stopping)
                    upgraded = True
                await self._route(stopping)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._availability.report(exc)
                self._positions.clear()  # read the stored cursors again once back
                await self._availability.wait_available_or(stopping)

    async def _route(self, stopping: anyio.Event) -> None:
        s = self._settings
        pause = min(s.block_ms, _BLOCK_MS) / 1000
        while not stopping.is_set():
            # A tenure refused once is not tried again (ownership drops it meanwhile).
            self._refused &= set(self._owned().items())
            owned = {n: v for n, v in self._owned().items() if (n, v) not in self._refused}
            for n in [n for n, p in self._positions.items() if owned.get(n) != p.value]:
                del self._positions[n]
            if not owned or not self._reading_allowed():
                await _sleep_unless(stopping, pause)
                continue
            bound = await self._bound(self._redis, s)
            if bound is None:  # a resize: leave ctxd:in as it is
                # What was scanned is stored, so the cursors say exactly what was moved.
                await self._store_idle(at_once=True)
                await _sleep_unless(stopping, pause)
                continue
            for n, value in owned.items():
                if n not in self._positions:
                    stored = await self._redis.get(cursor_key(s, n))
                    at = text(stored) if stored is not None else "0-0"
                    self._positions[n] = _Position(value, at, at, self._clock())
                    _log.info("routing partition", partition=n, cursor=at)
            now = self._clock()
            moving = {n: p for n, p in self._positions.items() if p.held_until <= now}
            if not moving:  # every partition rests at its barrier (a resize)
                await self._store_idle(at_once=True)
                await _sleep_unless(stopping, pause)
                continue
            start = min((p.scanned for p in moving.values()), key=id_key)
            if bound != UNBOUNDED and not id_after(bound, start):
                await self._store_idle(at_once=True)  # every cursor at rest at the bound
                await _sleep_unless(stopping, pause)
                continue
            reply = await self._redis.xread(
                {s.input_stream: start}, count=s.read_count, block=min(s.block_ms, _BLOCK_MS)
            )
            entries = _entries(reply)
            if entries:
                last = entries[-1][0]
                if bound != UNBOUNDED and id_after(last, bound):
                    # The batch crosses the bound: nothing lies between its last entry
                    # at or below the bound and the bound, so all of that is scanned.
                    entries = [e for e in entries if not id_after(e[0], bound)]
                    last = bound
                await self._move(entries, last, moving)
            await self._store_idle()
            await self._trim_if_due()

    async def _move(self, entries: list[Entry], last: str, moving: dict[int, _Position]) -> None:
        """Move the batch's entries of the ``moving`` partitions (scanned up to ``last``):
        one script per partition with entries, all in one round trip on a single node."""
        s = self._settings
        items: dict[int, list[Item]] = {}
        for entry_id, raw in entries:
            if raw is None:
                continue
            n, target, fields = route_target(s, entry_id, raw)
            position = moving.get(n)
            if position is not None and id_after(entry_id, position.scanned):
                items.setdefault(n, []).append((entry_id, target, fields))
        stores: list[tuple[int, str, list[Item]]] = []
        for n, position in moving.items():
            if not id_after(last, position.scanned):
                continue
            if n in items:
                stores.append((n, last, items[n]))
            else:
                position.scanned = last  # nothing of it in the batch: stored lazily
        await self._store(stores)

    async def _store_idle(self, *, at_once: bool = False) -> None:
        """Write the cursors of partitions that had nothing to move for a while (all of
        them ``at_once``)."""
        now = self._clock()
        await self._store(
            [
                (n, p.scanned, [])
                for n, p in self._positions.items()
                if p.scanned != p.stored and (at_once or now - p.stored_at >= _IDLE_PERSIST)
            ]
        )

    async def _store(self, stores: list[tuple[int, str, list[Item]]]) -> None:
        """Run each ``(partition, scanned, items)``'s script and take in the replies."""
        if not stores:
            return
        s = self._settings
        calls = [
            RouteCall(
                lease=(partition_lease(s, n)[0], self._positions[n].value),
                cursor_key=cursor_key(s, n),
                stream=partition_stream(s, n),
                dlq_stream=dlq_stream_of(s, n),
                barrier_key=barrier_key(s, n),
                expected=self._positions[n].stored,
                scanned=scanned,
                items=items,
            )
            for n, scanned, items in stores
        ]
        replies = await route_partitions(self._redis, calls)
        for (n, _, items), reply in zip(stores, replies, strict=True):
            position = self._positions[n]
            if isinstance(reply, FencedError):
                _log.warning("partition lease lost; stop routing it", partition=n)
                del self._positions[n]
                self._refused.add((n, position.value))
                self._on_fenced(n, position.value)
                continue
            position.stored = position.scanned = reply.cursor
            position.stored_at = self._clock()
            if reply.barrier is not None and not id_after(reply.barrier, reply.cursor):
                # At its barrier (a resize holds it): look again only after a pause.
                position.held_until = self._clock() + min(s.block_ms, _BLOCK_MS) / 1000
            if reply.status != "ok":
                # The stored cursor is not what this tenure wrote last (writes lost in a
                # fail-over, a resize reset it): start again from what is stored.
                _log.warning(
                    "partition cursor moved; scanning again", partition=n, cursor=reply.cursor
                )
                continue
            # The stored cursor was the expected one and every item lies past it: all moved.
            dead = sum(1 for _, target, _ in items if target == "dlq")
            self.dead_lettered += dead
            self.routed += len(items) - dead
            if dead:
                _log.warning("invalid entries dead-lettered", partition=n, entries=dead)

    async def _trim_if_due(self) -> None:
        """Every ``CTXD_TRIM_INTERVAL``: the owner of partition 0 trims ``ctxd:in`` below
        the lowest cursor, and ``ctxd:out`` and the DLQ on a single node; every owner
        trims what is acknowledged in its partition streams and, on a cluster, its
        partitions' output streams and DLQs."""
        s = self._settings
        if not s.trim_interval or self._clock() - self._last_trim < s.trim_interval:
            return
        self._last_trim = self._clock()
        for n in list(self._positions):
            await trim_acknowledged(self._redis, partition_stream(s, n))
        if 0 in self._positions:
            low = await lowest_cursor(self._redis, s)
            if low is not None:
                await self._redis.xtrim(s.input_stream, minid=low, approximate=False)
        if s.cluster:  # each partition's output stream and DLQ, by its owner
            await trim_bounded_streams(self._redis, s, partitions=list(self._positions))
        elif 0 in self._positions:
            await trim_bounded_streams(self._redis, s)


def _entries(reply: Any) -> list[Entry]:
    """The entries of an ``XREAD`` reply of one stream (none when it timed out)."""
    return [(text(i), fields) for _, got in reply or [] for i, fields in got]


async def _sleep_unless(event: anyio.Event, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        await event.wait()
