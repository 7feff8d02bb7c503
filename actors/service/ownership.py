"""Ownership: which partitions this instance processes, held by leases with fencing tokens.

Every lease period (a quarter of ``CTXD_LEASE_TTL``, :func:`~actors.service.lease.renew_period`)
the ownership loop renews the leases it holds (one pipelined round trip), publishes this
instance's heartbeat (its statistics for ``ctxd status``, and its place in the live set),
computes the balanced assignment of partitions over the live instances
(:func:`~actors.service.partitions.assignment`), hands over the partitions it should no
longer own and acquires those it should. Between two rounds it watches the live set
every :data:`~actors.service.lease.ACQUIRE_POLL` (one read): when an instance dies, its
heartbeat leaves the set just after its leases lapsed, and this instance takes its share
at once instead of at its next round. See docs/design.md, "Partitions + leases
with fencing tokens", and docs/operations.md, "Fail-over and the lease TTL".

How late the renewals come is measured (the longest gap between two renewals, against
the TTL) and published in the heartbeat: the margin a stalled event loop has before
its leases lapse.

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
from collections.abc import Awaitable, Callable, Mapping

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.service.heartbeat import Heartbeat
from actors.service.lease import ACQUIRE_POLL, Leases, renew_period
from actors.service.partitions import assignment, partition_lease, partition_stream
from actors.service.router import TRANSIENT_ERRORS
from actors.service.scheduler import Scheduler
from actors.service.streams import ensure_group

__all__ = ["HANDOVER_POLL", "Ownership"]

HANDOVER_POLL = ACQUIRE_POLL
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
        on_acquire: awaited with ``(lease key, lease value)`` after a partition lease is
            taken and before the partition is read: raises the lease's fencing-token
            floor in a separate checkpoint store
            (:meth:`~actors.service.checkpoint_floor.CheckpointFloor.raise_to`). If it
            fails, the lease is released again and the error propagates (an outage of
            the store is waited out by :meth:`run`, like one of the service Redis).
        clock: monotonic clock of handover time limits and renewal gaps.
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
        on_acquire: Callable[[str, str], Awaitable[object]] | None = None,
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
        self._on_acquire = on_acquire
        self._clock = clock
        self.owned: dict[int, str] = {}
        """Partition → this instance's lease value on it (live, for the idle sweep)."""
        self._releasing: dict[int, float] = {}  # partition → when its handover began
        self._live: list[str] = []  # the live set of the last beat
        self._renew_sent: float | None = None  # monotonic time the last renewal was sent
        self._gap_last = 0.0
        self._gap_max = 0.0

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
        """Reconcile every lease period (every 0.2 s while partitions move) until stopped.

        A settled round is followed by a watch of the live set: a change (an instance
        died or joined) starts the next round at once.
        """
        period = renew_period(self._settings.lease_ttl)
        task_status.started()
        while not self._stopping.is_set():
            try:
                settled = await self.reconcile()
                if settled:
                    await self._watch_live_set(period)
                else:
                    # While partitions move (this instance hands some over or waits for
                    # some), look again soon: a partition is unowned from its release (or
                    # lapse) to its pickup.
                    with anyio.move_on_after(min(period, HANDOVER_POLL)):
                        await self._stopping.wait()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._renew_sent = None  # an outage's pause is not a late renewal
                self._availability.report(exc)
                await self._availability.wait_available_or(self._stopping)

    async def _watch_live_set(self, period: float) -> None:
        """Wait up to ``period``, returning early once the live set differs from the last
        beat's (or when stopping)."""
        deadline = anyio.current_time() + period
        while (remaining := deadline - anyio.current_time()) > 0:
            with anyio.move_on_after(min(remaining, ACQUIRE_POLL)):
                await self._stopping.wait()
            if self._stopping.is_set() or anyio.current_time() >= deadline:
                return
            if await self._heartbeat.live() != self._live:
                return

    def lease_statistics(self) -> dict[str, float]:
        """The lease timing, for the heartbeat: the TTL, the renewal period, and the last
        and longest gap between two renewals this process saw (seconds). ``ttl -
        renew_gap_max`` is the smallest margin the leases had: near zero, they flap."""
        ttl = self._settings.lease_ttl
        return {
            "ttl": ttl,
            "renew_every": renew_period(ttl),
            "renew_gap_last": round(self._gap_last, 3),
            "renew_gap_max": round(self._gap_max, 3),
        }

    def _renewal_timed(self, sent: float) -> None:
        """Record the gap from the previous renewal's send to this one's reply: an upper
        bound of the time between the two renewals Redis ran."""
        if self._renew_sent is not None:
            gap = self._clock() - self._renew_sent
            self._gap_last = gap
            if gap > self._gap_max:
                self._gap_max = gap
                if gap > self._settings.lease_ttl / 2:
                    _log.warning(
                        "lease renewal late",
                        gap=round(gap, 3),
                        lease_ttl=self._settings.lease_ttl,
                        hint="a stalled event loop or a slow Redis; past the TTL the "
                        "partitions move (CTXD_LEASE_TTL, docs/operations.md)",
                    )
        self._renew_sent = sent

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
        sent = self._clock()
        renewed = await self._leases.renew_many([(partition_lease(s, n)[0], v) for n, v in held])
        self._renewal_timed(sent)
        for (n, _), ok in zip(held, renewed, strict=True):
            if not ok and n in self.owned:
                _log.warning("partition lease lost", partition=n)
                self.drop(n)
        live = await self._heartbeat.beat(
            {"partitions": sorted(self.owned), "lease": self.lease_statistics(), **self._report()}
        )
        self._live = live
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
        missing = sorted(wanted - set(self.owned))
        if self._stopping.is_set():
            return True
        values = await self._leases.acquire_many([partition_lease(s, n) for n in missing])
        taken = [(n, got) for n, got in zip(missing, values, strict=True) if got is not None]
        for i, (n, got) in enumerate(taken):
            try:
                await self._prepared(partition_lease(s, n)[0], got)
            except Exception:  # the ones not prepared yet go back too, unread
                for m, value in taken[i + 1 :]:
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await self._leases.release(partition_lease(s, m)[0], value)
                raise
            await ensure_group(self._redis, partition_stream(s, n), s.group)
            self.owned[n] = got
            _log.info("partition acquired", partition=n, lease=got)
            self._on_change()  # its reader starts (it recreates a missing group too)
        return not self._releasing and wanted <= set(self.owned)

    async def _prepared(self, key: str, value: str) -> None:
        """Run :attr:`_on_acquire` for a lease just taken; if it fails, give the lease back
        and raise.

        The partition is unread, so nothing is lost: an outage of the checkpoint store
        reaches :meth:`run`, which waits it out like any Redis outage (the process's
        monitor probes the store too) and takes the partition again afterwards.
        """
        if self._on_acquire is None:
            return
        try:
            await self._on_acquire(key, value)
        except Exception:
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._leases.release(key, value)
            raise

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
