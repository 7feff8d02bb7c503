"""The ingress: partitions of ``ctxd:in`` → the contextual workflow → ``ctxd:out``.

Every instance runs the same pieces (see docs/design.md, "Partitions and leases"), each a
supervised child of the ``stream`` supervisor this facade runs (one_for_one, with the
restart intensity, period and backoff of the actor pools, ``CTXD_RESTART_*``):

- ``router`` (actors/service/router.py): moves the ``ctxd:in`` entries of the partitions
  this instance owns into their partition streams (invalid ones, partition 0's, to the
  DLQ), each partition from its own cursor — every instance routes, none alone;
- ``ownership`` (actors/service/ownership.py): heartbeats, balanced assignment of
  partitions to the live instances, acquiring / renewing / releasing partition leases;
- ``readers`` (actors/service/reader.py): one fenced reader per owned partition (pending
  entries of a previous owner first, then new ones), feeding the scheduler;
- ``scheduler`` (actors/service/scheduler.py): admission (DLQ, poison,
  ``CTXD_MULTITASK``), per-workflow queues and one drain task per active workflow, each
  batch run and committed by the runner (actors/service/batches.py);
- ``retention``: the idle-workflow sweep (actors/service/retention.py).

Entries are acknowledged only after the run's checkpoint and the outputs are durable.
Redis outages are waited out inside each loop, never counted as a restart. A crash of a
child restarts that child; a supervisor beyond its intensity escalates to the root (the
daemon's), which restarts the whole ingress or, beyond its own, exits non-zero.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus
from opentelemetry import trace
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.supervisor import (
    ChildSpec,
    RestartEvent,
    Supervisor,
    SupervisorEscalation,
)
from actors.service.batches import BatchProcessor
from actors.service.heartbeat import Heartbeat
from actors.service.lease import Leases
from actors.service.ownership import Ownership
from actors.service.partitions import OWNER_CONSUMER
from actors.service.reader import PartitionReaders, ReadHook
from actors.service.router import PartitionRouter
from actors.service.scheduler import Scheduler
from actors.service.tree import restart_config
from graph.workflow import ContextualGraph
from telemetry.metrics import Instruments

__all__ = ["Ingress", "IngressStatistics"]

_tracer = trace.get_tracer("ctxd.ingress")

_LEAVE_BUDGET = 3.0
"""Seconds releasing the leases and the heartbeat may take when the ingress ends."""


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
        router: whether this instance routes any partition's entries of ctxd:in now.
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
        on_restart: told of every restart of the ingress's children (log, metric).
        clock: monotonic clock of the supervisor's intensity window (tests inject one).
        read_hook: test seam of the partition readers (:data:`~actors.service.reader.ReadHook`).
        on_partition_acquired: awaited with ``(lease key, lease value)`` when this
            instance takes a partition, before reading it (a separate checkpoint store's
            fencing-token floor, :class:`~actors.service.checkpoint_floor.CheckpointFloor`).
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
        on_restart: Callable[[RestartEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_hook: ReadHook | None = None,
        on_partition_acquired: Callable[[str, str], Awaitable[object]] | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._availability = availability or RedisAvailability.for_settings(redis, settings)
        allowed = reading_allowed or (lambda: True)
        self._on_restart = on_restart
        self._clock = clock
        metric_attributes = {
            "messaging.system": "redis",
            "messaging.destination.name": settings.input_stream,
            "messaging.consumer.group.name": settings.group,
        }
        self._stopping = anyio.Event()
        self.stopped = anyio.Event()
        """Set when :meth:`run` has returned after :meth:`stop`: nothing is in flight."""
        leases = Leases(redis, settings.instance, settings.lease_ttl)
        self._router = PartitionRouter(
            redis,
            settings,
            lambda: self._ownership.readable(),
            on_fenced=lambda n, value: self._ownership.drop(n, value),
            reading_allowed=allowed,
            availability=self._availability,
        )
        self._runner = BatchProcessor(
            redis,
            settings,
            graph,
            consumer=OWNER_CONSUMER,
            instruments=instruments,
            metric_attributes=metric_attributes,
            tracer=tracer or _tracer,
            availability=self._availability,
        )
        self._scheduler = Scheduler(
            redis,
            settings,
            self._runner,
            lease_of=lambda n: self._ownership.value(n),
            reading_allowed=allowed,
            availability=self._availability,
            stopping=self._stopping,
            instruments=instruments,
            metric_attributes=metric_attributes,
            on_restart=lambda: self._readers.changed(),
        )
        self._ownership = Ownership(
            redis,
            settings,
            leases,
            Heartbeat(redis, settings),
            self._scheduler,
            availability=self._availability,
            stopping=self._stopping,
            report=self._heartbeat_report,
            on_change=lambda: self._readers.changed(),
            on_acquire=on_partition_acquired,
        )
        self._readers = PartitionReaders(
            redis,
            settings,
            self._ownership,
            self._scheduler,
            reading_allowed=allowed,
            availability=self._availability,
            stopping=self._stopping,
            hook=read_hook,
        )
        self.supervisor: Supervisor | None = None
        """The ``stream`` supervisor of the current (or last) run, for its statistics."""
        self.extra_stats: Callable[[], Mapping[str, object]] = dict
        """Called at each heartbeat; what it returns is published as is (the actor
        pools' breaker states, say)."""

    @property
    def consumer(self) -> str:
        """This instance's consumer name on the partition streams."""
        return OWNER_CONSUMER

    def statistics(self) -> IngressStatistics:
        """A snapshot of the counters."""
        counts = self._scheduler.counts()
        return IngressStatistics(
            processed=counts.processed,
            duplicates=counts.duplicates,
            dead_lettered=counts.dead_lettered + self._router.dead_lettered,
            failed_runs=counts.failed_runs,
            in_flight=self._scheduler.in_flight,
            active_workflows=len(self._scheduler.workflows),
            interrupted=counts.interrupted,
            partitions=tuple(sorted(self._ownership.owned)),
            router=self._router.active,
        )

    def stop(self) -> None:
        """Stop reading; running batches finish, queued events stay pending for others."""
        self._stopping.set()
        self._scheduler.stop()
        self._readers.changed()

    def as_child(self, *, shutdown: float = _LEAVE_BUDGET + 7.0) -> ChildSpec:
        """The ingress as a child of the root supervisor: a crash (its ``stream``
        supervisor gave up) is restarted by the root; after :meth:`stop` it ends."""

        async def start(task_status: TaskStatus[None]) -> None:
            await self.run(task_status=task_status)

        return ChildSpec("ingress", start, restart="transient", shutdown=shutdown)

    def children(self) -> list[ChildSpec]:
        """The ingress's loops, in start order, each ending only once it is stopped."""

        async def retention(task_status: TaskStatus[None]) -> None:
            task_status.started()
            sweep = self._runner.retention.sweep
            await sweep(self._stopping, self._ownership.owned, self._scheduler.workflows)

        async def router(task_status: TaskStatus[None]) -> None:
            task_status.started()
            await self._router.run(self._stopping)

        def spec(name: str, start: Callable[[TaskStatus[None]], Awaitable[None]]) -> ChildSpec:
            return ChildSpec(name, start, restart="transient")

        return [
            spec("scheduler", lambda ts: self._scheduler.run(task_status=ts)),
            spec("readers", lambda ts: self._readers.run(task_status=ts)),
            spec("ownership", lambda ts: self._ownership.run(task_status=ts)),
            spec("router", router),
            spec("retention", retention),
        ]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Route, own, read, process and commit until :meth:`stop` is called.

        Raises:
            SupervisorEscalation: the ``stream`` supervisor exceeded its intensity.
        """
        s = self._settings
        tree = self.supervisor = Supervisor(
            "stream",
            self.children(),
            restart_config(s),
            clock=self._clock,
            on_restart=self._on_restart,
        )
        escalation: SupervisorEscalation | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def supervise(*, task_status: TaskStatus[None]) -> None:
                    nonlocal escalation
                    try:
                        await tree.run(task_status=task_status)
                    except SupervisorEscalation as exc:
                        escalation = exc
                        tg.cancel_scope.cancel()

                await tg.start(supervise)
                task_status.started()
                await self._stopping.wait()
                while self._scheduler.busy:  # let in-flight batches finish
                    await self._scheduler.wait_for_room()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(_LEAVE_BUDGET):
                await self._ownership.leave()
            if self._stopping.is_set():
                self.stopped.set()
        if escalation is not None:
            raise escalation

    def _heartbeat_report(self) -> dict[str, object]:
        stats = self.statistics()
        return {
            "router": stats.router,
            "processed": stats.processed,
            "duplicates": stats.duplicates,
            "dead_lettered": stats.dead_lettered,
            "failed_runs": stats.failed_runs,
            "interrupted": stats.interrupted,
            "in_flight": stats.in_flight,
            "active_workflows": stats.active_workflows,
            "multitask": self._settings.multitask,
            "partition_count": self._settings.partitions,
            "redis": self._availability.statistics().as_dict(),
            **self.extra_stats(),
        }
