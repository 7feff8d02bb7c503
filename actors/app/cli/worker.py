"""``ctxd worker``: a process that serves actors only (no ingress), to scale out."""

from __future__ import annotations

import argparse
import contextlib
import signal
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio
import structlog

from actors.app.cli.common import Subcommands, open_service_telemetry, redis_url_for_client
from actors.config import Settings
from graph.errors import ConfigError
from graph.work import WorkKind
from telemetry.setup import Telemetry

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from actors.runtime.availability import RedisAvailability

__all__ = ["register"]

_log = structlog.get_logger("ctxd.worker")


def register(commands: Subcommands) -> None:
    """Add ``worker`` to the command line."""
    worker = commands.add_parser(
        "worker",
        help="serve actor kinds only (joins the same consumer groups as `ctxd run`)",
        description="Run actor workers for the given kinds on the mailbox streams "
        "ctxd:actor:{kind}, sharing the work with every other ctxd process of the same "
        "prefix and group. Stops on SIGTERM/SIGINT; exits non-zero when its supervision "
        "tree gives up.",
    )
    worker.add_argument(
        "--kinds",
        default=",".join(k.value for k in WorkKind),
        help="comma-separated actor kinds to serve (default: all of "
        f"{', '.join(k.value for k in WorkKind)})",
    )
    worker.set_defaults(handler=_worker)


def parse_kinds(raw: str) -> tuple[WorkKind, ...]:
    """``analysis,decision`` → the kinds; a clear error for unknown names."""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    known = {k.value: k for k in WorkKind}
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ConfigError(
            f"--kinds {raw!r}: unknown or no actor kinds {unknown}; use any of {', '.join(known)}"
        )
    return tuple(dict.fromkeys(known[n] for n in names))


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    kinds = parse_kinds(args.kinds)
    url = redis_url_for_client(settings)
    with open_service_telemetry(settings) as telemetry:
        anyio.run(_serve, settings, url, kinds, telemetry)
    return 0


async def _serve(
    settings: Settings, redis_url: str, kinds: tuple[WorkKind, ...], telemetry: Telemetry
) -> None:
    from actors.app.daemon import build_handlers
    from actors.app.redis_acl import check_redis_for_service
    from actors.config import split_cluster_option
    from actors.runtime.availability import RedisAvailability, RedisOutageError
    from actors.service.connections import cluster_enabled, open_service_client, pool_size
    from actors.service.heartbeat import process_liveness
    from actors.service.tree import ActorSystem

    connections = pool_size(settings, ingress=False, kinds=kinds)
    redis_url, stated = split_cluster_option(redis_url)
    settings = replace(settings, cluster=bool(stated))
    clients = [open_service_client(redis_url, settings, connections)]
    availability = RedisAvailability.for_settings(clients[0], settings)
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

                async def start() -> None:
                    await tg.start(availability.watch)
                    redis = clients[0]
                    await availability.call(redis.ping)  # start-up waits for Redis
                    serving = settings
                    if stated is None and await availability.call(lambda: cluster_enabled(redis)):
                        serving = replace(settings, cluster=True)
                        redis = open_service_client(redis_url, serving, connections)
                        clients.append(redis)
                        availability.probe_with(redis)
                    # Credentials, TLS and ACL: one classified line, before any work.
                    await check_redis_for_service(redis_url, settings.stream_prefix, modules=False)
                    system = ActorSystem(
                        redis,
                        serving,
                        build_handlers(serving),
                        serve=kinds,
                        ask=False,
                        tracer=telemetry.tracer,
                        instruments=telemetry.instruments,
                        availability=availability,
                        liveness=process_liveness(redis, serving),
                    )
                    await tg.start(system.run)
                    tg.start_soon(_beat, redis, serving, kinds, availability)
                    _log.info(
                        "ctxd is running",
                        role="worker",
                        kinds=[k.value for k in kinds],
                        instance=settings.instance,
                        redis_connections=connections,
                    )

                tg.start_soon(start)
                async for signum in signals:
                    _log.info("stopping the workers", signal=signum.name)
                    break
                tg.cancel_scope.cancel()
    except ExceptionGroup as group:
        from actors.runtime.supervisor import SupervisorEscalation

        outage, _ = group.split(RedisOutageError)
        if outage is not None:
            cause: BaseException = outage
            while isinstance(cause, BaseExceptionGroup):
                cause = cause.exceptions[0]
            raise cause from None
        matched, _ = group.split(SupervisorEscalation)
        if matched is None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        _log.error("the supervision tree gave up; exiting", error=str(first))
        raise first from None
    finally:
        for client in clients:
            await client.aclose()


async def _beat(
    redis: Redis,
    settings: Settings,
    kinds: tuple[WorkKind, ...],
    availability: RedisAvailability,
) -> None:
    """Publish this worker's heartbeat (its kinds, its Redis outages) for ``ctxd status``,
    every lease period (a quarter of the TTL); removed when the worker stops."""
    from redis.exceptions import RedisError

    from actors.runtime.availability import is_outage
    from actors.service.heartbeat import Heartbeat
    from actors.service.lease import renew_period

    heartbeat = Heartbeat(redis, settings, worker=True)
    try:
        while True:
            try:
                await heartbeat.beat(
                    {
                        "role": "worker",
                        "kinds": [k.value for k in kinds],
                        "redis": availability.statistics().as_dict(),
                    }
                )
            except Exception as exc:
                if not is_outage(exc):
                    raise
                availability.report(exc)  # the monitor logs it once
                await availability.wait_available()
                continue
            await anyio.sleep(renew_period(settings.lease_ttl))
    finally:
        # Best effort: a worker that cannot say goodbye is gone with its key's TTL.
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2),
            contextlib.suppress(RedisError, OSError),
        ):
            await heartbeat.remove()
