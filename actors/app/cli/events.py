"""``ctxd send`` and ``ctxd tail``: put events in, read results out."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from actors.app.cli.common import Subcommands, client_redis
from actors.config import Settings
from actors.producer import Producer
from actors.runtime.redis_io import xread_text, xrevrange_text
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
        description="Print ctxd:out entries readably, oldest first.",
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


def format_output(entry_id: str, fields: dict[str, str]) -> str:
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


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    stream = settings.output_stream

    def wanted(fields: dict[str, str]) -> bool:
        return not args.workflow or fields.get("workflow_id") == args.workflow

    with client_redis(settings) as redis:
        # With a workflow filter, look further back so --last N still finds N of them.
        recent = xrevrange_text(redis, stream, max(args.last, 1) * (20 if args.workflow else 1))
        last_id = recent[0][0] if recent else "0-0"
        shown = [(eid, f) for eid, f in reversed(recent) if wanted(f)]
        for entry_id, fields in shown[-args.last :] if args.last > 0 else []:
            _print_entry(entry_id, fields, as_json=args.json)
        while args.follow:
            for entry_id, fields in xread_text(redis, stream, last_id, block=1000):
                last_id = entry_id
                if wanted(fields):
                    _print_entry(entry_id, fields, as_json=args.json)
    return 0


def _print_entry(entry_id: str, fields: dict[str, str], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"id": entry_id, **fields}), flush=True)
    else:
        print(format_output(entry_id, fields), flush=True)
