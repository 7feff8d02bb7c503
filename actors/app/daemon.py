"""The daemon: wires settings, Redis, checkpointer, workflow and ingress, and runs them.

It runs the root of the supervision tree (actors/service/tree.py): the actor pools'
supervisors and the ingress with its own supervised loops (router, ownership, readers,
scheduler, retention) are its children. It runs until SIGTERM or SIGINT, then stops
reading, lets in-flight work finish within the drain budget (the rest stays pending for
another instance), flushes telemetry and returns. A fatal error propagates, and the
command line turns it into a non-zero exit so systemd or Docker restarts the service.

Redis being away is not fatal: start-up waits for it (the checkpointer's open
included) and every loop waits out outages through one
:class:`~actors.runtime.availability.RedisAvailability`, unless ``CTXD_REDIS_MAX_OUTAGE`` says
to exit after so long. A stop signal during start-up or an outage still stops the
process within the drain budget.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
import structlog
from langgraph.checkpoint.base import BaseCheckpointSaver
from redis.asyncio import Redis
from redis.exceptions import RedisError

from actors.app.checkpoint_store import CheckpointStore, checkpoint_store
from actors.app.redis_acl import check_redis_for_service
from actors.config import Settings, split_cluster_option
from actors.runtime.availability import (
    RedisAvailability,
    RedisOutageError,
    is_outage,
    quiet_library_outage_logs,
)
from actors.runtime.redis_errors import describe_redis_error
from actors.runtime.supervisor import SupervisorEscalation
from actors.service.checkpoint_floor import CheckpointFloor, floor_fenced_pointer_writer
from actors.service.connections import cluster_enabled, open_service_client, pool_size
from actors.service.heartbeat import process_liveness
from actors.service.ingress import Ingress
from actors.service.lease import CheckpointFence, fence_checkpoints, fenced_pointer_writer
from actors.service.partition_record import (
    PartitionCountChanged,
    PartitionRecord,
    check_partition_count,
    watch_partition_count,
)
from actors.service.stream_metrics import poll_stream_gauges
from actors.service.tree import ActorSystem, restart_reporter, root_supervisor
from graph.analysis import load_analyzer
from graph.checkpointer import open_checkpointer
from graph.tracing import GraphTelemetry
from graph.work import LocalDispatch, WorkHandlers, WorkKind
from graph.workflow import build_contextual_workflow
from telemetry.logging import redact_url
from telemetry.settings import TelemetrySettings
from telemetry.setup import Telemetry

__all__ = ["DRAIN_BUDGET", "serve"]

DRAIN_BUDGET = 20.0  # seconds; deploy/ctxd.service's TimeoutStopSec leaves room above it

_log = structlog.get_logger("ctxd.daemon")


def build_handlers(settings: Settings) -> WorkHandlers:
    """The work handlers for this configuration (analysis plug-in, routing numbers)."""
    return WorkHandlers(load_analyzer(settings.analyzer), settings.routing)


async def serve(
    settings: Settings,
    redis_url: str,
    *,
    on_ready: Callable[[], Coroutine[Any, Any, None]] | None = None,
    drain_budget: float | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Run the service until SIGTERM/SIGINT.

    Args:
        settings: validated settings.
        redis_url: the Redis to use (configured, or the embedded one).
        on_ready: awaited once the ingress reads (the demo feeds events from here).
        drain_budget: seconds in-flight work gets to finish after a stop signal
            (default: ``CTXD_DRAIN_BUDGET``).
        telemetry: tracer, meter and instruments (the caller opens and closes them);
            the global tracer and no metrics if None.
    """
    drain_budget = settings.drain_budget if drain_budget is None else drain_budget
    graph_telemetry = (
        GraphTelemetry(telemetry.tracer, telemetry.instruments)
        if telemetry is not None
        else GraphTelemetry.from_global()
    )
    handlers = build_handlers(settings)
    policy = settings.analyzer_policy
    kinds = tuple(WorkKind) if settings.dispatch == "actors" else ()
    connections = pool_size(settings, ingress=True, kinds=kinds)
    quiet_library_outage_logs()
    stopper = _Stopper(drain_budget)
    changed: list[PartitionRecord] = []  # the count recorded in Redis changed while running
    async with (
        _escalations_unwrapped(),
        anyio.create_task_group() as guard,
        contextlib.AsyncExitStack() as stack,
    ):
        redis_url, stated = split_cluster_option(redis_url)
        settings = replace(settings, cluster=bool(stated))
        redis = open_service_client(redis_url, settings, connections)
        stack.push_async_callback(redis.aclose)
        availability = RedisAvailability.for_settings(redis, settings)
        await guard.start(availability.watch)
        await guard.start(stopper.run, guard.cancel_scope)
        # Start-up waits for Redis (one line when it is away, one when it is back).
        await availability.call(redis.ping)
        # A Redis Cluster or one server: every key layout below reads settings.cluster.
        if stated is None and await availability.call(lambda: cluster_enabled(redis)):
            settings = replace(settings, cluster=True)
            redis = open_service_client(redis_url, settings, connections)
            stack.push_async_callback(redis.aclose)
            availability.probe_with(redis)
        # A cluster as the default checkpoint store is refused before anything starts.
        store = checkpoint_store(settings, redis_url) if settings.checkpointer == "redis" else None
        store_client = None
        if store is not None and store.separate:  # a standalone server, its own pool
            single = replace(settings, cluster=False)
            store_client = open_service_client(store.url, single, connections)
            stack.push_async_callback(store_client.aclose)
            # A separate checkpoint store being away is an outage like the service
            # Redis's: no run can write its state, so reading pauses until both answer.
            availability.watch_also(store_client)
            try:
                await availability.call(store_client.ping)
            except RedisError as exc:  # not an outage: the line names the store, not Redis
                raise describe_redis_error(exc, store.url, setting=store.setting) from None
        # Credentials, TLS, modules, ACL: one classified line, before any work.
        await check_redis_for_service(
            redis_url,
            settings.stream_prefix,
            modules=store is not None and not store.separate,
        )
        if store is not None and store.separate:
            await check_redis_for_service(
                store.url,
                settings.stream_prefix,
                modules=True,
                access=False,
                url_setting=store.setting,
            )
        # The partition count recorded in Redis: the first instance records its own; one
        # configured otherwise stops here with one line.
        record = await availability.call(
            lambda: check_partition_count(
                redis, settings, poll=settings.lease_ttl / 3, on_wait=_tell_resize_wait
            )
        )
        saver = await _open_checkpointer(
            stack, settings, store, store_client or redis, availability
        )
        floor = CheckpointFloor(store_client, settings) if store_client is not None else None
        fence = CheckpointFence(redis, settings)
        actors = (
            ActorSystem(
                redis,
                settings,
                handlers,
                tracer=graph_telemetry.tracer,
                instruments=graph_telemetry.instruments,
                availability=availability,
                liveness=process_liveness(redis, settings),
            )
            if settings.dispatch == "actors"
            else None
        )
        dispatch = actors.dispatch if actors is not None else None
        graph = build_contextual_workflow(
            dispatch or LocalDispatch(handlers),
            fence_checkpoints(saver, fence.check),
            policy=policy,
            escalation_pauses=settings.escalation_pauses,
            telemetry=graph_telemetry,
        )
        on_restart = restart_reporter(graph_telemetry.instruments)
        ingress = Ingress(
            redis,
            settings,
            graph,
            reading_allowed=dispatch.reading_allowed if dispatch is not None else None,
            instruments=graph_telemetry.instruments,
            tracer=graph_telemetry.tracer,
            availability=availability,
            on_restart=on_restart,
            on_partition_acquired=floor.raise_to if floor is not None else None,
        )
        if actors is not None:
            ingress.extra_stats = actors.status
        root = root_supervisor(
            settings,
            [*(actors.children if actors is not None else ()), ingress.as_child()],
            on_restart=on_restart,
        )

        async def leave_on_count_change() -> None:
            new = await watch_partition_count(
                redis, settings, availability, poll=settings.lease_ttl / 3
            )
            changed.append(new)
            ingress.stop()  # the old partitions are finished: nothing is in flight

        async with anyio.create_task_group() as tg:
            stopper.ingress = ingress
            await tg.start(root.run)
            tg.start_soon(leave_on_count_change)
            if telemetry is not None and _exports_metrics(telemetry.settings):
                interval = min(max(telemetry.settings.metric_export_interval, 0.2), 15.0)
                streams = [  # ctxd:in for other consumers' groups (ctxd's own: cursors)
                    settings.input_stream,
                    *(settings.key("actor", kind.value) for kind in WorkKind),
                ]
                await tg.start(
                    partial(
                        poll_stream_gauges,
                        redis,
                        streams,
                        telemetry.instruments,
                        interval,
                        settings=settings,
                    )
                )
            _log.info(
                "ctxd is running",
                redis=redact_url(redis_url),
                input=settings.input_stream,
                group=settings.group,
                consumer=ingress.consumer,
                checkpointer=settings.checkpointer,
                checkpoint_store=(
                    redact_url(store.url) if store is not None and store.separate else None
                ),
                redis_connections=connections,
                max_outage=settings.redis_max_outage or "forever",
                partitions=settings.partitions,
                partition_epoch=record.epoch,
            )
            if on_ready is not None:
                tg.start_soon(on_ready)
            await _wait_for_ingress_end(ingress)
            tg.cancel_scope.cancel()
        stats = ingress.statistics()
        _log.info("ctxd stopped", processed=stats.processed, dead_lettered=stats.dead_lettered)
        guard.cancel_scope.cancel()  # the outage watch and the signal receiver
    if changed:
        new = changed[0]
        raise PartitionCountChanged(
            f"the partition count changed to {new.count} (epoch {new.epoch}) while this "
            f"instance ran with CTXD_PARTITIONS={settings.partitions}: it stopped; start "
            f"it again with CTXD_PARTITIONS={new.count}"
        )


async def _open_checkpointer(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    store: CheckpointStore | None,
    client: Redis,
    availability: RedisAvailability,
) -> BaseCheckpointSaver[str]:
    """Open the checkpointer on ``stack``, waiting out outages (any other error is fatal).

    The Redis saver shares ``client``'s pool, sized for both: the service's, or a separate
    store's. It moves a workflow's latest-checkpoint pointer only under the run's
    partition lease: checked in the same script in the service Redis, or against the
    lease's fencing-token floor in a separate store (:mod:`actors.service.checkpoint_floor`).
    """
    if store is not None and store.separate:
        writer = floor_fenced_pointer_writer(CheckpointFence.current, settings)
    else:
        writer = fenced_pointer_writer(CheckpointFence.current)
    while True:
        await availability.wait_available()
        try:
            return await stack.enter_async_context(
                open_checkpointer(
                    settings.checkpointer,
                    namespace=settings.stream_prefix,
                    redis_url=store.url if store is not None else None,
                    postgres_url=settings.postgres_url,
                    redis_client=client,
                    pointer_writer=writer,
                    url_setting=store.setting if store is not None else "CTXD_REDIS_URL",
                )
            )
        except Exception as exc:
            if not is_outage(exc):
                raise
            availability.report(exc)


@contextlib.asynccontextmanager
async def _escalations_unwrapped() -> AsyncIterator[None]:
    """Let the root supervisor's escalation (or an outage past its limit) out of the
    task groups as itself."""
    try:
        yield
    except ExceptionGroup as group:
        matched, _ = group.split((SupervisorEscalation, RedisOutageError))
        if matched is None:
            leaves = _leaves(group)
            if len(leaves) == 1:  # one fatal error (start-up, say): the CLI's one line
                raise leaves[0] from None
            raise
        fatal: Exception = matched.exceptions[0]
        while isinstance(fatal, ExceptionGroup):
            fatal = fatal.exceptions[0]
        if isinstance(fatal, SupervisorEscalation):
            _log.error("the supervision tree gave up; exiting", error=str(fatal))
        raise fatal from None


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc)
        else:
            found.append(exc)
    return found


def _tell_resize_wait(record: PartitionRecord) -> None:
    _log.warning(
        "waiting for the partition count change to finish before starting",
        recorded=record.describe(),
    )


def _exports_metrics(settings: TelemetrySettings) -> bool:
    return not settings.disabled and settings.metrics.exporter != "none"


async def _wait_for_ingress_end(ingress: Ingress) -> None:
    await ingress.stopped.wait()


class _Stopper:
    """SIGTERM/SIGINT: stop reading and drain, or, before the ingress runs (start-up
    waiting for Redis), stop at once."""

    def __init__(self, drain_budget: float) -> None:
        self.drain_budget = drain_budget
        self.ingress: Ingress | None = None

    async def run(
        self,
        scope: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                _log.info("stopping: no new reads, draining in-flight work", signal=signum.name)
                break
        ingress = self.ingress
        if ingress is None:
            scope.cancel()  # still starting: nothing in flight
            return
        ingress.stop()
        with anyio.move_on_after(self.drain_budget):
            await ingress.stopped.wait()
            return
        _log.warning("drain budget exceeded; the rest stays pending", seconds=self.drain_budget)
        scope.cancel()
