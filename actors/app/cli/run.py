"""``ctxd run``: the service in the foreground."""

from __future__ import annotations

import argparse
import contextlib

import anyio

from actors.app.cli.common import Subcommands, open_service_telemetry
from actors.app.redis_server import open_embedded_redis
from actors.config import Settings

__all__ = ["register"]


def register(commands: Subcommands) -> None:
    """Add ``run`` to the command line."""
    run = commands.add_parser(
        "run",
        help="run the service in the foreground (SIGTERM/SIGINT stop it gracefully)",
        description="Consume ctxd:in, run the contextual workflow per event, write ctxd:out. "
        "Stops on SIGTERM/SIGINT: no new reads, in-flight work finishes, the rest stays "
        "pending. Exits non-zero on a fatal error so a service manager restarts it. "
        "With no CTXD_REDIS_URL it starts the embedded Redis (data in CTXD_STATE_DIR).",
    )
    run.add_argument(
        "--demo",
        action="store_true",
        help="also feed a short demo stream and print the results as they come",
    )
    run.set_defaults(handler=_run)


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from actors.app.daemon import serve
    from actors.app.demo import feed_demo

    with contextlib.ExitStack() as stack:
        # Entered first, left last: after the service has drained (SIGTERM included),
        # leaving it flushes the batch span processor and the metric reader.
        telemetry = stack.enter_context(open_service_telemetry(settings))
        url = settings.redis_url
        if url is None:
            server = open_embedded_redis(settings.state_dir, port=settings.embedded_port or None)
            url = stack.enter_context(server).url
        redis_url = url

        async def feed() -> None:
            await feed_demo(settings, redis_url)

        async def run() -> None:
            # serve() waits for Redis, then checks credentials, TLS, modules and ACL.
            await serve(
                settings, redis_url, on_ready=feed if args.demo else None, telemetry=telemetry
            )

        anyio.run(run)
    return 0
