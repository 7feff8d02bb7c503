"""What every ``ctxd`` command shares: how it finds Redis, and its handler type."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from redis import Redis as SyncRedis
from redis.cluster import RedisCluster as SyncRedisCluster

from actors.app.checkpoint_store import checkpoint_store
from actors.app.redis_acl import check_redis_for_service
from actors.app.redis_server import discover_embedded_redis
from actors.config import Settings, split_cluster_option
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
    "command_settings",
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
    """A decoding synchronous client for the command's Redis.

    On a Redis Cluster (``?cluster=true`` in the URL, or found with ``INFO cluster``)
    it is redis-py's :class:`redis.cluster.RedisCluster`; :func:`command_settings`
    then gives the settings with ``cluster`` set, for the key layout.
    """
    url, stated = split_cluster_option(redis_url_for_client(settings))
    options: dict[str, Any] = {
        "decode_responses": True,
        # DLQ copies keep bytes that are not UTF-8 as they came: show them, never crash.
        "encoding_errors": "replace",
        # A server that accepts connections but never answers (stopped, overloaded)
        # ends the command with a "timeout" line instead of hanging it; a timeout in
        # the URL (?socket_timeout=…) wins.
        "socket_connect_timeout": CLIENT_TIMEOUT,
        "socket_timeout": CLIENT_TIMEOUT,
    }
    client = SyncRedis.from_url(url, **options)
    if stated or (stated is None and _is_cluster(client)):
        client.close()
        # The one boundary where the cluster client stands in for Redis: the commands
        # the CLI sends have the same signatures on both (redis.commands.core's mixins).
        client = cast(SyncRedis, SyncRedisCluster.from_url(url, **options))
    try:
        yield client
    finally:
        client.close()


def command_settings(settings: Settings, redis: SyncRedis) -> Settings:
    """``settings`` with ``cluster`` set when ``redis`` is a cluster client (key layout:
    output and DLQ streams per partition on a cluster)."""
    # Settings that say cluster already keep the layout (it is only names: tests and
    # tools may read it on one node).
    return replace(settings, cluster=settings.cluster or isinstance(redis, SyncRedisCluster))


def _is_cluster(client: SyncRedis) -> bool:
    info = client.info("cluster")
    return str(info.get("cluster_enabled", "0")) == "1"


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
    redis_url, url_setting = None, "CTXD_REDIS_URL"
    if settings.checkpointer == "redis":
        # A separate store is used without looking for the service Redis (the embedded
        # one may not be running now): its URL is only compared with the store's.
        if settings.checkpoint_url is not None:
            service = settings.redis_url or ""
        else:
            service = redis_url_for_client(settings)
        service, stated = split_cluster_option(service)
        store = checkpoint_store(
            settings if stated is None else replace(settings, cluster=stated), service
        )
        redis_url, url_setting = store.url, store.setting
        if store.separate:  # its failures name its own address
            await check_redis_for_service(
                store.url,
                settings.stream_prefix,
                modules=True,
                access=False,
                url_setting=url_setting,
            )
    async with open_checkpointer(
        settings.checkpointer,
        namespace=settings.stream_prefix,
        redis_url=redis_url,
        postgres_url=settings.postgres_url,
        url_setting=url_setting,
    ) as saver:
        yield saver
