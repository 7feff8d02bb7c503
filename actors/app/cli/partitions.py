"""``ctxd partitions``: show the recorded partition count, change it, or undo a change.

The count lives in Redis (:mod:`actors.service.partition_record`); ``resize`` runs the
procedure of :mod:`actors.service.resize` in the foreground and prints its progress.
docs/operations.md, "Changing the partition count", is the procedure around it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import anyio
from redis.asyncio import Redis

from actors.app.cli.common import CLIENT_TIMEOUT, Subcommands, redis_url_for_client
from actors.config import Settings, split_cluster_option
from actors.service.connections import cluster_enabled, open_service_client
from actors.service.partition_record import read_record, record_key
from actors.service.resize import ResizeProgress, abort_resize, resize_partitions
from graph.errors import ConfigError

__all__ = ["register"]

_MAX_PARTITIONS = 1024
_CONNECTIONS = 8
"""Connections per node of the cluster client: `resize` reads and writes one at a time."""
_QUIET = 5.0
"""Seconds between progress lines that say nothing new."""


def register(commands: Subcommands) -> None:
    """Add ``partitions`` (show, ``resize N``, ``abort``) to the command line."""
    parser = commands.add_parser(
        "partitions",
        help="show the partition count recorded in Redis, or change it (resize N)",
        description="With no action: the recorded partition count, its epoch and state. "
        "`resize N` changes the count under load without losing, doubling or reordering "
        "an event: routing pauses, the old partitions drain, the record flips, and "
        "instances running with the old count stop to be started with CTXD_PARTITIONS=N "
        '(docs/operations.md, "Changing the partition count"). `abort` undoes a resize '
        "whose command was killed.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    resize = actions.add_parser("resize", help="change the partition count to N")
    resize.add_argument("count", type=int, help=f"the new partition count (1..{_MAX_PARTITIONS})")
    resize.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the old partitions may take to drain before the resize is undone "
        "(default 600)",
    )
    actions.add_parser(
        "abort",
        help="resume routing after a resize whose command was killed (before its flip the "
        "old count stays, after it the new one)",
    )
    parser.set_defaults(handler=_partitions)


def _partitions(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "resize" and not 1 <= args.count <= _MAX_PARTITIONS:
        raise ConfigError(f"resize {args.count}: the count must be 1..{_MAX_PARTITIONS}")
    url = redis_url_for_client(settings)
    return anyio.run(_run, settings, url, args)


async def _open(settings: Settings, url: str) -> tuple[Redis, Settings]:
    """The client of ``url`` (redis-py's cluster client on a Redis Cluster, stated with
    ``?cluster=`` or found with ``INFO cluster``) and the settings with its layout."""
    url, stated = split_cluster_option(url)
    redis = Redis.from_url(url, socket_connect_timeout=CLIENT_TIMEOUT)
    cluster = stated if stated is not None else await cluster_enabled(redis)
    if not cluster:
        return redis, settings
    await redis.aclose()
    settings = replace(settings, cluster=True)
    return open_service_client(url, settings, _CONNECTIONS), settings


async def _run(settings: Settings, url: str, args: argparse.Namespace) -> int:
    redis, settings = await _open(settings, url)
    try:
        if args.action == "resize":
            return await _resize(redis, settings, args.count, args.timeout)
        if args.action == "abort":
            record = await abort_resize(redis, settings)
            print(f"partitions: {record.describe() if record else 'none recorded'}")
            return 0
        record = await read_record(redis, settings)
        if record is None:
            print(
                f"partitions: none recorded in {record_key(settings)} yet (the first "
                f"`ctxd run` records its CTXD_PARTITIONS; configured here: {settings.partitions})"
            )
            return 0
        print(f"partitions: {record.count}")
        print(f"epoch: {record.epoch}")
        print(f"state: {record.state}" + (f" (to {record.next})" if record.next else ""))
        if record.count != settings.partitions:
            print(
                f"note: CTXD_PARTITIONS={settings.partitions} here; `ctxd run` with it "
                "would refuse to start"
            )
        return 0
    finally:
        await redis.aclose()


async def _resize(redis: Redis, settings: Settings, target: int, drain_timeout: float) -> int:
    before = await read_record(redis, settings)
    last: tuple[object, ...] = ()
    last_time = 0.0

    def show(p: ResizeProgress) -> None:
        nonlocal last, last_time
        now = time.monotonic()
        key = (p.step, p.unfinished, p.busy_partitions, p.parked, p.old_instances)
        if key == last and now - last_time < _QUIET:
            return
        last, last_time = key, now
        if p.step == "routing":
            line = "moving paused; the movers finish up to one ctxd:in id" + (
                f" ({p.busy_partitions} partitions behind)" if p.busy_partitions else ""
            )
        elif p.step == "draining":
            line = (
                f"draining the old partitions: {p.unfinished} entries unfinished in "
                f"{p.busy_partitions} partitions, {p.parked} parked"
            )
        elif p.step == "copying":
            line = "drained; copying the workflow index and dedupe keys"
        elif p.step == "switching":
            line = (
                f"count switched; waiting for {p.old_instances} instances of the old count to stop"
            )
        else:
            line = "done"
        print(f"resize [{p.elapsed:6.1f}s] {line}", flush=True)

    record = await resize_partitions(
        redis, settings, target, progress=show, drain_timeout=drain_timeout
    )
    if before is not None and before.count == record.count and before.epoch == record.epoch:
        print(f"partitions: already {record.describe()}")
        return 0
    print(f"partitions: {record.describe()}; routing resumed")
    return 0
