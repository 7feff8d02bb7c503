"""The daemon: wires settings, Redis, checkpointer, workflow and ingress, and runs them.

It is the root of the supervision tree: it runs until SIGTERM or SIGINT, then stops
reading, lets in-flight work finish within the drain budget (the rest stays pending for
another instance), flushes telemetry and returns. A fatal error propagates, and the
command line turns it into a non-zero exit so systemd or Docker restarts the service.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.config import Settings
from actors.ingress import Ingress
from actors.lease import fence_checkpoints
from actors.stream_metrics import poll_stream_gauges
from actors.supervisor import SupervisorEscalation
from actors.tree import ActorSystem
from graph.analysis import load_analyzer
from graph.checkpointer import open_checkpointer
from graph.features import AnalyzerPolicy
from graph.routing import RoutingConfig
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
    return WorkHandlers(
        load_analyzer(settings.analyzer), RoutingConfig.from_mapping(settings.routing)
    )


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
    policy = AnalyzerPolicy.from_mapping(settings.analyzer_policy)
    redis = Redis.from_url(  # reconnects with backoff when Redis restarts
        redis_url,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), 6),
        retry_on_error=[BusyLoadingError, RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
    )
    try:
        async with open_checkpointer(
            settings.checkpointer,
            namespace=settings.stream_prefix,
            redis_url=redis_url,
            postgres_url=settings.postgres_url,
        ) as saver:
            fence = _Fence()
            actors = (
                ActorSystem(
                    redis,
                    settings,
                    handlers,
                    tracer=graph_telemetry.tracer,
                    instruments=graph_telemetry.instruments,
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
            ingress = Ingress(
                redis,
                settings,
                graph,
                reading_allowed=dispatch.reading_allowed if dispatch is not None else None,
                instruments=graph_telemetry.instruments,
                tracer=graph_telemetry.tracer,
            )
            fence.ingress = ingress
            if actors is not None:
                ingress.extra_stats = actors.status
            async with _escalations_unwrapped(), anyio.create_task_group() as tg:
                if actors is not None:
                    await tg.start(actors.run)
                await tg.start(_stop_on_signal, ingress, tg.cancel_scope, drain_budget)
                await tg.start(ingress.run)
                if telemetry is not None and _exports_metrics(telemetry.settings):
                    interval = min(max(telemetry.settings.metric_export_interval, 0.2), 15.0)
                    streams = [
                        settings.input_stream,
                        *(settings.key("actor", kind.value) for kind in WorkKind),
                    ]
                    await tg.start(
                        poll_stream_gauges, redis, streams, telemetry.instruments, interval
                    )
                _log.info(
                    "ctxd is running",
                    redis=redact_url(redis_url),
                    input=settings.input_stream,
                    group=settings.group,
                    consumer=ingress.consumer,
                    checkpointer=settings.checkpointer,
                )
                if on_ready is not None:
                    tg.start_soon(on_ready)
                await _wait_for_ingress_end(ingress)
                tg.cancel_scope.cancel()
            stats = ingress.statistics()
            _log.info("ctxd stopped", processed=stats.processed, dead_lettered=stats.dead_lettered)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def _escalations_unwrapped() -> AsyncIterator[None]:
    """Let the root supervisor's escalation out of the task group as itself."""
    try:
        yield
    except ExceptionGroup as group:
        matched, _ = group.split(SupervisorEscalation)
        if matched is None:
            raise
        escalation = matched.exceptions[0]
        while isinstance(escalation, ExceptionGroup):
            escalation = escalation.exceptions[0]
        _log.error("the supervision tree gave up; exiting", error=str(escalation))
        raise escalation from None


def _exports_metrics(settings: TelemetrySettings) -> bool:
    return not settings.disabled and settings.metrics.exporter != "none"


class _Fence:
    """Checkpoint writes go through the ingress's partition-lease check."""

    ingress: Ingress | None = None

    async def check(self, workflow_id: str) -> None:
        if self.ingress is not None:
            await self.ingress.check_fence(workflow_id)


async def _wait_for_ingress_end(ingress: Ingress) -> None:
    await ingress.stopped.wait()


async def _stop_on_signal(
    ingress: Ingress,
    scope: anyio.CancelScope,
    drain_budget: float,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            _log.info("stopping: no new reads, draining in-flight work", signal=signum.name)
            ingress.stop()
            break
        with anyio.move_on_after(drain_budget):
            await ingress.stopped.wait()
            return
        _log.warning("drain budget exceeded; the rest stays pending", seconds=drain_budget)
        scope.cancel()
