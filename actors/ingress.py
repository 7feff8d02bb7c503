"""The ingress actor: ``ctxd:in`` → the contextual workflow → ``ctxd:out``.

One reader task pulls entries through the consumer group (its own pending entries
first, then new ones), validates them (invalid → DLQ at once) and queues valid events
per workflow. One drain task per active workflow takes the queued events of that
workflow, in order, in batches, runs them through the graph in one run, and commits
outputs + acknowledgements atomically (:class:`~actors.streams.OutputCommitter`).
Entries are acknowledged only after the run's checkpoint and the outputs are durable.

Entries that stay pending too long (a crashed instance, a failed run) are reclaimed
with ``XAUTOCLAIM``; one delivered ``max_deliveries`` times goes to the DLQ.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
import structlog
from opentelemetry import trace
from redis.asyncio import Redis

from actors.breaker import CallNotPermittedError
from actors.config import Settings
from actors.parking import WorkflowRunner
from actors.redis_io import autoclaim, read_group
from actors.streams import CommitItem, OutputCommitter, dead_letter, ensure_group, output_fields
from actors.validation import Event, decode_fields, parse_event
from graph.errors import InvalidEntryError
from graph.tracing import event_trace_fields
from graph.workflow import ContextualGraph
from telemetry.metrics import Instruments
from telemetry.propagation import extract_context
from telemetry.spans import process_span

__all__ = ["Ingress", "IngressStatistics"]

_log = structlog.get_logger("ctxd.ingress")
_tracer = trace.get_tracer("ctxd.ingress")


@dataclass(frozen=True)
class IngressStatistics:
    """Counters since start.

    Attributes:
        processed: events with an output written.
        duplicates: events suppressed because their event_id was done already.
        dead_lettered: entries sent to the DLQ.
        failed_runs: graph runs that raised (their entries stay pending).
        in_flight: entries read and not yet committed.
        active_workflows: workflows being processed now.
    """

    processed: int
    duplicates: int
    dead_lettered: int
    failed_runs: int
    in_flight: int
    active_workflows: int


def _refused_by_breaker(exc: Exception) -> bool:
    if isinstance(exc, ExceptionGroup):
        return exc.subgroup(CallNotPermittedError) is not None
    return isinstance(exc, CallNotPermittedError)


@dataclass
class _Pending:
    event: Event
    fields: Mapping[str, str | bytes]
    deliveries: int
    read_at: float = field(default_factory=time.monotonic)


class Ingress:
    """Consumes the input stream and drives the workflow, effectively once per event.

    Args:
        redis: the client (shared with the checkpointer's process, not its connection).
        settings: validated settings.
        graph: the compiled contextual workflow.
        reading_allowed: asked before each read and reclaim; while it says False (a
            circuit breaker is open) nothing new is read or reclaimed.
        instruments: where the messaging metrics go; none recorded if None.
        tracer: for the ``process`` spans; the global tracer if None.
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
    ) -> None:
        self._reading_allowed = reading_allowed or (lambda: True)
        self._redis = redis
        self._instruments = instruments
        self._tracer = tracer or _tracer
        self._metric_attributes = {
            "messaging.system": "redis",
            "messaging.destination.name": settings.input_stream,
            "messaging.consumer.group.name": settings.group,
        }
        self._settings = settings
        self._graph = graph
        self._runner = WorkflowRunner(redis, settings, graph)
        self._consumer = f"{settings.instance}:ingress"
        self._committer = OutputCommitter(
            redis,
            input_stream=settings.input_stream,
            output_stream=settings.output_stream,
            group=settings.group,
            dedupe_ttl=settings.dedupe_ttl,
        )
        self._queues: dict[str, list[_Pending]] = {}
        self._in_flight_ids: set[str] = set()
        self._slots = anyio.CapacityLimiter(settings.concurrency)
        self._room = anyio.Event()
        self._max_in_flight = settings.concurrency * settings.batch_size
        self._stopping = anyio.Event()
        self.stopped = anyio.Event()
        """Set when :meth:`run` has returned: nothing is in flight any more."""
        self._counts = {"processed": 0, "duplicates": 0, "dead_lettered": 0, "failed_runs": 0}

    @property
    def consumer(self) -> str:
        """This instance's consumer name in the group."""
        return self._consumer

    def statistics(self) -> IngressStatistics:
        """A snapshot of the counters."""
        return IngressStatistics(
            in_flight=len(self._in_flight_ids),
            active_workflows=len(self._queues),
            **self._counts,
        )

    def stop(self) -> None:
        """Stop reading; in-flight workflows finish their current batch."""
        self._stopping.set()
        self._room.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Read, process and commit until :meth:`stop` is called (or cancelled)."""
        await ensure_group(self._redis, self._settings.input_stream, self._settings.group)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                tg.start_soon(self._reclaim_loop, tg)
                await self._read_loop(tg)
                while self._queues:  # stopping: let in-flight workflows finish their batch
                    await self._wait_for_room()
                tg.cancel_scope.cancel()
        finally:
            self.stopped.set()

    # -- reading ----------------------------------------------------------------------

    async def _read_loop(self, tg: anyio.abc.TaskGroup) -> None:
        cursor = "0"  # this consumer's own pending entries first, then new ones
        stream = self._settings.input_stream
        while not self._stopping.is_set():
            if not self._reading_allowed():
                await self._paused()
                continue
            room = self._max_in_flight - len(self._in_flight_ids)
            if room <= 0:
                await self._wait_for_room()
                continue
            block = None if cursor != ">" else self._settings.block_ms
            entries = await read_group(
                self._redis,
                group=self._settings.group,
                consumer=self._consumer,
                stream=stream,
                cursor=cursor,
                count=min(room, self._settings.read_count),
                block=block,
            )
            if cursor != ">":
                if not entries:
                    cursor = ">"
                    continue
                cursor = entries[-1][0]
            for entry_id, raw in entries:
                await self._accept(tg, entry_id, raw, deliveries=1)

    async def _paused(self) -> None:
        """Backpressure: wait a little while the breakers reject work."""
        with anyio.move_on_after(self._settings.block_ms / 1000):
            await self._stopping.wait()

    async def _wait_for_room(self) -> None:
        self._room = anyio.Event()
        with anyio.move_on_after(1.0):
            await self._room.wait()

    async def _accept(
        self,
        tg: anyio.abc.TaskGroup,
        entry_id: str,
        raw: dict[bytes, bytes] | None,
        *,
        deliveries: int,
    ) -> None:
        if entry_id in self._in_flight_ids:
            return
        if self._instruments is not None:
            self._instruments.consumed_messages.add(1, self._metric_attributes)
        if raw is None:  # the entry was trimmed or deleted while pending: nothing to redo
            _log.error("pending entry has no payload; acknowledging", source_id=entry_id)
            await self._redis.xack(self._settings.input_stream, self._settings.group, entry_id)
            return
        fields = decode_fields(raw)
        try:
            event = parse_event(
                entry_id,
                fields,
                max_content_bytes=self._settings.max_content_bytes,
                max_fields=self._settings.max_fields,
            )
        except InvalidEntryError as exc:
            await self._dead_letter(entry_id, fields, exc.reason, str(exc), deliveries)
            return
        if deliveries > self._settings.max_deliveries:
            await self._dead_letter(
                entry_id,
                fields,
                "poison",
                f"delivered {deliveries} times without completing (limit "
                f"{self._settings.max_deliveries}); see the service log for its errors",
                deliveries,
            )
            return
        self._in_flight_ids.add(entry_id)
        queue = self._queues.get(event.workflow_id)
        pending = _Pending(event=event, fields=fields, deliveries=deliveries)
        if queue is None:
            self._queues[event.workflow_id] = [pending]
            tg.start_soon(self._drain, event.workflow_id)
        else:
            queue.append(pending)

    async def _dead_letter(
        self,
        entry_id: str,
        fields: Mapping[str, str | bytes],
        reason: str,
        error: str,
        attempts: int,
    ) -> None:
        await dead_letter(
            self._redis,
            dlq_stream=self._settings.dlq_stream,
            input_stream=self._settings.input_stream,
            group=self._settings.group,
            source_id=entry_id,
            fields=fields,
            reason=reason,
            error=error,
            attempts=attempts,
        )
        self._counts["dead_lettered"] += 1
        _log.warning("entry dead-lettered", source_id=entry_id, reason=reason, error=error)

    # -- reclaiming -------------------------------------------------------------------

    async def _reclaim_loop(self, tg: anyio.abc.TaskGroup) -> None:
        """Take over entries idle too long: a dead consumer's, or our own failed ones."""
        min_idle_ms = int(self._settings.event_timeout * 2000)
        while not self._stopping.is_set():
            with anyio.move_on_after(self._settings.event_timeout):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            if not self._reading_allowed():
                continue  # reclaiming now would only count deliveries the breaker refuses
            cursor = "0-0"
            while True:
                cursor, claimed = await autoclaim(
                    self._redis,
                    stream=self._settings.input_stream,
                    group=self._settings.group,
                    consumer=self._consumer,
                    min_idle_ms=min_idle_ms,
                    cursor=cursor,
                )
                fresh = [(eid, f) for eid, f in claimed if eid not in self._in_flight_ids]
                counts = await self._delivery_counts([eid for eid, _ in fresh])
                for entry_id, raw in fresh:
                    await self._accept(tg, entry_id, raw, deliveries=counts.get(entry_id, 1))
                if cursor == "0-0":
                    break

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        if not entry_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for eid in entry_ids:
                pipe.xpending_range(
                    self._settings.input_stream, self._settings.group, min=eid, max=eid, count=1
                )
            replies = await pipe.execute()
        counts: dict[str, int] = {}
        for eid, reply in zip(entry_ids, replies, strict=True):
            if reply:
                counts[eid] = int(reply[0]["times_delivered"])
        return counts

    # -- processing -------------------------------------------------------------------

    async def _drain(self, workflow_id: str) -> None:
        structlog.contextvars.bind_contextvars(workflow_id=workflow_id)  # this task's lines
        async with self._slots:
            queue = self._queues[workflow_id]
            while queue:
                batch = queue[: self._settings.batch_size]
                del queue[: len(batch)]
                try:
                    # A batch refused by a breaker stays pending and in flight: retried
                    # here once reading is allowed again, never redelivered or DLQ'd.
                    while not await self._process(workflow_id, batch):
                        while not self._reading_allowed() and not self._stopping.is_set():
                            await self._paused()
                        if self._stopping.is_set():
                            break
                finally:
                    for item in batch:
                        self._in_flight_ids.discard(item.event.source_id)
                    self._room.set()
            del self._queues[workflow_id]

    async def _process(self, workflow_id: str, batch: list[_Pending]) -> bool:
        """Run and commit one batch; False if a circuit breaker refused it."""
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            spans = [
                stack.enter_context(
                    process_span(
                        self._tracer,
                        stream=self._settings.input_stream,
                        group=self._settings.group,
                        consumer=self._consumer,
                        message_id=p.event.source_id,
                        workflow_id=workflow_id,
                        delivery_count=p.deliveries,
                        parent=extract_context(p.event.carrier) if p.event.carrier else None,
                    )
                )
                for p in batch
            ]
            try:
                await self._run_and_commit(workflow_id, batch, spans)
            except Exception as exc:  # noqa: BLE001 - the entries stay pending and are retried
                if _refused_by_breaker(exc):
                    _log.warning(
                        "circuit breaker open; batch stays pending", workflow_id=workflow_id
                    )
                    return False
                self._record_failed(len(batch), exc, time.monotonic() - started)
                self._counts["failed_runs"] += 1
                _log.error(
                    "workflow run failed; entries stay pending for redelivery",
                    workflow_id=workflow_id,
                    events=len(batch),
                    error=f"{type(exc).__name__}: {exc}",
                )
        _log.debug(
            "batch done",
            workflow_id=workflow_id,
            events=len(batch),
            seconds=time.monotonic() - started,
        )
        return True

    async def _run_and_commit(
        self, workflow_id: str, batch: list[_Pending], spans: list[trace.Span]
    ) -> None:
        started = time.monotonic()
        done_keys = [self._settings.key("done", p.event.event_id) for p in batch]
        already = await self._redis.exists(*done_keys) if len(batch) == 1 else None
        if already is None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in done_keys:
                    pipe.exists(key)
                flags = [bool(x) for x in await pipe.execute()]
        else:
            flags = [bool(already)]
        fresh = [p for p, dup in zip(batch, flags, strict=True) if not dup]
        # Each event carries its process span's context: its node spans join its trace.
        carriers = {id(p): event_trace_fields(s) for p, s in zip(batch, spans, strict=True)}
        results: Mapping[str, Mapping[str, object]] = {}
        checkpoint_id = ""
        handled: frozenset[str] = frozenset()
        if fresh:
            timeout = self._settings.event_timeout * max(1, math.ceil(len(fresh) / 4))
            with anyio.fail_after(timeout):
                # actors/parking.py: control entries, parking while paused, replays.
                run = await self._runner.run(
                    workflow_id,
                    [(p.event, p.fields) for p in fresh],
                    {
                        p.event.source_id: format(s.get_span_context().trace_id, "032x")
                        for p, s in zip(batch, spans, strict=True)
                    },
                    {p.event.source_id: carriers[id(p)] for p in fresh},
                )
            results, handled = run.results, run.handled
            checkpoint_id = run.checkpoint_id or ""
        items: list[CommitItem] = []
        for pending, span, dup in zip(batch, spans, flags, strict=True):
            trace_id = format(span.get_span_context().trace_id, "032x")
            result = results.get(pending.event.event_id) if not dup else None
            fields = (
                output_fields(result, trace_id=trace_id, checkpoint_id=checkpoint_id)
                if result is not None
                else {}
            )
            items.append(
                CommitItem(
                    source_id=pending.event.source_id,
                    done_key=self._settings.key("done", pending.event.event_id),
                    fields=fields,
                )
            )
        ids = await self._committer.commit(items)
        self._record_processed(items, ids, time.monotonic() - started)
        for pending, out_id in zip(batch, ids, strict=True):
            if out_id:
                self._counts["processed"] += 1
            elif pending.event.source_id in handled:  # parked or committed by the runner
                continue
            else:
                self._counts["duplicates"] += 1
                _log.info(
                    "duplicate event suppressed",
                    workflow_id=workflow_id,
                    event_id=pending.event.event_id,
                    source_id=pending.event.source_id,
                )

    # -- metrics ----------------------------------------------------------------------

    def _record_processed(self, items: list[CommitItem], ids: list[str], seconds: float) -> None:
        if self._instruments is None:
            return
        for item, out_id in zip(items, ids, strict=True):
            attributes = {
                **self._metric_attributes,
                "ctxd.outcome": "processed" if out_id else "duplicate",
                "ctxd.status": item.fields.get("status", ""),
                "ctxd.decision": item.fields.get("decision", ""),
            }
            self._instruments.process_duration.record(seconds, attributes)

    def _record_failed(self, count: int, error: Exception, seconds: float) -> None:
        if self._instruments is None:
            return
        attributes = {
            **self._metric_attributes,
            "ctxd.outcome": "failed",
            "error.type": type(error).__name__,
        }
        for _ in range(count):
            self._instruments.process_duration.record(seconds, attributes)
