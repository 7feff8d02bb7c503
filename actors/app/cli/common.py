"""What every ``ctxd`` command shares: how it finds Redis, and its handler type."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, TypeAlias

from redis import Redis as SyncRedis

from actors.app.redis_server import discover_embedded_redis
from actors.config import Settings
from actors.service.partition_record import PartitionRecord, record_key
from graph.checkpointer import open_checkpointer
from graph.errors import ConfigError, CtxdError

if TYPE_CHECKING:
    from langgraph.checkpoint.base import BaseCheckpointSaver

    from telemetry.setup import Telemetry

__all__ = [
    "CLIENT_TIMEOUT",
    "Handler",
    "Subcommands",
    "client_redis",
    "open_command_checkpointer",
    "open_service_telemetry",
    "recorded_count",
    "redis_url_for_client",
]

CLIENT_TIMEOUT = 10.0
"""Seconds a command's Redis client waits to connect or for a reply (blocking reads
are shorter)."""

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


def recorded_count(redis: SyncRedis, settings: Settings) -> Settings:
    """``settings`` with the partition count recorded in Redis (when there is one): a
    command must look where the service hashes, whatever ``CTXD_PARTITIONS`` says here."""
    record = PartitionRecord.from_hash(redis.hgetall(record_key(settings)))
    if record is None or record.count == settings.partitions:
        return settings
    return dataclasses.replace(settings, partitions=record.count)


@contextlib.contextmanager
def client_redis(settings: Settings) -> Iterator[SyncRedis]:
    """A decoding synchronous client for the command's Redis."""
    client = SyncRedis.from_url(
        redis_url_for_client(settings),
        decode_responses=True,
        # DLQ copies keep bytes that are not UTF-8 as they came: show them, never crash.
        encoding_errors="replace",
        # A server that accepts connections but never answers (stopped, overloaded)
        # ends the command with a "timeout" line instead of hanging it; a timeout in
        # the URL (?socket_timeout=…) wins.
        socket_connect_timeout=CLIENT_TIMEOUT,
        socket_timeout=CLIENT_TIMEOUT,
    )
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def open_service_telemetry(settings: Settings) -> Iterator[Telemetry]:
    """Logging and OpenTelemetry (``OTEL_*``) for a long-running command.

    Leaving the block flushes the batch span processor and the metric reader, so the
    spans of the last event before SIGTERM are exported.

    Raises:
        ConfigError: an ``OTEL_*`` variable has a value ctxd cannot use.
    """
    from telemetry.logging import configure_logging
    from telemetry.settings import TelemetryConfigError, TelemetrySettings
    from telemetry.setup import open_telemetry

    try:
        telemetry_settings = TelemetrySettings.from_env(os.environ)
    except TelemetryConfigError as exc:
        raise ConfigError(str(exc)) from None
    configure_logging(
        level=settings.log_level,
        json=None if settings.log_format == "auto" else settings.log_format == "json",
    )
    with open_telemetry(telemetry_settings) as telemetry:
        yield telemetry


@contextlib.asynccontextmanager
async def open_command_checkpointer(
    settings: Settings, *, memory_hint: str
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    """The deployment's checkpointer, for a command that reads or changes workflow state.

    Args:
        settings: validated settings (checkpointer kind, URLs, prefix).
        memory_hint: what to do instead, said when ``CTXD_CHECKPOINTER=memory`` (whose
            state lives inside the running service only).
    """
    if settings.checkpointer == "memory":
        raise ConfigError(
            f"CTXD_CHECKPOINTER=memory keeps state inside the running service only: {memory_hint}"
        )
    redis_url = redis_url_for_client(settings) if settings.checkpointer == "redis" else None
    async with open_checkpointer(
        settings.checkpointer,
        namespace=settings.stream_prefix,
        redis_url=redis_url,
        postgres_url=settings.postgres_url,
    ) as saver:
        yield saver
