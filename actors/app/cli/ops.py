"""``ctxd status``: what an operator needs at a glance (the DLQ commands: ``dlq.py``).

``status`` reads only what is in Redis: the instances' heartbeats (partitions, counters,
breaker states when the actor pools publish them), the leases, the partitions' cursors
in ``ctxd:in`` (input lag: entries after the lowest cursor), the consumer groups of the
partition streams (lag, pending), and the lengths of the output and dead-letter streams
(summed over every partition's on a Redis Cluster).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import cast

from redis import Redis as SyncRedis
from redis.exceptions import ResponseError

from actors.app.cli.common import Subcommands, client_redis, command_settings, recorded_count
from actors.app.cli.merged import partition_count, stream_lengths
from actors.config import Settings
from actors.results import dead_letter_streams, output_streams
from actors.service.footprint import SAMPLES, collect_footprint, format_bytes
from actors.service.heartbeat import instance_key, instances_key, worker_key, workers_key
from actors.service.input_routing import cursor_key, id_key
from actors.service.partition_record import record_key
from actors.service.partitions import (
    dlq_stream_of,
    output_stream_of,
    partition_lease,
    partition_stream,
)

__all__ = ["collect_status", "register"]


def register(commands: Subcommands) -> None:
    """Add ``status`` to the command line."""
    status = commands.add_parser(
        "status",
        help="instances, partitions, breakers, input lag, pending counts, DLQ size",
        description="Show what the running ctxd instances publish in Redis.",
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--scan-limit",
        type=int,
        default=200_000,
        metavar="N",
        help="what is kept (keys and bytes by category: checkpoints, streams, dedupe, DLQ, "
        "other): keys are counted exactly by SCAN up to N keys (default 200000; beyond, the "
        f"counts are marked incomplete); bytes are estimated from MEMORY USAGE of up to "
        f"{SAMPLES} sampled keys per category, scaled to its key count (RedisJSON overstates "
        "checkpoints about 3x: an upper bound; used_memory is exact); 0 skips this",
    )
    status.set_defaults(handler=_status)


def _groups(redis: SyncRedis, stream: str) -> list[dict[str, object]]:
    try:
        return cast(list[dict[str, object]], redis.xinfo_groups(stream))
    except ResponseError:
        return []


_LAG_SCAN = 100_000
"""``ctxd status`` counts at most this many unmoved ``ctxd:in`` entries (then says ``+``)."""


def _input_lag(redis: SyncRedis, stream: str, lowest: str) -> tuple[int, bool]:
    """How many ``ctxd:in`` entries lie after the lowest partition cursor (not moved by
    every partition yet), counted up to :data:`_LAG_SCAN`; whether the count stopped there."""
    count, start = 0, f"({lowest}"
    while count < _LAG_SCAN:
        page = cast(list[tuple[str, object]], redis.xrange(stream, start, "+", count=1000))
        count += len(page)
        if len(page) < 1000:
            return count, False
        start = f"({page[-1][0]}"
    return count, True


def collect_status(
    redis: SyncRedis, settings: Settings, *, scan_limit: int = 0
) -> dict[str, object]:
    """Everything ``ctxd status`` shows, as one JSON-able document.

    Args:
        redis: a decoding client.
        settings: names and prefix.
        scan_limit: with more than 0, the ``footprint`` (what is kept) from at most this
            many scanned keys (actors/service/footprint.py).
    """
    settings = recorded_count(redis, settings)
    now = time.time()
    instances = []
    for name in cast(list[str], redis.zrange(instances_key(settings), 0, -1)):
        body = cast(str | None, redis.get(instance_key(settings, name)))
        info = json.loads(body) if body else {"instance": name, "stale": True}
        if "beat" in info:
            info["seconds_since_beat"] = round(now - float(cast(float, info["beat"])), 1)
        instances.append(info)
    workers = []
    for name in cast(list[str], redis.zrange(workers_key(settings), 0, -1)):
        body = cast(str | None, redis.get(worker_key(settings, name)))
        if body:  # a worker that stopped without saying so is gone with its key's TTL
            workers.append(json.loads(body))
    cursors = [
        cast(str | None, redis.get(cursor_key(settings, n))) for n in range(settings.partitions)
    ]
    lowest = min((c for c in cursors), key=lambda c: id_key(c or "0-0"), default=None)
    input_lag, lag_capped = _input_lag(redis, settings.input_stream, lowest or "0-0")
    partitions = []
    for n in range(settings.partitions):
        stream = partition_stream(settings, n)
        groups = _groups(redis, stream)
        owner = cast(str | None, redis.get(partition_lease(settings, n)[0]))
        partitions.append(
            {
                "partition": n,
                "owner": owner,
                "cursor": cursors[n],
                "pending": sum(int(cast(int, g.get("pending") or 0)) for g in groups),
                "lag": sum(int(cast(int, g.get("lag") or 0)) for g in groups),
            }
        )
    footprint = collect_footprint(redis, settings, scan_limit=scan_limit) if scan_limit else None
    count = partition_count(redis, settings)
    outputs = stream_lengths(redis, output_streams(settings, count))
    dead = stream_lengths(redis, dead_letter_streams(settings, count))
    if settings.cluster:  # each partition's own output and DLQ lengths
        for entry in partitions:
            n = cast(int, entry["partition"])
            entry["output_length"] = outputs.get(output_stream_of(settings, n), 0)
            entry["dlq_size"] = dead.get(dlq_stream_of(settings, n), 0)
    return {
        "footprint": footprint,
        "instances": instances,
        "workers": workers,
        "input": {
            "stream": settings.input_stream,
            "length": redis.xlen(settings.input_stream),
            "lowest_cursor": lowest,
            "lag": input_lag,
            "lag_capped": lag_capped,
        },
        "partitions": partitions,
        "partition_record": redis.hgetall(record_key(settings)),
        "pending": sum(int(cast(int, p["pending"])) for p in partitions),
        "lag": sum(int(cast(int, p["lag"])) for p in partitions) + input_lag,
        "output_length": sum(outputs.values()),
        "output_streams": len(outputs),
        "dlq_size": sum(dead.values()),
    }


def _status(configured: Settings, args: argparse.Namespace) -> int:
    with client_redis(configured) as redis:
        settings = command_settings(configured, redis)
        doc = collect_status(redis, settings, scan_limit=max(args.scan_limit, 0))
    if args.json:
        print(json.dumps(doc, sort_keys=True, default=str))
        return 0
    instances = cast(list[dict[str, object]], doc["instances"])
    print(f"instances: {len(instances)}")
    for info in instances:
        breakers = info.get("breakers") or {}
        print(
            f"  {info.get('instance')}  beat {info.get('seconds_since_beat', '?')}s ago  "
            f"partitions {info.get('partitions', [])}  processed {info.get('processed', 0)}  "
            f"in flight {info.get('in_flight', 0)}  dead-lettered {info.get('dead_lettered', 0)}"
            + (f"  breakers {json.dumps(breakers, sort_keys=True)}" if breakers else "")
            + ("  pools " + json.dumps(info["pools"], sort_keys=True) if "pools" in info else "")
        )
        lease = info.get("lease")
        if isinstance(lease, dict):  # the renewal margin: ttl - longest gap
            print(
                f"    leases: ttl {lease.get('ttl')}s, renewed every {lease.get('renew_every')}s, "
                f"longest gap {lease.get('renew_gap_max')}s"
            )
        outages = _outage_line(info.get("redis"))
        if outages:
            print(f"    {outages}")
    workers = cast(list[dict[str, object]], doc.get("workers") or [])
    if workers:
        print(f"workers: {len(workers)}")
    for info in workers:
        print(f"  {info['instance']}: kinds {', '.join(cast(list[str], info.get('kinds') or []))}")
        outages = _outage_line(info.get("redis"))
        if outages:
            print(f"    {outages}")
    inputs = cast(dict[str, object], doc["input"])
    print(
        f"input {settings.input_stream}: {inputs['length']} entries, "
        f"lag {inputs['lag']}{'+' if inputs['lag_capped'] else ''} "
        f"(not moved to partitions yet, after the lowest cursor {inputs['lowest_cursor'] or '-'})"
    )
    busy = [p for p in cast(list[dict[str, object]], doc["partitions"]) if p["pending"] or p["lag"]]
    record = cast(dict[str, str], doc.get("partition_record") or {})
    epoch = f" (epoch {record['epoch']}, {record.get('state', 'active')})" if record else ""
    print(
        f"partitions: {len(cast(list[object], doc['partitions']))}{epoch}, "
        f"pending {doc['pending']}, lag {doc['lag']}"
    )
    for p in busy:
        print(
            f"  part {p['partition']}: owner {p['owner']}, pending {p['pending']}, lag {p['lag']}"
        )
    streams = int(cast(int, doc["output_streams"]))
    spread = f" in {streams} partition streams" if streams > 1 else ""
    print(f"output: {doc['output_length']} entries{spread}   dlq: {doc['dlq_size']} entries")
    footprint = cast(dict[str, object] | None, doc.get("footprint"))
    if footprint is not None:
        scope = "" if footprint["complete"] else f" (first {footprint['scanned']} keys only)"
        print(
            f"kept{scope}: Redis used_memory {format_bytes(footprint['used_memory'])}; "
            "bytes estimated from sampled MEMORY USAGE"
        )
        categories = cast(dict[str, dict[str, object]], footprint["categories"])
        for name, figures in categories.items():
            print(f"  {name:<12} {figures['keys']:>9} keys  {format_bytes(figures['bytes']):>10}")
    return 0


def _outage_line(redis_info: object) -> str:
    """An instance's Redis outages as its heartbeat reports them ("" when none)."""
    if not isinstance(redis_info, dict) or not redis_info.get("outages"):
        return ""
    started = redis_info.get("last_started")
    when = (
        datetime.fromtimestamp(float(started), UTC).isoformat(timespec="seconds")
        if isinstance(started, int | float)
        else "?"
    )
    seconds = redis_info.get("last_seconds")
    if not redis_info.get("available"):
        how = f"UNAVAILABLE NOW since {when} ({redis_info.get('kind')})"
    else:
        how = f"last began {when} and lasted {seconds}s ({redis_info.get('kind')})"
    return f"redis outages: {redis_info['outages']}, {how}, cause: {redis_info.get('cause', '')}"
