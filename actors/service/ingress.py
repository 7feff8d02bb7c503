"""The ingress actor: partitions of ``ctxd:in`` → the contextual workflow → ``ctxd:out``.

Every instance runs the same pieces (see docs/design.md, "Partitions and leases"):

- a :class:`~actors.service.router.Router` candidate: the one instance holding the router lease
  moves ``ctxd:in`` entries to partition streams (invalid ones to the DLQ);
- the ownership loop: heartbeats, rendezvous assignment of partitions to the live
  instances, acquiring / renewing / releasing partition leases (fencing tokens);
- one reader per owned partition (the fixed consumer name ``owner``: pending entries of
  a previous owner first, then new ones), feeding per-workflow queues;
- one drain task per active workflow: the queued events of that workflow, in order, in
  batches, each run and committed by :class:`~actors.service.batches.BatchProcessor` (one graph
  run, then outputs + acknowledgements in one Lua script fenced by the partition lease).

Entries are acknowledged only after the run's checkpoint and the outputs are durable.
A failed run is retried in place (keeping the workflow's order) with backoff; one that
failed ``max_deliveries`` times goes to the DLQ. Events arriving for a busy workflow
follow ``CTXD_MULTITASK`` (enqueue, reject, interrupt, rollback).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import structlog
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.service.batches import (
    BatchProcessor,
    PendingEntry,
    WorkflowQueue,
    attempt_field,
    poison_error,
)
from actors.service.gateway import FencedReader, dead_letter
from actors.service.heartbeat import Heartbeat
from actors.service.lease import LeaseLostError, Leases
from actors.service.partitions import (
    OWNER_CONSUMER,
    assignment,
    lease_key,
    partition_stream,
)
from actors.service.router import SOURCE_FIELD, TRANSIENT_ERRORS, Router
from actors.service.streams import done_key, ensure_group
from actors.service.validation import RawFields, as_invalid_entry, decode_fields, parse_entry
from graph.errors import FencedError
from graph.workflow import ContextualGraph
from telemetry.metrics import Instruments

__all__ = ["Ingress", "IngressStatistics"]

_HANDOVER_POLL = 0.2
"""Seconds between ownership checks while partitions move between instances."""

_log = structlog.get_logger("ctxd.ingress")
_tracer = trace.get_tracer("ctxd.ingress")


@dataclass(frozen=True)
class IngressStatistics:
    """Counters since start.

    Attributes:
        processed: events with an output written.
        duplicates: events suppressed because their event_id was done already.
        dead_lettered: entries sent to the DLQ.
        failed_runs: graph runs that raised (their events are retried).
        in_flight: entries read and not yet committed.
        active_workflows: workflows being processed now.
        interrupted: events cancelled by the interrupt/rollback strategies.
        partitions: partitions this instance owns.
        router: whether this instance routes ctxd:in now.
    """

    processed: int
    duplicates: int
    dead_lettered: int
    failed_runs: int
    in_flight: int
    active_workflows: int
    interrupted: int = 0
    partitions: tuple[int, ...] = ()
    router: bool = False


class Ingress:
    """Consumes the partitions this instance owns and drives the workflow, once per event.

    Args:
        redis: the client (shared with the checkpointer's process, not its connection).
        settings: validated settings.
        graph: the compiled contextual workflow.
        reading_allowed: asked before each read; while it says False (a circuit breaker
            is open) nothing new is routed or read, and refused batches wait.
        instruments: where the messaging metrics go; none recorded if None.
        tracer: for the ``process`` spans; the global tracer if None.
        availability: the process's Redis monitor (one is made if None): during an
            outage reading pauses and every loop waits instead of failing.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        graph: ContextualGraph,
        *,
        reading_allowed: Callable[[], bool] | None = None,
        instruments: Instruments | None = None,
        tracer: trace.Tracer | None = None,
        availability: RedisAvailability | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._graph = graph
        self._availability = availability or RedisAvailability.for_settings(redis, settings)
        self._reading_allowed = reading_allowed or (lambda: True)
        self._instruments = instruments
        self._tracer = tracer or _tracer
        self._metric_attributes = {
            "messaging.system": "redis",
            "messaging.destination.name": settings.input_stream,
            "messaging.consumer.group.name": settings.group,
        }
        self._consumer = OWNER_CONSUMER
        self._leases = Leases(redis, settings.instance, settings.lease_ttl)
        self._reader = FencedReader(redis, group=settings.group, consumer=OWNER_CONSUMER)
        self._heartbeat = Heartbeat(redis, settings)
        self._router = Router(
            redis, settings, self._leases, self._reading_allowed, self._availability
        )
        self._owned: dict[int, str] = {}  # partition → lease value
        self._readers: dict[int, anyio.CancelScope] = {}
        self._releasing: dict[int, float] = {}  # partition → when its handover began
        self._workflows: dict[str, WorkflowQueue] = {}
        self._in_flight: dict[str, tuple[int, str]] = {}  # entry id → (partition, lease)
        self._slots = anyio.CapacityLimiter(settings.concurrency)
        self._room = anyio.Event()
        self._max_in_flight = settings.concurrency * settings.batch_size
        self._stopping = anyio.Event()
        self.stopped = anyio.Event()
        """Set when :meth:`run` has returned: nothing is in flight any more."""
        self._counts = {
            "processed": 0,
            "duplicates": 0,
            "dead_lettered": 0,
            "failed_runs": 0,
            "interrupted": 0,
        }
        self._batches = BatchProcessor(
            redis,
            settings,
            graph,
            consumer=self._consumer,
            counts=self._counts,
            instruments=instruments,
            metric_attributes=self._metric_attributes,
            tracer=self._tracer,
            availability=self._availability,
        )
        self.extra_stats: Callable[[], Mapping[str, object]] = dict
        """Called at each heartbeat; what it returns is published as is (the actor
        pools' breaker states, say)."""

    @property
    def consumer(self) -> str:
        """This instance's consumer name on the partition streams."""
        return self._consumer

    def statistics(self) -> IngressStatistics:
        """A snapshot of the counters."""
        return IngressStatistics(
            in_flight=len(self._in_flight),
            active_workflows=len(self._workflows),
            partitions=tuple(sorted(self._owned)),
            router=self._router.active,
            dead_lettered=self._counts["dead_lettered"] + self._router.dead_lettered,
            **{k: v for k, v in self._counts.items() if k != "dead_lettered"},
        )

    def stop(self) -> None:
        """Stop reading; running batches finish, queued events stay pending for others."""
        self._stopping.set()
        for wf in self._workflows.values():
            self._forget(wf.queue)
            wf.queue.clear()
        self._made_room()
        for scope in self._readers.values():
            scope.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Route, own, read, process and commit until :meth:`stop` is called."""
        s = self._settings
        await self._availability.call(lambda: ensure_group(self._redis, s.input_stream, s.group))
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                tg.start_soon(self._router.run, self._stopping)
                tg.start_soon(self._ownership_loop, tg)
                sweep = (
                    self._batches.retention.sweep
                )  # idle workflows (actors/service/retention.py)
                tg.start_soon(sweep, self._stopping, self._owned, self._workflows)
                await self._stopping.wait()
                while self._in_flight or self._workflows:  # let in-flight batches finish
                    await self._wait_for_room()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._leave()
            self.stopped.set()

    async def _leave(self) -> None:
        for n, value in list(self._owned.items()):
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._leases.release(lease_key(self._settings, f"part:{n}")[0], value)
        self._owned.clear()
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self._heartbeat.remove()

    # -- ownership ----------------------------------------------------------------------

    async def _ownership_loop(self, tg: anyio.abc.TaskGroup) -> None:
        s = self._settings
        period = s.lease_ttl / 3
        while not self._stopping.is_set():
            try:
                settled = await self._reconcile(tg)
                # While partitions move (this instance hands some over or waits for some),
                # look again soon: a partition is unowned from its release to its pickup.
                wait = period if settled else min(period, _HANDOVER_POLL)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._availability.report(exc)
                await self._availability.wait_available_or(self._stopping)
                continue
            with anyio.move_on_after(wait):
                await self._stopping.wait()

    async def _reconcile(self, tg: anyio.abc.TaskGroup) -> bool:
        """Renew, beat, hand over and acquire; True when this instance owns what it should."""
        s = self._settings
        # Partitions being handed over are renewed too while their running batches
        # finish (a lapsed lease lets the next owner start on them while they still
        # run), but only for one event timeout: a stuck run must not pin a partition.
        now = time.monotonic()
        held = [
            (n, v)
            for n, v in self._owned.items()
            if now - self._releasing.get(n, now) < s.event_timeout
        ]
        renewed = await self._leases.renew_many(
            [(lease_key(s, f"part:{n}")[0], v) for n, v in held]
        )
        for (n, _), ok in zip(held, renewed, strict=True):
            if not ok and n in self._owned:
                _log.warning("partition lease lost", partition=n)
                self._drop_partition(n)
        stats = self.statistics()
        live = await self._heartbeat.beat(
            {
                "partitions": list(stats.partitions),
                "router": stats.router,
                "processed": stats.processed,
                "duplicates": stats.duplicates,
                "dead_lettered": stats.dead_lettered,
                "failed_runs": stats.failed_runs,
                "interrupted": stats.interrupted,
                "in_flight": stats.in_flight,
                "active_workflows": stats.active_workflows,
                "multitask": s.multitask,
                "redis": self._availability.statistics().as_dict(),
                **self.extra_stats(),
            }
        )
        wanted = {n for n, who in assignment(live, s.partitions).items() if who == s.instance}
        for n, value in list(self._owned.items()):
            key, _ = lease_key(s, f"part:{n}")
            if n in self._releasing:
                if not any(p == n for p, _ in self._in_flight.values()):
                    await self._leases.release(key, value)
                    self._drop_partition(n)
                    _log.info("partition handed over", partition=n)
                continue
            if n not in wanted:
                self._releasing.setdefault(n, time.monotonic())
                scope = self._readers.pop(n, None)
                if scope is not None:
                    scope.cancel()
                self._unqueue(n)  # queued entries stay pending for the next owner
        for n in sorted(wanted - set(self._owned)):
            if self._stopping.is_set():
                return True
            got = await self._leases.acquire(*lease_key(s, f"part:{n}"))
            if got is not None:
                self._owned[n] = got
                _log.info("partition acquired", partition=n, lease=got)
                await ensure_group(self._redis, partition_stream(s, n), s.group)
                scope = anyio.CancelScope()
                self._readers[n] = scope
                tg.start_soon(self._read_partition, tg, n, scope)
        return not self._releasing and wanted <= set(self._owned)

    def _drop_partition(self, n: int) -> None:
        """Forget partition ``n``: stop its reader, drop its queued (not running) events."""
        self._owned.pop(n, None)
        self._releasing.pop(n, None)
        scope = self._readers.pop(n, None)
        if scope is not None:
            scope.cancel()
        self._unqueue(n)

    def _unqueue(self, n: int) -> None:
        """Drop partition ``n``'s queued (not running) events; they stay in its PEL."""
        for wf in self._workflows.values():
            kept = [p for p in wf.queue if p.partition != n]
            for p in wf.queue:
                if p.partition == n:
                    self._in_flight.pop(p.entry_id, None)
            wf.queue[:] = kept
        self._made_room()

    # -- reading ----------------------------------------------------------------------

    async def _read_partition(
        self, tg: anyio.abc.TaskGroup, n: int, scope: anyio.CancelScope
    ) -> None:
        s = self._settings
        stream = partition_stream(s, n)
        cursor = "0"  # the previous owner's pending entries first, then new ones
        with scope:
            while not self._stopping.is_set() and n in self._owned:
                if not self._availability.available:  # an outage: reading pauses
                    await self._availability.wait_available_or(self._stopping)
                    cursor = "0"  # a read may have happened: re-read our pending list
                    continue
                if not self._reading_allowed():
                    await self._paused()
                    continue
                room = self._max_in_flight - len(self._in_flight)
                if room <= 0:
                    await self._wait_for_room()
                    continue
                value = self._owned.get(n)
                if value is None:
                    return
                try:
                    entries, last = await self._reader.read(
                        stream,
                        cursor,
                        min(room, s.read_count),
                        lease=(lease_key(s, f"part:{n}")[0], value),
                    )
                    counts: dict[str, int] = {}
                    if cursor != ">":
                        if not entries:
                            cursor = ">"
                            continue
                        cursor = entries[-1][0]
                        counts = await self._attempts(n, [e for e, _ in entries])
                    elif not entries:
                        await self._reader.wait(stream, last, s.block_ms)
                        continue
                except FencedError:
                    _log.warning("partition lease lost; stop reading it", partition=n)
                    self._drop_partition(n)
                    return
                except ResponseError as exc:
                    if is_outage(exc):
                        self._availability.report(exc)
                        continue
                    if "NOGROUP" not in str(exc):
                        raise
                    _log.error("consumer group gone; recreating it", stream=stream)
                    await ensure_group(self._redis, stream, s.group)
                    continue
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    self._availability.report(exc)  # the loop's top waits it out
                    continue
                try:
                    for entry_id, raw in entries:
                        if n not in self._owned:
                            break
                        await self._accept(
                            tg, n, value, entry_id, raw, deliveries=counts.get(entry_id, 0) + 1
                        )
                except LeaseLostError:
                    _log.warning("partition lease lost; stop reading it", partition=n)
                    self._drop_partition(n)
                    return
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    self._availability.report(exc)  # the loop's top waits it out

    async def _paused(self) -> None:
        """Backpressure: wait a little while the breakers reject work."""
        with anyio.move_on_after(self._settings.block_ms / 1000):
            await self._stopping.wait()

    async def _wait_for_room(self) -> None:
        # Every waiter (16 partition readers, say) waits on the same event; replacing it
        # per waiter left all but the last to sleep out the whole second.
        room = self._room
        with anyio.move_on_after(1.0):
            await room.wait()

    def _made_room(self) -> None:
        """Wake everyone waiting for room; later waiters wait for the next change."""
        self._room.set()
        self._room = anyio.Event()

    async def _accept(
        self,
        tg: anyio.abc.TaskGroup,
        n: int,
        lease: str,
        entry_id: str,
        raw: dict[bytes, bytes] | None,
        *,
        deliveries: int,
    ) -> None:
        s = self._settings
        stream = partition_stream(s, n)
        if self._in_flight.get(entry_id) == (n, lease):
            return  # already queued or running in this tenure
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
        wf = self._workflows.get(event.workflow_id)
        busy = wf is not None and bool(wf.running or wf.queue)
        if busy and s.multitask == "reject":
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
        self._in_flight[entry_id] = (n, lease)
        pending = PendingEntry(
            event=event,
            entry_id=entry_id,
            partition=n,
            lease=lease,
            fields=fields,
            deliveries=deliveries,
        )
        if wf is None:
            wf = self._workflows[event.workflow_id] = WorkflowQueue(queue=[pending])
            tg.start_soon(self._drain, event.workflow_id, wf)
            return
        wf.queue.append(pending)
        if s.multitask in ("interrupt", "rollback") and wf.running and wf.scope is not None:
            wf.cancelled = True
            wf.scope.cancel()

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
        value = self._owned.get(n)
        if value is None:
            raise LeaseLostError(f"partition {n} is not ours any more")
        dlq_id = await dead_letter(  # FencedError when the partition is not ours any more
            self._redis,
            dlq_stream=self._settings.dlq_stream,
            input_stream=partition_stream(self._settings, n),
            group=self._settings.group,
            source_id=entry_id,
            fields=fields,
            original_id=source_id,
            reason=reason,
            error=error,
            attempts=attempts,
            lease=(lease_key(self._settings, f"part:{n}")[0], value),
            field_bytes=self._settings.dlq_field_bytes,
            max_fields=self._settings.max_fields,
            done_key=done_key,
        )
        if not dlq_id:  # its output was committed (a lost commit reply): acknowledged only
            self._counts["duplicates"] += 1
            _log.info("committed event acknowledged, not dead-lettered", source_id=source_id)
            return
        self._counts["dead_lettered"] += 1
        _log.warning("entry dead-lettered", source_id=source_id, reason=reason, error=error)

    async def _attempts(self, n: int, entry_ids: list[str]) -> dict[str, int]:
        """How often each entry's graph run was started (any instance, any tenure).

        Counted in ``{prefix}:attempts`` when a run starts and cleared at commit: a
        takeover that re-reads a pending entry does not count, a crash mid-run does.
        """
        if not entry_ids:
            return {}
        fields = [attempt_field(n, e) for e in entry_ids]
        values = await self._redis.hmget(self._settings.key("attempts"), fields)
        return {e: int(v) for e, v in zip(entry_ids, values, strict=True) if v is not None}

    # -- processing -------------------------------------------------------------------

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
                if self._owned.get(head.partition) != head.lease:
                    self._forget(batch)  # an earlier tenure: the PEL has them for the next
                    continue
                outcome = await self._batches.process(workflow_id, wf, batch)
                if outcome == "refused":
                    # An open breaker refused the batch: it waits (in order, in flight)
                    # until reading is allowed again; never redelivered or dead-lettered.
                    wf.queue[:0] = batch
                    while not self._reading_allowed() and not self._stopping.is_set():
                        await self._paused()
                    if self._stopping.is_set():
                        self._forget(wf.queue)
                        wf.queue.clear()
                elif outcome in ("retry", "transient"):
                    if outcome == "retry":
                        failures += 1
                        for p in batch:
                            p.deliveries += 1
                    wf.queue[:0] = batch
                    if outcome == "transient" and not self._availability.available:
                        await self._availability.wait_available_or(
                            self._stopping
                        )  # Redis was away: run again once back
                    else:
                        pause = min(0.2 * 2 ** (failures - 1), 10.0) if failures else 0.2
                        with anyio.move_on_after(pause):
                            await self._stopping.wait()
                    if self._stopping.is_set():
                        self._forget(wf.queue)
                        wf.queue.clear()
                    else:
                        try:
                            await self._redeliver_or_poison(wf)
                        except (LeaseLostError, *TRANSIENT_ERRORS) as exc:
                            # left pending: the next owner (or the next retry) decides
                            _log.warning("dead-lettering a poison event failed", error=repr(exc))
                else:
                    failures = 0
                    self._forget(batch)
            del self._workflows[workflow_id]
            self._made_room()

    def _forget(self, batch: list[PendingEntry]) -> None:
        for item in batch:
            if self._in_flight.get(item.entry_id) == (item.partition, item.lease):
                del self._in_flight[item.entry_id]
        self._made_room()

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
