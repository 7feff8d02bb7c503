"""``ctxd status`` and ``ctxd dlq list|replay``: what an operator needs at a glance.

``status`` reads only what is in Redis: the instances' heartbeats (partitions, counters,
breaker states when the actor pools publish them), the leases, the partitions' cursors
in ``ctxd:in`` (input lag: entries after the lowest cursor), the consumer groups of the
partition streams (lag, pending) and the DLQ length.
``dlq replay`` moves dead letters back to ``ctxd:in`` (original fields, without the
DLQ's reason/error/attempts/source_id), each in one Lua script: append, then delete
from the DLQ, so an entry is never both replayed and kept, nor lost.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import cast

from redis import Redis as SyncRedis
from redis.exceptions import ResponseError

from actors.app.cli.common import Subcommands, client_redis, recorded_count
from actors.config import Settings
from actors.runtime import scripts
from actors.service.footprint import SAMPLES, collect_footprint, format_bytes
from actors.service.heartbeat import instance_key, instances_key, worker_key, workers_key
from actors.service.input_routing import cursor_key, id_key
from actors.service.partition_record import record_key
from actors.service.partitions import partition_lease, partition_stream

__all__ = ["collect_status", "register", "replay_dead_letters"]

_DLQ_ONLY = ("reason", "error", "attempts", "source_id")


def register(commands: Subcommands) -> None:
    """Add ``status`` and ``dlq`` to the command line."""
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

    dlq = commands.add_parser(
        "dlq", help="inspect and replay dead letters", description="The dead-letter stream."
    )
    sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="print dead letters, oldest first")
    listing.add_argument("--count", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(handler=_dlq_list)
    replay = sub.add_parser(
        "replay",
        help="append dead letters to the input stream again and remove them from the DLQ",
    )
    replay.add_argument("--id", action="append", dest="ids", help="a DLQ entry id (repeatable)")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(handler=_dlq_replay)


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
        "output_length": redis.xlen(settings.output_stream),
        "dlq_size": redis.xlen(settings.dlq_stream),
    }


def _status(settings: Settings, args: argparse.Namespace) -> int:
    with client_redis(settings) as redis:
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
    print(f"output: {doc['output_length']} entries   dlq: {doc['dlq_size']} entries")
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


def _dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    with client_redis(settings) as redis:
        entries = cast(
            list[tuple[str, dict[str, str]]], redis.xrange(settings.dlq_stream, count=args.count)
        )
    for entry_id, fields in entries:
        if args.json:
            print(json.dumps({"id": entry_id, **fields}, sort_keys=True))
        else:
            print(
                f"{entry_id}  reason={fields.get('reason', '?')}  "
                f"workflow={fields.get('workflow_id', '-')}  event={fields.get('event_id', '-')}  "
                f"attempts={fields.get('attempts', '?')}  {fields.get('error', '')}"
            )
    return 0


def replay_dead_letters(redis: SyncRedis, settings: Settings, ids: list[str]) -> list[str]:
    """Move DLQ entries ``ids`` back to the input stream atomically; return the new ids
    ("" for an id not in the DLQ, "cut" for an entry whose DLQ copy was cut: not moved)."""
    script = redis.register_script(scripts.DLQ_REPLAY)  # sync client: no gateway call
    result = script(keys=[settings.dlq_stream, settings.input_stream], args=ids)
    return [str(x) for x in cast(list[str], result)]


def _dlq_replay(settings: Settings, args: argparse.Namespace) -> int:
    if not args.ids and not args.all:
        print("ctxd dlq replay: give --id ID (repeatable) or --all")
        return 2
    with client_redis(settings) as redis:
        ids = args.ids or [
            entry_id
            for entry_id, _ in cast(list[tuple[str, object]], redis.xrange(settings.dlq_stream))
        ]
        new_ids = replay_dead_letters(redis, settings, ids)
    missing = [i for i, new in zip(ids, new_ids, strict=True) if not new or new == "cut"]
    for old, new in zip(ids, new_ids, strict=True):
        if new == "cut":
            print(
                f"{old}: not replayed, its DLQ copy was cut (field ctxd_cut; "
                "CTXD_DLQ_FIELD_BYTES): send the original event again"
            )
        elif new:
            print(f"{old} -> {settings.input_stream} {new}")
        else:
            print(f"{old}: not in {settings.dlq_stream}")
    return 1 if missing else 0
