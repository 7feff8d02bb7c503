"""One workflow's batch through the graph: events, control entries, and parking.

The ingress hands every batch of one workflow to :class:`WorkflowRunner`, which keeps
the workflow's order across three kinds of input:

- an **event** runs through the contextual workflow, unless the workflow is *paused*
  (an escalation waits for a person): then it is **parked**, moved in one ``MULTI`` to
  the stream ``{prefix}:parked:{workflow_id}`` and acknowledged on ``ctxd:in``, so it
  is neither lost (SIGKILL at any moment leaves it pending or parked, never neither)
  nor reclaimed and counted as a failed delivery while the workflow waits;
- a **resume** control entry (``ctxd resume``) answers the escalation: the paused
  event finishes, and the control entry's output carries the resumed decision;
- a **rollback** control entry (``ctxd rollback``) forks the workflow from an older
  checkpoint.

Whenever the workflow is not paused, parked events are replayed first, oldest first,
each committed with its output and removed from the parked stream in one script. The
replay also runs at the start of every batch, so a service killed in the middle of a
replay finishes it before anything newer, after its restart. Results of earlier
entries of the same batch are committed before a replay, so outputs keep input order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import structlog
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.gateway import Lease, OutputCommitter, dead_letter, output_item
from actors.service.partitions import (
    dlq_stream_of,
    output_stream_of,
    partition_key,
    workflow_partition,
)
from actors.service.streams import event_result
from actors.service.validation import Event, decode_fields, parse_event
from graph.errors import CtxdError, FencedError, InvalidEntryError
from graph.history import fork_checkpoint
from graph.json_values import as_object, as_objects
from graph.recovery import StateRecovery, load_checked_state
from graph.state import JSON, outbox_result
from graph.workflow import (
    ContextualGraph,
    RunResult,
    paused_event_id,
    resume_workflow,
    run_events,
    thread_config,
)

__all__ = [
    "AckTarget",
    "BatchRun",
    "WorkflowRunner",
    "parked_stream",
    "resume_fields",
    "rollback_fields",
]

_log = structlog.get_logger("ctxd.parking")
_TRACE_PREFIX = "ctxd_trace_"
"""Parked entries keep their event's trace (``ctxd_trace_trace_id``, ``..._traceparent``)."""

Fields = Mapping[str, str | bytes]


def parked_stream(settings: Settings, workflow_id: str) -> str:
    """Where a paused workflow's events wait: ``{prefix}:{p<n>}:parked:{workflow_id}``."""
    return partition_key(settings, workflow_partition(settings, workflow_id), "parked", workflow_id)


@dataclass(frozen=True)
class AckTarget:
    """Where a batch's entries are acknowledged: the stream they were read from.

    Attributes:
        stream: the stream (a partition stream; ``ctxd:in`` when None is given).
        entry_ids: the entry id in that stream, by the event's source id.
        lease: ``(key, value)`` of the lease the commits are fenced by, if any.
    """

    stream: str
    entry_ids: Mapping[str, str]
    lease: Lease | None = None


@dataclass(frozen=True)
class BatchRun:
    """What the runner did with a batch.

    Attributes:
        results: results to commit, by event id (events and control entries).
        checkpoint_id: the workflow's checkpoint after the batch.
        handled: source ids the runner acknowledged itself (parked, or committed
            before a replay): the ingress has nothing left to count for them.
    """

    results: Mapping[str, Mapping[str, JSON]]
    checkpoint_id: str | None
    handled: frozenset[str]


class WorkflowRunner:
    """Runs one workflow's batches in order, parking events while it is paused.

    Args:
        redis: the client.
        settings: validated settings (streams, durability, dedupe window).
        graph: the compiled contextual workflow.
        committer: the ingress's output committer, shared (a new one if None).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        graph: ContextualGraph,
        *,
        committer: OutputCommitter | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._graph = graph
        self._budget = settings.analyzer_policy.iteration_budget
        self._committer = committer or OutputCommitter.from_settings(redis, settings)

    async def run(
        self,
        workflow_id: str,
        batch: Sequence[tuple[Event, Fields]],
        trace_ids: Mapping[str, str] | None = None,
        carriers: Mapping[str, Mapping[str, str]] | None = None,
        ack: AckTarget | None = None,
    ) -> BatchRun:
        """Process ``batch`` (one workflow's entries, in order).

        Args:
            workflow_id: the workflow.
            batch: the entries, with their raw fields (parking keeps them as they came).
            trace_ids: trace id per source id, for outputs committed here.
            carriers: per source id, the ``traceparent`` of the event's process span, so
                its node spans join its trace.
            ack: where entries the runner settles itself are acknowledged (the
                stream they were read from); ``ctxd:in`` by source id when None.
        """
        target = ack or AckTarget(
            self._settings.input_stream, {e.source_id: e.source_id for e, _ in batch}
        )
        run = _Run(self, workflow_id, dict(trace_ids or {}), dict(carriers or {}), target)
        await run.start()
        for event, fields in batch:
            await run.take(event, fields)
        await run.flush()
        return BatchRun(
            results=run.results,
            checkpoint_id=run.checkpoint_id,
            handled=frozenset(run.handled),
        )


class _Run:
    """The state of one batch: pending events, results not yet committed, pause."""

    def __init__(
        self,
        runner: WorkflowRunner,
        workflow_id: str,
        trace_ids: dict[str, str],
        carriers: dict[str, Mapping[str, str]],
        ack: AckTarget,
    ):
        self.r = runner
        self.workflow_id = workflow_id
        self.trace_ids = trace_ids
        self.carriers = carriers
        self.ack = ack
        self.results: dict[str, Mapping[str, JSON]] = {}
        self.held: list[Event] = []  # entries whose results the ingress will commit
        self.handled: set[str] = set()
        self.checkpoint_id: str | None = None
        self.segment: list[tuple[Event, Fields]] = []
        self.paused = False
        self.recovery: StateRecovery | None = None  # reported by the first result

    @property
    def graph(self) -> ContextualGraph:
        return self.r._graph

    def state_of(self, event: Event) -> dict[str, JSON]:
        """The event as the graph takes it, with its trace context when traced."""
        return {**event.as_state(), **self.carriers.get(event.source_id, {})}

    async def start(self) -> None:
        # One read gives the rollback point and whether a person is awaited, and checks
        # the stored state against the schema (a bad one is recovered from before any
        # run: graph/recovery.py).
        checked = await load_checked_state(self.graph, self.workflow_id)
        snapshot, self.recovery = checked.snapshot, checked.recovery
        self.checkpoint_id = checked.checkpoint_id
        self.paused = bool(snapshot.interrupts)
        if not self.paused:
            await self._replay_parked()

    async def take(self, event: Event, fields: Fields) -> None:
        if event.control is None:
            if self.paused:
                await self._park(event, fields)
            else:
                self.segment.append((event, fields))
            return
        await self.flush()
        if event.control == "resume":
            result = await self._resume(event)
        else:
            result = await self._rollback(event)
        if not self.paused:
            # Parked events arrived before this control entry: their outputs go first.
            await self._replay_parked()
        self._hold(event, result)

    async def flush(self) -> None:
        if not self.segment:
            return
        segment, self.segment = self.segment, []
        run = await run_events(
            self.graph,
            self.workflow_id,
            [self.state_of(e) for e, _ in segment],
            base_checkpoint_id=self.checkpoint_id,
            durability=self.r._settings.durability,
            iteration_budget=self.r._budget,
        )
        self._absorb(run)
        for event, fields in segment:
            if event.event_id in run.results:
                self._hold(event, run.results[event.event_id])
            else:
                # After the pause point: the paused checkpoint's inbox still holds the
                # event (the resume run finishes it), and it is parked like any event
                # arriving while paused; its replay then finds its durable result.
                await self._park(event, fields)

    def _absorb(self, run: RunResult) -> None:
        self.checkpoint_id = run.checkpoint_id or self.checkpoint_id
        if run.interrupted:
            self.paused = True
            _log.info(
                "workflow paused for a person",
                workflow_id=self.workflow_id,
                event_id=run.paused_event_id,
            )
        if run.recovered_to:
            _log.warning(
                "state changed outside the graph; rolled back to the last good checkpoint",
                workflow_id=self.workflow_id,
                checkpoint_id=run.recovered_to,
            )

    def _hold(self, event: Event, result: Mapping[str, JSON]) -> None:
        self.results[event.event_id] = self._noted(result)
        self.held.append(event)

    def _noted(self, result: Mapping[str, JSON]) -> Mapping[str, JSON]:
        """The first result of the batch reports a recovery of the stored state."""
        if self.recovery is None:
            return result
        note, self.recovery = self.recovery.message(), None
        earlier = str(result.get("error") or "")
        return {**result, "error": f"{earlier}; {note}" if earlier else note}

    # -- control entries ------------------------------------------------------------

    def _control_result(
        self,
        event: Event,
        status: str,
        base: Mapping[str, JSON] | None = None,
        *,
        error: str | None = None,
    ) -> dict[str, JSON]:
        """A control entry's output; ``error`` says why it failed (``ctxd rollback`` and
        ``ctxd resume`` print it)."""
        result = {
            **event_result(
                self.workflow_id,
                event.event_id,
                event.source_id,
                status=status,
                route=[str(event.control)],
            ),
            **(base or {}),
        }
        result.update(event_id=event.event_id, source_id=event.source_id, status=status)
        if error is not None:
            result["error"] = error
        return result

    async def _resume(self, event: Event) -> dict[str, JSON]:
        earlier = await self._earlier_resume(event)
        if earlier is not None:  # a redelivered resume: the same answer again
            return earlier
        if not self.paused:
            _log.warning("resume for a workflow that is not paused", workflow_id=self.workflow_id)
            return self._control_result(
                event,
                "error",
                error=f"WorkflowError: workflow {self.workflow_id!r} is not paused: there is "
                "nothing to resume (resume answers an escalated output while "
                "CTXD_ESCALATION_PAUSES=true; see `ctxd state`)",
            )
        run = await resume_workflow(
            self.graph,
            self.workflow_id,
            event.value,
            control_event_id=event.event_id,
            durability=self.r._settings.durability,
            iteration_budget=self.r._budget,
        )
        self.paused = False
        self._absorb(run)
        resumed = next(iter(run.results.values()), {})
        return self._control_result(event, str(resumed.get("status", "ok")), resumed)

    async def _earlier_resume(self, event: Event) -> dict[str, JSON] | None:
        snapshot = await self.graph.aget_state(thread_config(self.workflow_id))
        values: Mapping[str, JSON] = snapshot.values or {}
        for record in reversed(as_objects(values.get("decisions"))):
            resolution = record.get("resolution")
            if isinstance(resolution, dict) and (
                resolution.get("control_event_id") == event.event_id
            ):
                outbox = as_object(values.get("outbox"))
                resumed = outbox_result(outbox, str(record.get("event_id"))) or {}
                return self._control_result(event, str(resumed.get("status", "ok")), resumed)
        return None

    async def _rollback(self, event: Event) -> dict[str, JSON]:
        try:
            forked = await fork_checkpoint(self.graph, self.workflow_id, str(event.checkpoint_id))
        except FencedError:
            raise  # not the rollback's fault: the partition's new owner redoes it
        except CtxdError as exc:
            _log.warning("rollback refused", workflow_id=self.workflow_id, error=str(exc))
            return self._control_result(event, "error", error=f"{type(exc).__name__}: {exc}")
        self.checkpoint_id = forked
        self.paused = await paused_event_id(self.graph, self.workflow_id) is not None
        _log.info(
            "workflow rolled back",
            workflow_id=self.workflow_id,
            to=event.checkpoint_id,
            checkpoint_id=forked,
        )
        return self._control_result(event, "ok")

    # -- parking ----------------------------------------------------------------------

    async def _park(self, event: Event, fields: Fields) -> None:
        settings = self.r._settings
        stream = parked_stream(settings, self.workflow_id)
        if settings.parked_maxlen and await self.r._redis.xlen(stream) >= settings.parked_maxlen:
            await self._park_refused(event, fields)
            return
        async with self.r._redis.pipeline(transaction=True) as pipe:
            trace = {
                f"{_TRACE_PREFIX}{name}": value
                for name, value in {
                    "trace_id": self.trace_ids.get(event.source_id, ""),
                    **self.carriers.get(event.source_id, {}),
                }.items()
                if value
            }
            pipe.xadd(
                parked_stream(settings, self.workflow_id),
                {**fields, **trace, "source_id": event.source_id},  # type: ignore[dict-item]
            )
            pipe.xack(self.ack.stream, settings.group, self.ack.entry_ids[event.source_id])
            await pipe.execute()
        self.handled.add(event.source_id)
        _log.info(
            "event parked while the workflow is paused",
            workflow_id=self.workflow_id,
            event_id=event.event_id,
            source_id=event.source_id,
        )

    def _output_stream(self) -> str:
        """The workflow's partition's output stream (``ctxd:out`` on a single node)."""
        settings = self.r._settings
        return output_stream_of(settings, workflow_partition(settings, self.workflow_id))

    async def _park_refused(self, event: Event, fields: Fields) -> None:
        """The parked stream is full (``CTXD_PARKED_MAXLEN``): the event goes to the DLQ
        with why, to be replayed once a person has resumed the workflow."""
        settings = self.r._settings
        await dead_letter(
            self.r._redis,
            dlq_stream=dlq_stream_of(settings, workflow_partition(settings, self.workflow_id)),
            input_stream=self.ack.stream,
            group=settings.group,
            source_id=self.ack.entry_ids[event.source_id],
            fields=fields,
            original_id=event.source_id,
            field_bytes=settings.dlq_field_bytes,
            max_fields=settings.max_fields,
            reason="parked_full",
            error=(
                f"workflow {self.workflow_id!r} is paused for a person and already holds "
                f"CTXD_PARKED_MAXLEN={settings.parked_maxlen} parked events; resume it "
                f"(`ctxd resume {self.workflow_id}`), then `ctxd dlq replay` this entry"
            ),
            attempts=1,
            lease=self.ack.lease,
        )
        self.handled.add(event.source_id)
        _log.warning(
            "parked stream full; event dead-lettered",
            workflow_id=self.workflow_id,
            event_id=event.event_id,
            source_id=event.source_id,
        )

    async def _commit_held(self) -> None:
        """Commit the results held for the ingress now, so a replay comes after them."""
        if not self.held:
            return
        items = [
            output_item(
                self.r._settings,
                self.workflow_id,
                e.event_id,
                self.ack.entry_ids[e.source_id],
                self.results.get(e.event_id),
                trace_id=self.trace_ids.get(e.source_id, ""),
                checkpoint_id=self.checkpoint_id or "",
            )
            for e in self.held
        ]
        await self.r._committer.commit(
            items,
            input_stream=self.ack.stream,
            output_stream=self._output_stream(),
            lease=self.ack.lease,
        )
        self.handled.update(e.source_id for e in self.held)
        self.held = []

    async def _replay_parked(self) -> None:
        settings = self.r._settings
        stream = parked_stream(settings, self.workflow_id)
        while not self.paused:
            entries = await self.r._redis.xrange(stream, count=1)
            if not entries:
                return
            await self._commit_held()
            entry_id, raw = entries[0]
            parked_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            fields = decode_fields(cast(dict[bytes, bytes], raw or {}))
            source_id = str(fields.pop("source_id", parked_id))
            # The parked event's own trace: its output and node spans stay in it.
            trace = {
                name.removeprefix(_TRACE_PREFIX): str(fields.pop(name))
                for name in [n for n in fields if n.startswith(_TRACE_PREFIX)]
            }
            if "trace_id" in trace:
                self.trace_ids[source_id] = trace.pop("trace_id")
            if trace:
                self.carriers[source_id] = trace
            try:
                event = parse_event(
                    source_id,
                    fields,
                    max_content_bytes=settings.max_content_bytes,
                    max_fields=settings.max_fields,
                    max_entry_bytes=settings.max_entry_bytes,
                )
            except InvalidEntryError as exc:  # limits lowered since it was parked, say
                await self._dead_letter_parked(parked_id, source_id, fields, exc)
                continue
            run = await run_events(
                self.graph,
                self.workflow_id,
                [self.state_of(event)],
                base_checkpoint_id=self.checkpoint_id,
                durability=settings.durability,
                iteration_budget=self.r._budget,
            )
            self._absorb(run)
            result = run.results.get(event.event_id)
            if result is not None:
                result = self._noted(result)
            # The one commit path, fenced like the batch's: the parked entry is deleted.
            item = output_item(
                settings,
                self.workflow_id,
                event.event_id,
                parked_id,
                result,
                trace_id=self.trace_ids.get(source_id, ""),
                checkpoint_id=self.checkpoint_id or "",
            )
            await self.r._committer.commit(
                [item],
                input_stream=stream,
                output_stream=self._output_stream(),
                lease=self.ack.lease,
                settle="delete",
            )
            _log.info(
                "parked event replayed",
                workflow_id=self.workflow_id,
                event_id=event.event_id,
                status=(result or {}).get("status"),
            )

    async def _dead_letter_parked(
        self, parked_id: str, source_id: str, fields: Fields, exc: InvalidEntryError
    ) -> None:
        """A parked entry that no longer validates goes to the DLQ instead of failing
        every later batch of its workflow (DLQ write and removal in one script)."""
        settings = self.r._settings
        await dead_letter(
            self.r._redis,
            dlq_stream=dlq_stream_of(settings, workflow_partition(settings, self.workflow_id)),
            input_stream=parked_stream(settings, self.workflow_id),
            group=settings.group,
            source_id=parked_id,
            original_id=source_id,
            fields=fields,
            reason=exc.reason,
            error=str(exc),
            attempts=1,
            field_bytes=settings.dlq_field_bytes,
            max_fields=settings.max_fields,
            lease=self.ack.lease,
            settle="delete",
        )
        _log.warning(
            "parked entry dead-lettered",
            workflow_id=self.workflow_id,
            source_id=source_id,
            reason=exc.reason,
            error=str(exc),
        )


def resume_fields(workflow_id: str, value: JSON, *, event_id: str | None = None) -> dict[str, str]:
    """The ``ctxd:in`` fields of a resume control entry (``ctxd resume``)."""
    fields = {"workflow_id": workflow_id, "control": "resume", "value": json.dumps(value)}
    if event_id:
        fields["event_id"] = event_id
    return fields


def rollback_fields(
    workflow_id: str, checkpoint_id: str, *, event_id: str | None = None
) -> dict[str, str]:
    """The ``ctxd:in`` fields of a rollback control entry (``ctxd rollback``)."""
    fields = {"workflow_id": workflow_id, "control": "rollback", "checkpoint_id": checkpoint_id}
    if event_id:
        fields["event_id"] = event_id
    return fields
