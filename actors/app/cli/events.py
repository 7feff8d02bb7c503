"""``ctxd send`` and ``ctxd tail``: put events in, read results out.

``tail`` reads every output stream of the deployment (:func:`actors.results.output_streams`):
``ctxd:out`` on a single node, one stream per partition on a Redis Cluster, merged by entry
id (:mod:`actors.app.cli.merged`). Each workflow's results come in commit order; results
of different workflows only roughly in time order.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from redis.exceptions import ClusterError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.app.cli.common import Subcommands, client_redis, command_settings
from actors.app.cli.merged import Follower, newest, partition_count, workflow_partitions
from actors.config import Settings
from actors.producer import Producer
from actors.results import output_streams
from actors.runtime.backoff import jittered_backoff
from actors.service.partitions import output_stream_of
from graph.routing import PRIORITIES

__all__ = ["format_output", "register"]


def register(commands: Subcommands) -> None:
    """Add ``send`` and ``tail`` to the command line."""
    send = commands.add_parser(
        "send",
        help="append one event to its partition stream (or the input stream)",
        description="Append one event straight to its workflow's partition stream (the "
        "producer API, actors/producer.py) and print its entry id; to ctxd:in while no "
        "partition count is recorded or a resize is in progress, or with --via-input.",
    )
    send.add_argument("workflow_id", metavar="WORKFLOW_ID", help="1-200 chars of [A-Za-z0-9_.:-]")
    send.add_argument("text", metavar="TEXT", help="the event's content")
    send.add_argument("--priority", choices=PRIORITIES, help="business priority")
    send.add_argument("--deadline", help="ISO-8601 timestamp with offset, e.g. 2026-01-31T12:00Z")
    send.add_argument("--max-cost", type=float, help="cost budget, a number >= 0")
    send.add_argument("--event-id", help="idempotency key (default: the entry id)")
    send.add_argument("--metadata", help="a JSON object")
    send.add_argument(
        "--via-input",
        action="store_true",
        help="append to ctxd:in (routed by the partitions' owners) instead of the partition",
    )
    send.set_defaults(handler=_send)

    tail = commands.add_parser(
        "tail",
        help="print results from the output stream",
        description="Print results readably, oldest first: ctxd:out, or on a Redis Cluster "
        "every partition's output stream, merged (each workflow's results in order).",
    )
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new results")
    tail.add_argument("--workflow", "-w", help="only this workflow's results")
    tail.add_argument("--last", type=int, default=20, help="how many recent results (default 20)")
    tail.add_argument("--json", action="store_true", help="print raw fields as JSON lines")
    tail.set_defaults(handler=_tail)


def _send(settings: Settings, args: argparse.Namespace) -> int:
    fields: dict[str, str] = {"workflow_id": args.workflow_id, "content": args.text}
    for name in ("priority", "deadline", "event_id", "metadata"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.max_cost is not None:
        fields["max_cost"] = repr(args.max_cost)
    with client_redis(settings) as redis:
        producer = Producer(redis, prefix=settings.stream_prefix)
        sent = producer.send_fields(fields, via_input=args.via_input)
    print(sent.entry_id)
    return 0


def format_output(entry_id: str, fields: Mapping[str, str]) -> str:
    """One readable line for a ``ctxd:out`` entry."""
    millis = int(entry_id.split("-")[0])
    stamp = datetime.fromtimestamp(millis / 1000).strftime("%H:%M:%S")
    route = " > ".join(json.loads(fields.get("route") or "[]"))
    error = f" error: {fields['error']}" if fields.get("error") else ""
    return (
        f"{stamp} {fields.get('workflow_id', '?')} event={fields.get('event_id', '?')} "
        f"status={fields.get('status', '?')} decision={fields.get('decision') or '-'} "
        f"quality={float(fields.get('quality_score') or 0):.2f} route: {route}{error}"
    )


def _tail(configured: Settings, args: argparse.Namespace) -> int:
    def wanted(fields: Mapping[str, str]) -> bool:
        return not args.workflow or fields.get("workflow_id") == args.workflow

    with client_redis(configured) as redis:
        settings = command_settings(configured, redis)
        streams = output_streams(settings, partition_count(redis, settings))
        if args.workflow and settings.cluster:
            # A workflow's results are all in its partition's stream.
            parts = workflow_partitions(redis, settings, args.workflow)
            streams = [output_stream_of(settings, n) for n in parts]
        # With a workflow filter, look further back so --last N still finds N of them.
        recent = newest(redis, streams, max(args.last, 1) * (20 if args.workflow else 1))
        shown = [entry for entry in recent.entries if wanted(entry.fields)]
        for entry in shown[-args.last :] if args.last > 0 else []:
            _print_entry(entry.entry_id, entry.fields, as_json=args.json)
        if args.follow:
            _follow(Follower(redis, recent.cursors), wanted, as_json=args.json)
    return 0


_OUTAGE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)
"""What a follow waits out: Redis restarting, a cluster master failing over."""


def _follow(
    follower: Follower, wanted: Callable[[Mapping[str, str]], bool], *, as_json: bool
) -> None:
    """Print new results until interrupted; Redis outages (a restart, a master failing
    over to its replica) are waited out with backoff, one line when one begins and one
    when it ends, as the service does."""
    failures = 0
    rng = random.Random()
    while True:
        try:
            entries = follower.read(block_ms=1000)
        except _OUTAGE_ERRORS as exc:
            if not failures:
                cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                print(f"ctxd tail: Redis unavailable ({cause}); waiting", file=sys.stderr)
            time.sleep(jittered_backoff(0.2, 2.0, failures, 5.0, 0.2, rng))
            failures += 1
            continue
        if failures:
            print(f"ctxd tail: Redis is back after {failures} retries", file=sys.stderr)
            failures = 0
        for entry in entries:
            if wanted(entry.fields):
                _print_entry(entry.entry_id, entry.fields, as_json=as_json)


def _print_entry(entry_id: str, fields: Mapping[str, str], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"id": entry_id, **fields}), flush=True)
    else:
        print(format_output(entry_id, fields), flush=True)
