"""The runner: one batch of one workflow, start to end: a graph run, its outputs, its outcome.

The scheduler (actors/service/scheduler.py) keeps a queue per workflow. For each batch it
takes from a queue it calls :meth:`BatchProcessor.process`,
which opens the events' ``process`` spans, suppresses events whose ``event_id`` is done
already in their workflow (:func:`~actors.service.streams.done_key`), counts the run's start in
``{prefix}:attempts``, runs the batch through the
:class:`~actors.service.parking.WorkflowRunner` under the partition's lease, commits outputs and
acknowledgements in one fenced script, and says how it went (a :class:`BatchReport`
with its :data:`Outcome` and what it counted); it never touches the scheduler's queues
or counters:

- ``done``: committed;
- ``lost``: the partition's lease was lost; its next owner redoes the batch;
- ``refused``: an open circuit breaker refused a call; the batch waits, in order;
- ``transient``: Redis was unavailable; retried, and not counted as an attempt;
- ``retry``: the run failed; retried, and after ``CTXD_MAX_DELIVERIES`` starts the
  scheduler dead-letters the event as poison.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import anyio
import structlog
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from actors.config import Settings
from actors.runtime.availability import RedisAvailability, is_outage
from actors.runtime.breaker import CallNotPermittedError
from actors.runtime.redis_io import wait_aof
from actors.service.gateway import CommitItem, OutputCommitter, output_item
from actors.service.lease import CheckpointFence
from actors.service.parking import AckTarget, WorkflowRunner
from actors.service.partitions import (
    attempts_key,
    output_stream_of,
    partition_lease,
    partition_stream,
)
from actors.service.retention import Retention
from actors.service.streams import done_key, event_result
from actors.service.validation import Event
from graph.errors import FencedError, exception_chain
from graph.history import is_store_failure
from graph.state import JSON
from graph.tracing import event_trace_fields
from graph.workflow import ContextualGraph, thread_config
from telemetry.metrics import Instruments
from telemetry.propagation import extract_context
from telemetry.spans import process_span

__all__ = [
    "BatchProcessor",
    "BatchReport",
    "Outcome",
    "PendingEntry",
    "RunSlot",
    "attempt_field",
    "describe_failure",
    "error_field",
    "poison_error",
]

_log = structlog.get_logger("ctxd.ingress")  # the ingress's lines, as before the split

Outcome = Literal["done", "lost", "refused", "transient", "retry"]
"""How a batch went (see the module's docstring)."""


@dataclass
class PendingEntry:
    """An entry read from a partition and not yet committed."""

    event: Event
    entry_id: str
    partition: int
    lease: str
    fields: Mapping[str, str | bytes]
    deliveries: int
    read_at: float = field(default_factory=time.monotonic)


class RunSlot:
    """Where one workflow's running graph run can be interrupted from.

    The runner opens it around the graph run; the scheduler, seeing a newer event under
    ``CTXD_MULTITASK=interrupt|rollback``, calls :meth:`interrupt`.
    """

    def __init__(self) -> None:
        self._scope: anyio.CancelScope | None = None

    @property
    def running(self) -> bool:
        """Whether a graph run is in progress now."""
        return self._scope is not None

    def interrupt(self) -> bool:
        """Cancel the run in progress, if any; True when there was one."""
        if self._scope is None:
            return False
        self._scope.cancel()
        return True

    @contextlib.contextmanager
    def open(self) -> Iterator[anyio.CancelScope]:
        """The scope of one run; :meth:`interrupt` cancels it while it is open."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                yield scope
            finally:
                self._scope = None


@dataclass(frozen=True)
class BatchReport:
    """How one batch went, and what it counts towards the service's statistics.

    Attributes:
        outcome: see :data:`Outcome`.
        processed: events with an output written.
        duplicates: events suppressed because their event_id was done already.
        interrupted: events cancelled by the interrupt/rollback strategies.
        failed: whether the graph run raised (a failed run, counted even when the
            outcome turns out ``transient``).
    """

    outcome: Outcome
    processed: int = 0
    duplicates: int = 0
    interrupted: int = 0
    failed: bool = False


class _Tally(NamedTuple):
    processed: int
    duplicates: int
    interrupted: int


class BatchProcessor:
    """Runs and commits batches for the ingress.

    Args:
        redis: the client.
        settings: validated settings.
        graph: the compiled contextual workflow.
        consumer: the consumer name on the partition streams (for the spans).
        instruments: where the messaging metrics go; none recorded if None.
        metric_attributes: the attributes every messaging metric point carries.
        tracer: for the ``process`` spans.
        availability: the process's Redis monitor: a run that met an outage (or ran
            while one began) is ``transient``, and its start is taken back once Redis
            is there again.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        graph: ContextualGraph,
        *,
        consumer: str,
        instruments: Instruments | None,
        metric_attributes: Mapping[str, str],
        tracer: trace.Tracer,
        availability: RedisAvailability | None = None,
    ) -> None:
        self._redis = redis
        self._availability = availability or RedisAvailability.for_settings(redis, settings)
        self._settings = settings
        self._graph = graph
        self._consumer = consumer
        self._instruments = instruments
        self._metric_attributes = metric_attributes
        self._tracer = tracer
        self._committer = OutputCommitter.from_settings(redis, settings)
        self._runner = WorkflowRunner(redis, settings, graph, committer=self._committer)
        self.retention = Retention(redis, settings, graph)
        """Pruning after commits and the idle sweep (actors/service/retention.py)."""

    async def process(
        self, workflow_id: str, slot: RunSlot, batch: list[PendingEntry]
    ) -> BatchReport:
        """Run and commit ``batch`` (one workflow's entries of one partition tenure).

        A run that ends ``lost``, ``transient`` or ``refused`` is not the events' fault:
        its start is taken back from ``{prefix}:attempts``.

        Args:
            workflow_id: the batch's workflow.
            slot: the workflow's run slot, opened around the graph run.
            batch: the entries, in order.
        """
        generation = self._availability.generation
        report = await self._process(workflow_id, slot, batch)
        outcome = report.outcome
        if outcome == "retry" and self._availability.disturbed_since(generation):
            outcome = "transient"  # Redis went away during the run: not the events' fault
            report = replace(report, outcome=outcome)
        if outcome in ("lost", "transient", "refused"):

            async def take_back() -> None:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for p in batch:
                        pipe.hincrby(
                            attempts_key(self._settings, p.partition),
                            attempt_field(p.partition, p.entry_id),
                            -1,
                        )
                    await pipe.execute()

            # Not the events' fault, so never an attempt: should Redis refuse the write
            # too (an outage, or maxmemory, which is what often opens a breaker), it is
            # waited out like any outage rather than raised into the scheduler.
            await self._availability.call(take_back)
        return report

    async def _process(
        self, workflow_id: str, slot: RunSlot, batch: list[PendingEntry]
    ) -> BatchReport:
        started = time.monotonic()
        report = BatchReport("done")
        with contextlib.ExitStack() as stack:
            spans = [
                stack.enter_context(
                    process_span(
                        self._tracer,
                        # The contract's name (process ctxd:in); the partition is internal.
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
            # Checkpoint writes of the run are fenced by the lease its batch was read under.
            lease = (partition_lease(self._settings, batch[0].partition)[0], batch[0].lease)
            try:
                with CheckpointFence.tenure(lease):
                    tally = await self._run_and_commit(workflow_id, slot, batch, spans, lease)
                report = BatchReport("done", *tally)
            except Exception as exc:  # noqa: BLE001 - the events are retried in order
                # A refused commit, or a checkpoint write refused inside the graph (and
                # perhaps wrapped by it): the partition's new owner redoes the batch.
                if any(isinstance(e, FencedError) for e in exception_chain(exc)):
                    _log.warning(
                        "partition lease lost during a run; the new owner redoes it",
                        workflow_id=workflow_id,
                    )
                    return BatchReport("lost")
                if _refused_by_breaker(exc):
                    _log.warning(
                        "circuit breaker open; batch stays pending", workflow_id=workflow_id
                    )
                    return BatchReport("refused")
                if is_outage(exc) or _is_transient(exc):
                    # One line per outage (the monitor's), not one per workflow.
                    self._availability.report(exc)
                    _log.debug("workflow run met a Redis outage", workflow_id=workflow_id)
                    return BatchReport("transient")
                self._record_failed(len(batch), exc, time.monotonic() - started)
                report = BatchReport("retry", failed=True)
                await self._remember_failure(batch, exc)
                _log.error(
                    "workflow run failed; its events are retried",
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
        return report

    async def _run_and_commit(
        self,
        workflow_id: str,
        slot: RunSlot,
        batch: list[PendingEntry],
        spans: list[trace.Span],
        lease: tuple[str, str],
    ) -> _Tally:
        s = self._settings
        started = time.monotonic()
        done_keys = [done_key(s, workflow_id, p.event.event_id) for p in batch]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in done_keys:
                pipe.exists(key)
            flags = [bool(x) for x in await pipe.execute()]
        seen: set[str] = set()
        for i, p in enumerate(batch):  # a repeated event_id inside the batch is a duplicate
            flags[i] = flags[i] or p.event.event_id in seen
            seen.add(p.event.event_id)
        fresh = [p for p, dup in zip(batch, flags, strict=True) if not dup]
        results: Mapping[str, Mapping[str, object]] = {}
        handled: frozenset[str] = frozenset()
        checkpoint_id = ""
        interrupted = 0
        n = batch[0].partition
        if fresh:
            attempts = attempts_key(s, n)
            async with self._redis.pipeline(transaction=False) as pipe:
                for p in fresh:
                    pipe.hincrby(attempts, attempt_field(n, p.entry_id), 1)
                pipe.expire(attempts, s.dedupe_ttl)
                await pipe.execute()
            base: str | None = None  # where a rollback (CTXD_MULTITASK) returns to
            if s.multitask == "rollback":
                try:
                    state = await self._graph.aget_state(thread_config(workflow_id))
                    base = (state.config.get("configurable") or {}).get("checkpoint_id")
                except Exception as exc:
                    if is_store_failure(exc):
                        raise
                    # It does not decode: the runner recovers it before the run (no base).
            _log.debug(
                "run started",
                workflow_id=workflow_id,
                event_ids=[p.event.event_id for p in fresh],
            )
            timeout = s.event_timeout * max(1, math.ceil(len(fresh) / 4))
            run = None
            with slot.open(), _run_deadline(timeout, s.event_timeout):
                # actors/service/parking.py: control entries, parking while paused, replays.
                run = await self._runner.run(
                    workflow_id,
                    [(p.event, p.fields) for p in fresh],
                    trace_ids={
                        p.event.source_id: format(sp.get_span_context().trace_id, "032x")
                        for p, sp in zip(batch, spans, strict=True)
                    },
                    carriers={
                        p.event.source_id: event_trace_fields(sp)
                        for p, sp in zip(batch, spans, strict=True)
                    },
                    ack=AckTarget(
                        stream=partition_stream(s, n),
                        entry_ids={p.event.source_id: p.entry_id for p in fresh},
                        lease=lease,
                    ),
                )
            if run is None:  # cancelled by a newer event (interrupt / rollback)
                await self._after_interrupt(workflow_id, base)
                results = {
                    p.event.event_id: _interrupted_result(p.event, s.multitask) for p in fresh
                }
                interrupted = len(fresh)
            else:
                results, handled = run.results, run.handled
                checkpoint_id = run.checkpoint_id or ""
        items = [
            output_item(
                s,
                workflow_id,
                pending.event.event_id,
                pending.entry_id,
                results.get(pending.event.event_id) if not dup else None,
                trace_id=format(span.get_span_context().trace_id, "032x"),
                checkpoint_id=checkpoint_id,
            )
            for pending, span, dup in zip(batch, spans, flags, strict=True)
        ]
        ids = await self._committer.commit(
            items,
            input_stream=partition_stream(s, n),
            output_stream=output_stream_of(s, n),
            lease=lease,
        )
        if s.wait_aof:  # outputs on disk before anyone is told: WAITAOF (Redis >= 7.2)
            await wait_aof(self._redis, output_stream_of(s, n), int(s.event_timeout * 1000))
        await self._redis.hdel(
            attempts_key(s, n),
            *(f for p in batch for f in (attempt_field(n, p.entry_id), error_field(n, p.entry_id))),
        )
        if fresh:
            await self.retention.after_commit(workflow_id, lease)
        self._record_processed(items, ids, time.monotonic() - started)
        processed = duplicates = 0
        for pending, out_id in zip(batch, ids, strict=True):
            if out_id:
                processed += 1
            elif pending.event.source_id in handled:  # parked or committed by the runner
                continue
            else:
                duplicates += 1
                _log.info(
                    "duplicate event suppressed",
                    workflow_id=workflow_id,
                    event_id=pending.event.event_id,
                    source_id=pending.event.source_id,
                )
        return _Tally(processed, duplicates, interrupted)

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

    async def _remember_failure(self, batch: list[PendingEntry], exc: BaseException) -> None:
        """Keep why the run failed next to each entry's attempt count (one round trip),
        for the DLQ entry should the entry become poison (:func:`poison_error`)."""
        error = describe_failure(exc)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for p in batch:
                    key = attempts_key(self._settings, p.partition)
                    pipe.hset(key, error_field(p.partition, p.entry_id), error)
                await pipe.execute()
        except Exception as write_error:
            if not is_outage(write_error):
                raise
            self._availability.report(write_error)  # only the DLQ's explanation is lost

    async def _after_interrupt(self, workflow_id: str, base: str | None) -> None:
        """Rollback: make the checkpoint before the cancelled run the head again."""
        if self._settings.multitask != "rollback" or base is None:
            return
        state = await self._graph.aget_state(thread_config(workflow_id))
        head = (state.config.get("configurable") or {}).get("checkpoint_id")
        if head != base:
            await self._graph.aupdate_state(
                thread_config(workflow_id, base), None, as_node="__copy__"
            )
            _log.info("workflow rolled back", workflow_id=workflow_id, checkpoint_id=base)


def attempt_field(partition: int, entry_id: str) -> str:
    """An entry's field in ``{prefix}:attempts``: ids are unique per stream only, and the
    router fills many partition streams in the same millisecond, so ``5-3`` of partition
    1 and ``5-3`` of partition 8 are different entries."""
    return f"{partition}/{entry_id}"


def error_field(partition: int, entry_id: str) -> str:
    """The field next to :func:`attempt_field` holding why the entry's last run failed."""
    return f"{attempt_field(partition, entry_id)}/error"


_FAILURE_CHARS = 500


def describe_failure(exc: BaseException) -> str:
    """``Type: message`` of a failed run, on one line and bounded (a DLQ's ``error``).

    An exception group (a task group's) is described by its first leaf, with a count.
    """
    leaves: list[BaseException] = []
    stack = [exc]
    while stack:
        current = stack.pop(0)
        if isinstance(current, BaseExceptionGroup):
            stack[:0] = list(current.exceptions)
        else:
            leaves.append(current)
    first = leaves[0] if leaves else exc
    text = " ".join(f"{type(first).__name__}: {first}".split())
    if len(leaves) > 1:
        text += f" (and {len(leaves) - 1} more)"
    return text if len(text) <= _FAILURE_CHARS else text[: _FAILURE_CHARS - 1] + "…"


async def poison_error(
    redis: Redis, settings: Settings, partition: int, entry_id: str, runs: int
) -> str:
    """The DLQ ``error`` of an entry whose runs failed ``runs`` times: the last recorded
    exception, or, when none was (every run ended with its process), that it stopped.

    Read from the partition's ``{p<n>}:attempts``, so a DLQ entry written after a restart,
    by another instance, still says what failed.
    """
    limit = settings.max_deliveries
    recorded = await redis.hget(attempts_key(settings, partition), error_field(partition, entry_id))
    if recorded is not None:
        last = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
        return f"failed {runs} times (limit {limit}); last error: {last}"
    return (
        f"the run did not finish in {runs} attempts (limit {limit}): the process stopped "
        "(killed, or crashed) during each run, or was stopped before it could record an "
        "error; check the service's exit status and log, and CTXD_EVENT_TIMEOUT"
    )


@contextlib.contextmanager
def _run_deadline(seconds: float, event_timeout: float) -> Iterator[None]:
    """``anyio.fail_after(seconds)`` whose TimeoutError says which deadline passed (it
    ends up in the DLQ entry of an event whose runs keep timing out)."""
    try:
        with anyio.fail_after(seconds) as scope:
            yield
    except TimeoutError as exc:
        if not scope.cancelled_caught:
            raise  # a TimeoutError from inside the run, not its deadline
        raise TimeoutError(
            f"the run did not finish within {seconds:g}s (CTXD_EVENT_TIMEOUT="
            f"{event_timeout:g}s per 4 events of a batch); a slow analyzer or step? "
            "raise CTXD_EVENT_TIMEOUT"
        ) from exc


def _refused_by_breaker(exc: Exception) -> bool:
    if isinstance(exc, ExceptionGroup):
        return exc.subgroup(CallNotPermittedError) is not None
    return isinstance(exc, CallNotPermittedError)


def _is_transient(exc: BaseException) -> bool:
    """A Redis outage (also wrapped by LangGraph or in an exception group); not a bare
    TimeoutError/OSError: an event time-out is the event's."""
    return any(
        isinstance(e, RedisError | ConnectionError) and not isinstance(e, ResponseError)
        for e in exception_chain(exc)
    )


def _interrupted_result(event: Event, strategy: str) -> dict[str, JSON]:
    return event_result(
        event.workflow_id,
        event.event_id,
        event.source_id,
        status="error",
        error=f"interrupted by a newer event of the workflow (CTXD_MULTITASK={strategy})",
    )
