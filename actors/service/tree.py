"""The supervision tree of one process: the root, a supervisor per actor kind, workers.

::

    ctxd (root, one_for_one, intensity 3/period)
    ├── replies                      the mailbox's reply reader (when this process asks)
    ├── actor.analysis (one_for_one, intensity 5/period)
    │   ├── analysis.0 … analysis.N-1   workers (consumers instance:analysis:slot)
    │   └── analysis.reclaim            XAUTOCLAIM of dead consumers' requests
    ├── actor.update …
    ├── actor.monitoring …
    ├── actor.decision …
    └── ingress                      ``ctxd run`` only: leases, drain (actors/service/ingress.py)
        └── stream (one_for_one, intensity 5/period)
            └── scheduler, readers, ownership, router, retention

A kind's supervisor that exceeds its intensity escalates: the root restarts it; a root
that exceeds its own raises :class:`~actors.runtime.supervisor.SupervisorEscalation` out of
:meth:`ActorSystem.run`, and ``ctxd run``/``ctxd worker`` exit non-zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import anyio
import structlog
from anyio.abc import TaskStatus
from opentelemetry import trace
from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.mailbox import JSON, Mailbox
from actors.runtime.pool import ActorPool, DeadLetter, FaultHook, Liveness, RequestHandler
from actors.runtime.supervisor import ChildSpec, RestartEvent, Supervisor, SupervisorConfig
from actors.runtime.telemetry_hooks import actor_restarts
from actors.service.dispatch import ActorDispatch
from actors.service.gateway import dead_letter
from graph.work import WorkHandlers, WorkKind
from telemetry.metrics import Instruments

__all__ = [
    "ROOT_INTENSITY",
    "ActorSystem",
    "restart_config",
    "restart_reporter",
    "root_supervisor",
]

ROOT_INTENSITY = 3
"""Restarts of kind supervisors the root allows within the restart period."""

_log = structlog.get_logger("ctxd.supervision")


def restart_config(settings: Settings) -> SupervisorConfig:
    """The restart policy of the actor pools' and the ingress's supervisors
    (``CTXD_RESTART_INTENSITY``, ``CTXD_RESTART_PERIOD``, ``CTXD_RESTART_BACKOFF``)."""
    return SupervisorConfig(
        strategy="one_for_one",
        intensity=settings.restart_intensity,
        period=settings.restart_period,
        backoff_initial=settings.restart_backoff,
        backoff_max=max(settings.restart_backoff, 10.0),
    )


def root_supervisor(
    settings: Settings,
    children: Sequence[ChildSpec | Supervisor],
    *,
    clock: Callable[[], float] = time.monotonic,
    on_restart: Callable[[RestartEvent], None] | None = None,
) -> Supervisor:
    """The process's root, ``ctxd``: one_for_one over ``children``, at most
    :data:`ROOT_INTENSITY` restarts per restart period; beyond, it raises
    :class:`~actors.runtime.supervisor.SupervisorEscalation` and the process exits 1."""
    return Supervisor(
        "ctxd",
        children,
        SupervisorConfig(
            strategy="one_for_one",
            intensity=ROOT_INTENSITY,
            period=settings.restart_period,
            backoff_initial=settings.restart_backoff,
            backoff_max=max(settings.restart_backoff, 10.0),
        ),
        clock=clock,
        on_restart=on_restart,
    )


def restart_reporter(instruments: Instruments | None) -> Callable[[RestartEvent], None]:
    """What every supervisor of this process calls on a restart: one log line, and
    ``ctxd.actor.restarts`` when metrics are on."""
    count = actor_restarts(instruments) if instruments is not None else None

    def restarted(event: RestartEvent) -> None:
        _log.warning(
            "actor restarted",
            supervisor=event.supervisor,
            child=event.child,
            error_type=event.error_type,
            restarts=event.restart_count,
            backoff=round(event.backoff, 3),
        )
        if count is not None:
            count(event)

    return restarted


class ActorSystem:
    """The actors this process runs, and (optionally) the dispatch that asks them.

    Args:
        redis: the client (bytes replies).
        settings: worker counts, timeouts, restart and breaker settings.
        handlers: the work the workers run.
        serve: the kinds whose workers run here (all by default; none for a pure asker).
        ask: whether this process asks (a mailbox reply reader and an
            :class:`~actors.service.dispatch.ActorDispatch`).
        clock: monotonic clock of breakers and supervisors (inject one in tests).
        tracer: for spans; the global one by default.
        instruments: metrics (``ctxd.actor.restarts``, breaker state), if any.
        fault: test seam passed to every pool.
        availability: the process's Redis monitor, shared by every loop here (one is
            made if None): an outage is waited out, never counted as a crash.
        on_restart: told of each restart (default: :func:`restart_reporter`).
        liveness: which processes are alive, so the pools take over a dead one's
            pending requests at once (:func:`actors.service.heartbeat.process_liveness`).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        handlers: WorkHandlers,
        *,
        serve: Iterable[WorkKind] = tuple(WorkKind),
        ask: bool = True,
        clock: Callable[[], float] = time.monotonic,
        tracer: Tracer | None = None,
        instruments: Instruments | None = None,
        fault: FaultHook | None = None,
        availability: RedisAvailability | None = None,
        on_restart: Callable[[RestartEvent], None] | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        tracer = tracer or trace.get_tracer("ctxd.actors")
        self.availability = availability or RedisAvailability.for_settings(redis, settings)
        """The Redis monitor every loop of this tree reports outages to."""
        self._restarted = on_restart or restart_reporter(instruments)
        self.mailbox = (
            Mailbox(redis, settings, tracer=tracer, availability=self.availability) if ask else None
        )
        self.dispatch = (
            ActorDispatch(
                self.mailbox,
                settings,
                clock=clock,
                tracer=tracer,
                instruments=instruments,
                availability=self.availability,
            )
            if self.mailbox is not None
            else None
        )
        self.pools = {
            kind: ActorPool(
                redis,
                settings,
                kind.value,
                _handler(handlers, kind),
                dead_letter=_dead_letter(redis, settings),
                tracer=tracer,
                fault=fault,
                availability=self.availability,
                liveness=liveness,
            )
            for kind in serve
        }
        kind_config = restart_config(settings)
        self.supervisors = {
            kind: pool.supervisor(kind_config, on_restart=self._restarted, clock=clock)
            for kind, pool in self.pools.items()
        }
        """The one_for_one supervisor of each kind served here."""
        children: list[ChildSpec | Supervisor] = []
        if self.mailbox is not None:
            children.append(ChildSpec("replies", self._reply_reader))
        children += self.supervisors.values()
        self.children: tuple[ChildSpec | Supervisor, ...] = tuple(children)
        """The root's children: the reply reader and the kinds' supervisors."""
        self.root = root_supervisor(settings, children, clock=clock, on_restart=self._restarted)
        """The root of this tree when it runs alone (``ctxd worker``, tests); ``ctxd
        run`` puts :attr:`children` under its own root, beside the ingress."""

    def status(self) -> dict[str, object]:
        """Breaker states and pool supervision figures, for the heartbeat (``ctxd status``)."""
        pools: dict[str, object] = {}
        for kind, supervisor in self.supervisors.items():
            stats = supervisor.statistics()
            pools[str(kind)] = {
                "running": len(stats.running),
                "restarts": sum(stats.restarts.values()),
            }
        breakers = dict(self.dispatch.health().breaker_states) if self.dispatch is not None else {}
        return {"breakers": breakers, "pools": pools}

    async def _reply_reader(self, task_status: TaskStatus[None]) -> None:
        assert self.mailbox is not None
        await self.mailbox.run(task_status=task_status)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the tree, then supervise it until cancelled.

        Raises:
            SupervisorEscalation: the root gave up (restart intensity exceeded).
        """
        await self.root.run(task_status=task_status)


def _handler(handlers: WorkHandlers, kind: WorkKind) -> RequestHandler:
    """The pool's handler of ``kind``: a payload that is no JSON object is a failed request."""

    async def handle(payload: JSON) -> dict[str, JSON]:
        if not isinstance(payload, Mapping):
            raise TypeError(f"a {kind.value} request's payload must be a JSON object")
        return await handlers.handle(kind, payload)

    return handle


def _dead_letter(redis: Redis, settings: Settings) -> DeadLetter:
    """The pools' dead-letter writer: the service's DLQ entry, bounded as settings say."""

    async def write(
        *,
        stream: str,
        source_id: str,
        fields: Mapping[str, str],
        reason: str,
        error: str,
        attempts: int,
    ) -> None:
        await dead_letter(
            redis,
            dlq_stream=settings.dlq_stream,
            input_stream=stream,
            group=settings.group,
            source_id=source_id,
            fields=fields,
            reason=reason,
            error=error,
            attempts=attempts,
            field_bytes=settings.dlq_field_bytes,
            max_fields=settings.max_fields,
        )

    return write
