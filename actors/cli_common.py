"""What every ``ctxd`` command shares: how it finds Redis, and its handler type."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import TypeAlias

from redis import Redis as SyncRedis

from actors.config import Settings
from actors.redis_server import discover_embedded_redis
from graph.errors import CtxdError

__all__ = ["Handler", "Subcommands", "client_redis", "redis_url_for_client"]

Handler = Callable[[Settings, argparse.Namespace], int]
"""A command: settings and parsed arguments in, exit code out."""

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def redis_url_for_client(settings: Settings) -> str:
    """The configured Redis, or the embedded one a running ``ctxd run`` started."""
    if settings.redis_url is not None:
        return settings.redis_url
    server = discover_embedded_redis(settings.state_dir)
    if server is None:
        raise CtxdError(
            f"no Redis configured and no embedded Redis running from {settings.state_dir}: "
            "start `ctxd run` first, or set CTXD_REDIS_URL"
        )
    return server.url


@contextlib.contextmanager
def client_redis(settings: Settings) -> Iterator[SyncRedis]:
    """A decoding synchronous client for the command's Redis."""
    client = SyncRedis.from_url(redis_url_for_client(settings), decode_responses=True)
    try:
        yield client
    finally:
        client.close()
