"""Ownership: which partitions this instance processes, held by leases with fencing tokens.

Every lease period (a third of ``CTXD_LEASE_TTL``) the ownership loop renews the leases
it holds (one pipelined round trip), publishes this instance's heartbeat (its statistics
for ``ctxd status``, and its place in the live set), computes the rendezvous assignment
of partitions over the live instances (:func:`~actors.service.partitions.assignment`),
hands over the partitions it should no longer own and acquires those it should. See
docs/design.md, "Router + partitions + leases with fencing tokens".

A handover: the partition's reader stops and its queued events are dropped (they stay
pending for the next owner) at once; its running batches finish while the lease is
still renewed, for at most one ``CTXD_EVENT_TIMEOUT`` (a stuck run must not pin it); then
the lease is released. While partitions move the loop looks again every 0.2 s, so the
next owner picks a released partition up at once.

What this instance owns lives in this object, not in the loop's task: a restarted loop
goes on with the leases it holds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.service.heartbeat import Heartbeat
from actors.service.lease import Leases
from actors.service.partitions import assignment, partition_lease, partition_stream
from actors.service.router import TRANSIENT_ERRORS
from actors.service.scheduler import Scheduler
from actors.service.streams import ensure_group

__all__ = ["HANDOVER_POLL", "Ownership"]

HANDOVER_POLL = 0.2
"""Seconds between ownership checks while partitions move between instances."""

_log = structlog.get_logger("ctxd.ingress")  # the ingress's lines, as before the split


class Ownership:
    """Holds, renews, hands over and acquires this instance's partition leases.

    Args:
        redis: the client.
        settings: validated settings (instance name, partitions, lease TTL).
        leases: this instance's lease helper.
        heartbeat: publishes this instance's heartbeat and lists the live instances.
        scheduler: what is queued and running (a partition is released only once none
            of its batches runs; its queued events are dropped when it moves).
        availability: the process's Redis monitor (outages are waited out, not raised).
        stopping: ends the loop once set.
        report: what the heartbeat publishes besides the owned partitions.
        on_change: called whenever the owned (readable) partitions changed.
        clock: monotonic clock of handover time limits.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        leases: Leases,
        heartbeat: Heartbeat,
        scheduler: Scheduler,
        *,
        availability: RedisAvailability,
        stopping: anyio.Event,
        report: Callable[[], Mapping[str, object]] = dict,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._leases = leases
        self._heartbeat = heartbeat
        self._scheduler = scheduler
        self._availability = availability
        self._stopping = stopping
        self._report = report
        self._on_change = on_change
        self._clock = clock
        self.owned: dict[int, str] = {}
        """Partition → this instance's lease value on it (live, for the idle sweep)."""
        self._releasing: dict[int, float] = {}  # partition → when its handover began

    def value(self, n: int) -> str | None:
        """This instance's lease value on partition ``n``, or None if not ours."""
        return self.owned.get(n)

    def reading(self, n: int, value: str) -> bool:
        """Whether partition ``n`` is still to be read under lease ``value``: owned with
        that value and not being handed over (checked before every read and admission,
        so a reader stops at once, not when its task is cancelled)."""
        return self.owned.get(n) == value and n not in self._releasing

    def readable(self) -> dict[int, str]:
        """The partitions to read now: owned and not being handed over."""
        return {n: v for n, v in self.owned.items() if n not in self._releasing}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reconcile every lease period (every 0.2 s while partitions move) until stopped."""
        period = self._settings.lease_ttl / 3
        task_status.started()
        while not self._stopping.is_set():
            try:
                settled = await self.reconcile()
                # While partitions move (this instance hands some over or waits for some),
                # look again soon: a partition is unowned from its release to its pickup.
                wait = period if settled else min(period, HANDOVER_POLL)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._availability.report(exc)
                await self._availability.wait_available_or(self._stopping)
                continue
            with anyio.move_on_after(wait):
                await self._stopping.wait()

    async def reconcile(self) -> bool:
        """Renew, beat, hand over and acquire; True when this instance owns what it should."""
        s = self._settings
        # Partitions being handed over are renewed too while their running batches
        # finish (a lapsed lease lets the next owner start on them while they still
        # run), but only for one event timeout: a stuck run must not pin a partition.
        now = self._clock()
        held = [
            (n, v)
            for n, v in self.owned.items()
            if now - self._releasing.get(n, now) < s.event_timeout
        ]
        renewed = await self._leases.renew_many([(partition_lease(s, n)[0], v) for n, v in held])
        for (n, _), ok in zip(held, renewed, strict=True):
            if not ok and n in self.owned:
                _log.warning("partition lease lost", partition=n)
                self.drop(n)
        live = await self._heartbeat.beat({"partitions": sorted(self.owned), **self._report()})
        wanted = {n for n, who in assignment(live, s.partitions).items() if who == s.instance}
        for n, value in list(self.owned.items()):
            key, _ = partition_lease(s, n)
            if n in self._releasing:
                if not self._scheduler.holds(n):
                    await self._leases.release(key, value)
                    self.drop(n)
                    _log.info("partition handed over", partition=n)
                continue
            if n not in wanted:
                self._releasing.setdefault(n, self._clock())
                self._scheduler.unqueue(n)  # queued entries stay pending for the next owner
                self._on_change()  # its reader stops
        for n in sorted(wanted - set(self.owned)):
            if self._stopping.is_set():
                return True
            got = await self._leases.acquire(*partition_lease(s, n))
            if got is not None:
                self.owned[n] = got
                _log.info("partition acquired", partition=n, lease=got)
                await ensure_group(self._redis, partition_stream(s, n), s.group)
                self._on_change()  # its reader starts (it recreates a missing group too)
        return not self._releasing and wanted <= set(self.owned)

    def drop(self, n: int, value: str | None = None) -> None:
        """Forget partition ``n``: its reader stops, its queued (not running) events go.

        With ``value``, only while ``n`` is still held under that lease value: a reader
        fenced under an old tenure must not drop the lease this instance has taken again.
        """
        if value is not None and self.owned.get(n) != value:
            return
        self.owned.pop(n, None)
        self._releasing.pop(n, None)
        self._scheduler.unqueue(n)
        self._on_change()

    async def leave(self) -> None:
        """Release every lease and remove the heartbeat, so peers rebalance at once."""
        for n, value in list(self.owned.items()):
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._leases.release(partition_lease(self._settings, n)[0], value)
        self.owned.clear()
        self._releasing.clear()
        self._on_change()
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self._heartbeat.remove()
