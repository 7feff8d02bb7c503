"""The scheduler: admission of read entries, one queue and one drain task per workflow.

The partition readers (actors/service/reader.py) hand every entry they read to
:meth:`Scheduler.accept`. Admission decides what happens to it: an invalid entry or one
delivered more than ``CTXD_MAX_DELIVERIES`` times goes to the DLQ; an entry for a busy
workflow follows ``CTXD_MULTITASK`` (enqueue, reject, interrupt, rollback); the rest
join their workflow's queue, in read order. One drain task per active workflow takes
batches from its queue and hands them to the runner
(:class:`~actors.service.batches.BatchProcessor`), which says how each went; a failed run
is retried in place with backoff (keeping the workflow's order) until it is poison.

The scheduler bounds what is in flight (read and not committed) to ``CTXD_CONCURRENCY``
times ``CTXD_BATCH_SIZE`` entries (:meth:`room`): readers wait for room, so a backlog stays in
Redis rather than in memory.

Runs of a crashed scheduler are gone with its task group, so each (re)start begins a new
:attr:`Scheduler.epoch` with nothing in flight: entries accepted in an earlier epoch are
refused, and the readers, told through ``on_restart``, read their pending lists again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.backoff import jittered_backoff
from actors.runtime.supervisor import crash_unwrapped
from actors.service.batches import (
    BatchReport,
    PendingEntry,
    RunSlot,
    attempt_field,
    poison_error,
)
from actors.service.gateway import dead_letter, move_home
from actors.service.partitions import (
    attempts_key,
    dlq_stream_of,
    partition_key,
    partition_lease,
    partition_of,
    partition_stream,
)
from actors.service.router import SOURCE_FIELD, TRANSIENT_ERRORS
from actors.service.streams import done_key
from actors.service.validation import RawFields, as_invalid_entry, decode_fields, parse_entry
from graph.errors import FencedError
from telemetry.metrics import Instruments

__all__ = ["Runner", "Scheduler", "SchedulerCounts", "WorkflowQueue"]

_log = structlog.get_logger("ctxd.ingress")  # the ingress's lines, as before the split

_RETRY_BASE = 0.2
"""Seconds before the first retry of a failed run (doubling, jittered, up to 10 s)."""
_RETRY_MAX = 10.0

_LEFT_PENDING = (FencedError, *TRANSIENT_ERRORS)
"""Errors of a poison event's DLQ write that leave it pending for the next try."""


class Runner(Protocol):
    """Runs and commits one batch and says how it went: the
    :class:`~actors.service.batches.BatchProcessor` (or a scripted one in tests)."""

    async def process(
        self, workflow_id: str, slot: RunSlot, batch: list[PendingEntry]
    ) -> BatchReport:
        """Run ``batch`` (one workflow's entries of one partition tenure) in ``slot``."""
        ...


@dataclass
class WorkflowQueue:
    """One workflow's entries, queued in order, and the slot its running batch is in."""

    queue: list[PendingEntry] = field(default_factory=list)
    slot: RunSlot = field(default_factory=RunSlot)

    @property
    def busy(self) -> bool:
        """An event of the workflow is queued or its run is in progress."""
        return self.slot.running or bool(self.queue)


@dataclass(frozen=True)
class SchedulerCounts:
    """The scheduler's counters since start (see ``IngressStatistics``)."""

    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    failed_runs: int = 0
    interrupted: int = 0


class Scheduler:
    """Admits entries, queues them per workflow and drains each queue in order.

    Args:
        redis: the client.
        settings: validated settings.
        runner: runs and commits one batch, and says how it went.
        lease_of: this instance's lease value on a partition now (None: not ours).
        reading_allowed: False while a breaker is open; refused batches wait for it.
        availability: the process's Redis monitor.
        stopping: set when the service stops (drains finish what runs, nothing new).
        instruments: where ``messaging.client.consumed.messages`` goes, if anywhere.
        metric_attributes: the attributes of that metric's points.
        on_restart: called when a (re)start begins a new epoch (the readers re-read).
        rng: jitter of the retry backoff (seed one in tests).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        runner: Runner,
        *,
        lease_of: Callable[[int], str | None],
        reading_allowed: Callable[[], bool],
        availability: RedisAvailability,
        stopping: anyio.Event,
        instruments: Instruments | None = None,
        metric_attributes: Mapping[str, str] | None = None,
        on_restart: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._runner = runner
        self._lease_of = lease_of
        self._reading_allowed = reading_allowed
        self._availability = availability
        self._stopping = stopping
        self._instruments = instruments
        self._metric_attributes = dict(metric_attributes or {})
        self._on_restart = on_restart
        self._rng = rng or random.Random()
        self._max_in_flight = settings.concurrency * settings.batch_size
        self.workflows: dict[str, WorkflowQueue] = {}
        """The active workflows (queued or running), by id; live, for the idle sweep."""
        # (partition, entry id) → lease: entry ids are unique per stream only, and the
        # router fills many partition streams in the same millisecond.
        self._in_flight: dict[tuple[int, str], str] = {}
        self._slots = anyio.CapacityLimiter(settings.concurrency)
        self._room = anyio.Event()
        self._tg: TaskGroup | None = None
        self._counts = SchedulerCounts()
        self.epoch = 0
        """Starts of the scheduler; entries read for an earlier one are refused."""

    # -- views --------------------------------------------------------------------------

    def counts(self) -> SchedulerCounts:
        """The counters since start."""
        return self._counts

    @property
    def in_flight(self) -> int:
        """Entries read and not yet committed."""
        return len(self._in_flight)

    @property
    def busy(self) -> bool:
        """Something is queued, running or in flight."""
        return bool(self._in_flight or self.workflows)

    @property
    def accepting(self) -> bool:
        """The scheduler runs (it has a task group for drains)."""
        return self._tg is not None

    def holds(self, n: int) -> bool:
        """Whether an entry of partition ``n`` is queued or running here."""
        return any(p == n for p, _ in self._in_flight)

    def room(self) -> int:
        """How many more entries may be read now."""
        return self._max_in_flight - len(self._in_flight)

    async def wait_for_room(self) -> None:
        """Wait until something leaves the in-flight set (at most a second)."""
        # Every waiter (16 partition readers, say) waits on the same event; replacing it
        # per waiter left all but the last to sleep out the whole second.
        room = self._room
        with anyio.move_on_after(1.0):
            await room.wait()

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host the drain tasks until the service stops and they have finished.

        A drain that raises ends this task group (a crash of the scheduler, which its
        supervisor restarts): the next start begins a new epoch with nothing in flight.
        """
        self._begin_epoch()
        try:
            with crash_unwrapped():
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    task_status.started()
                    await self._stopping.wait()
                    self.stop()
        finally:
            self._tg = None
            # After a crash its runs are gone: nothing is in flight here any more.
            self.workflows.clear()
            self._in_flight.clear()
            self._made_room()

    def stop(self) -> None:
        """Drop every queued (not running) event; they stay pending for the next owner."""
        for wf in self.workflows.values():
            self._forget(wf.queue)
            wf.queue.clear()
        self._made_room()

    def _begin_epoch(self) -> None:
        self.epoch += 1
        self.workflows.clear()
        self._in_flight.clear()
        self._slots = anyio.CapacityLimiter(self._settings.concurrency)
        if self.epoch > 1 and self._on_restart is not None:
            self._on_restart()

    def unqueue(self, n: int) -> None:
        """Drop partition ``n``'s queued (not running) events; they stay in its PEL."""
        for wf in self.workflows.values():
            kept = [p for p in wf.queue if p.partition != n]
            for p in wf.queue:
                if p.partition == n:
                    self._in_flight.pop((n, p.entry_id), None)
            wf.queue[:] = kept
        self._made_room()

    # -- admission ----------------------------------------------------------------------

    async def attempts(self, n: int, entry_ids: list[str]) -> dict[str, int]:
        """How often each entry's graph run was started (any instance, any tenure).

        Counted in the partition's ``{p<n>}:attempts`` when a run starts and cleared at commit: a
        takeover that re-reads a pending entry does not count, a crash mid-run does.
        """
        if not entry_ids:
            return {}
        fields = [attempt_field(n, e) for e in entry_ids]
        values = await self._redis.hmget(attempts_key(self._settings, n), fields)
        return {e: int(v) for e, v in zip(entry_ids, values, strict=True) if v is not None}

    async def accept(
        self,
        n: int,
        lease: str,
        entry_id: str,
        raw: dict[bytes, bytes] | None,
        *,
        deliveries: int,
        epoch: int,
    ) -> None:
        """Admit one entry read from partition ``n`` under ``lease`` in ``epoch``.

        Raises:
            FencedError: the partition is not ours any more (a DLQ write was fenced).
        """
        s = self._settings
        if self._tg is None or epoch != self.epoch:
            return  # read for a scheduler that is gone: the re-read after its restart
        if self._in_flight.get((n, entry_id)) == lease:
            return  # already queued or running in this tenure
        stream = partition_stream(s, n)
        if self._instruments is not None:
            self._instruments.consumed_messages.add(1, self._metric_attributes)
        if raw is None:  # the entry was trimmed or deleted while pending: nothing to redo
            _log.error("pending entry has no payload; acknowledging", entry_id=entry_id)
            await self._redis.xack(stream, s.group, entry_id)
            return
        own = dict(raw)
        source = own.pop(SOURCE_FIELD.encode(), None)
        # (none when a producer appended straight to the partition; bytes not trusted)
        source_id = source.decode("utf-8", "replace")[:200] if source else entry_id
        try:
            event = parse_entry(source_id, own, s)
        except Exception as exc:  # noqa: BLE001 - one entry's problem never stops the reader
            invalid = as_invalid_entry(exc)
            await self._dead_letter(n, entry_id, source_id, own, invalid.reason, str(invalid), 1)
            return
        home = partition_of(event.workflow_id, s.partitions)
        if home != n:
            await self._move_home(n, lease, entry_id, raw, home)
            return
        fields = decode_fields(own)
        if deliveries > s.max_deliveries:
            error = await poison_error(self._redis, s, n, entry_id, deliveries - 1)
            await self._dead_letter(
                n,
                entry_id,
                source_id,
                fields,
                "poison",
                error,
                deliveries - 1,
                done_key=done_key(s, event.workflow_id, event.event_id),
            )
            return
        wf = self.workflows.get(event.workflow_id)
        if wf is not None and wf.busy and s.multitask == "reject":
            await self._dead_letter(
                n,
                entry_id,
                source_id,
                fields,
                "workflow_busy",
                f"workflow {event.workflow_id!r} was processing another event and "
                "CTXD_MULTITASK=reject; send it again once that event's output is in "
                f"{s.output_stream}, or use CTXD_MULTITASK=enqueue",
                deliveries,
            )
            return
        self._in_flight[n, entry_id] = lease
        pending = PendingEntry(
            event=event,
            entry_id=entry_id,
            partition=n,
            lease=lease,
            fields=fields,
            deliveries=deliveries,
        )
        if wf is None:
            wf = self.workflows[event.workflow_id] = WorkflowQueue(queue=[pending])
            self._tg.start_soon(self._drain, event.workflow_id, wf)
            return
        wf.queue.append(pending)
        if s.multitask in ("interrupt", "rollback"):
            wf.slot.interrupt()

    async def _move_home(
        self, n: int, lease: str, entry_id: str, raw: dict[bytes, bytes], home: int
    ) -> None:
        """Move an entry to the partition its workflow hashes to.

        An entry can sit in another partition after ``CTXD_PARTITIONS`` changed, or when
        a producer appended straight to a partition with another hash. Running it here
        would give its workflow a second writer (the owner of ``home`` runs the rest),
        so it is appended there and settled here, fenced by this partition's lease, with
        its fields (and source id) as they are: in one script on a single node, in two
        (append once, then acknowledge) on a cluster (:func:`~actors.service.gateway.move_home`).
        """
        s = self._settings
        await move_home(
            self._redis,
            lease=(partition_lease(s, n)[0], lease),
            stream=partition_stream(s, n),
            group=s.group,
            entry_id=entry_id,
            target=partition_stream(s, home),
            fields=raw,
            marker=partition_key(s, home, "moved", f"{n}/{entry_id}"),
            marker_ttl=s.dedupe_ttl,
        )
        _log.warning(
            "entry moved to its workflow's partition", entry_id=entry_id, partition=n, to=home
        )

    async def _dead_letter(
        self,
        n: int,
        entry_id: str,
        source_id: str,
        fields: RawFields,
        reason: str,
        error: str,
        attempts: int,
        done_key: str | None = None,
    ) -> None:
        value = self._lease_of(n)
        if value is None:
            raise FencedError(f"partition {n} is not ours any more")
        dlq_id = await dead_letter(  # FencedError when the partition is not ours any more
            self._redis,
            dlq_stream=dlq_stream_of(self._settings, n),
            input_stream=partition_stream(self._settings, n),
            group=self._settings.group,
            source_id=entry_id,
            fields=fields,
            original_id=source_id,
            reason=reason,
            error=error,
            attempts=attempts,
            lease=(partition_lease(self._settings, n)[0], value),
            field_bytes=self._settings.dlq_field_bytes,
            max_fields=self._settings.max_fields,
            done_key=done_key,
        )
        if not dlq_id:  # its output was committed (a lost commit reply): acknowledged only
            self._count(duplicates=1)
            _log.info("committed event acknowledged, not dead-lettered", source_id=source_id)
            return
        self._count(dead_lettered=1)
        _log.warning("entry dead-lettered", source_id=source_id, reason=reason, error=error)

    # -- draining -----------------------------------------------------------------------

    async def _drain(self, workflow_id: str, wf: WorkflowQueue) -> None:
        structlog.contextvars.bind_contextvars(workflow_id=workflow_id)  # this task's lines
        failures = 0
        async with self._slots:
            while wf.queue:
                head = wf.queue[0]
                size = 1 if failures else self._settings.batch_size  # isolate a poison event
                batch = [
                    p
                    for p in wf.queue[:size]
                    if (p.partition, p.lease) == (head.partition, head.lease)
                ]
                del wf.queue[: len(batch)]
                if self._lease_of(head.partition) != head.lease:
                    self._forget(batch)  # an earlier tenure: the PEL has them for the next
                    continue
                report = await self._runner.process(workflow_id, wf.slot, batch)
                self._count(
                    processed=report.processed,
                    duplicates=report.duplicates,
                    interrupted=report.interrupted,
                    failed_runs=int(report.failed),
                )
                if report.outcome == "refused":
                    # An open breaker refused the batch: it waits (in order, in flight)
                    # until reading is allowed again; never redelivered or dead-lettered.
                    wf.queue[:0] = batch
                    while not self._reading_allowed() and not self._stopping.is_set():
                        await self._paused()
                    if self._stopping.is_set():
                        self._forget(wf.queue)
                        wf.queue.clear()
                elif report.outcome in ("retry", "transient"):
                    if report.outcome == "retry":
                        failures += 1
                        for p in batch:
                            p.deliveries += 1
                    wf.queue[:0] = batch
                    await self._before_retry(report.outcome == "transient", failures)
                    if self._stopping.is_set():
                        self._forget(wf.queue)
                        wf.queue.clear()
                    else:
                        try:
                            await self._redeliver_or_poison(wf)
                        except Exception as exc:
                            # left pending: the next owner (or the next retry) decides; an
                            # outage is waited out by the next retry, never a crash
                            if not isinstance(exc, _LEFT_PENDING):
                                if not is_outage(exc):
                                    raise
                                self._availability.report(exc)
                            _log.warning("dead-lettering a poison event failed", error=repr(exc))
                else:
                    failures = 0
                    self._forget(batch)
            del self.workflows[workflow_id]
            self._made_room()

    async def _before_retry(self, transient: bool, failures: int) -> None:
        """Wait before running a batch again: out an outage, or a backoff after a failure."""
        if transient and not self._availability.available:
            await self._availability.wait_available_or(self._stopping)  # run once back
            return
        pause = jittered_backoff(_RETRY_BASE, 2.0, max(failures - 1, 0), _RETRY_MAX, 0.2, self._rng)
        with anyio.move_on_after(pause):
            await self._stopping.wait()

    async def _paused(self) -> None:
        """Backpressure: wait a little while the breakers reject work."""
        with anyio.move_on_after(self._settings.block_ms / 1000):
            await self._stopping.wait()

    def _forget(self, batch: list[PendingEntry]) -> None:
        for item in batch:
            if self._in_flight.get((item.partition, item.entry_id)) == item.lease:
                del self._in_flight[item.partition, item.entry_id]
        self._made_room()

    def _made_room(self) -> None:
        """Wake everyone waiting for room; later waiters wait for the next change."""
        self._room.set()
        self._room = anyio.Event()

    def _count(self, **more: int) -> None:
        c = self._counts
        self._counts = SchedulerCounts(
            processed=c.processed + more.get("processed", 0),
            duplicates=c.duplicates + more.get("duplicates", 0),
            dead_lettered=c.dead_lettered + more.get("dead_lettered", 0),
            failed_runs=c.failed_runs + more.get("failed_runs", 0),
            interrupted=c.interrupted + more.get("interrupted", 0),
        )

    async def _redeliver_or_poison(self, wf: WorkflowQueue) -> None:
        limit = self._settings.max_deliveries
        while wf.queue and wf.queue[0].deliveries > limit:
            p = wf.queue[0]  # popped only once dead-lettered
            runs = p.deliveries - 1
            error = await poison_error(self._redis, self._settings, p.partition, p.entry_id, runs)
            await self._dead_letter(
                p.partition,
                p.entry_id,
                p.event.source_id,
                p.fields,
                "poison",
                error,
                runs,
                done_key=done_key(self._settings, p.event.workflow_id, p.event.event_id),
            )
            wf.queue.pop(0)
            self._forget([p])
