"""``ctxd dlq list|replay``: the dead letters, on one Redis or spread over a cluster.

On a single node every dead letter is in ``ctxd:dlq``; ``replay`` moves entries back to
``ctxd:in`` in one Lua script (append, then delete from the DLQ), so an entry is never
both replayed and kept, nor lost.

On a Redis Cluster each partition has its own DLQ, ``{prefix}:{p<n>}:dlq``, in its own
slot, plus the shared ``ctxd:dlq`` (:func:`actors.results.dead_letter_streams`); none is
in ``ctxd:in``'s slot, so one script cannot do both writes. There ``replay`` is
**non-atomic but idempotent**, per entry: append to ``ctxd:in``, then delete from the
DLQ. A crash between the two leaves the entry in ``ctxd:in`` *and* in the DLQ; replaying
it again appends it a second time, which the service drops as a duplicate, because the
replayed entry carries a fixed ``event_id`` (its own, or, when the producer gave none,
the ``ctxd:in`` id it was first known by: its ``source_id``). Nothing is lost: the
delete comes only after the append succeeded.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis as SyncRedis
from redis.client import NEVER_DECODE

from actors.app.cli.common import Subcommands, client_redis, command_settings
from actors.app.cli.merged import oldest, partition_count
from actors.config import Settings
from actors.results import dead_letter_streams
from actors.runtime import scripts

__all__ = ["DeadLetterRef", "register", "replay_across_slots", "replay_dead_letters"]

_DLQ_ONLY = frozenset({b"reason", b"error", b"attempts", b"source_id"})
_CUT_FIELD = b"ctxd_cut"


@dataclass(frozen=True)
class DeadLetterRef:
    """A dead letter named by its stream and its id (ids repeat across streams)."""

    stream: str
    entry_id: str

    def __str__(self) -> str:
        return f"{self.stream}/{self.entry_id}"


def register(commands: Subcommands) -> None:
    """Add ``dlq list`` and ``dlq replay`` to the command line."""
    dlq = commands.add_parser(
        "dlq",
        help="inspect and replay dead letters",
        description="The dead letters: ctxd:dlq, or on a Redis Cluster every partition's "
        "DLQ ({prefix}:{p<n>}:dlq) and ctxd:dlq, merged by entry id.",
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
    replay.add_argument(
        "--id",
        action="append",
        dest="ids",
        help="a DLQ entry id, or STREAM/ID as `dlq list` prints it on a cluster (repeatable)",
    )
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(handler=_dlq_replay)


def _dlq_list(configured: Settings, args: argparse.Namespace) -> int:
    with client_redis(configured) as redis:
        settings = command_settings(configured, redis)
        streams = dead_letter_streams(settings, partition_count(redis, settings))
        entries = oldest(redis, streams, args.count)
    for entry in entries:
        if args.json:
            document = {"id": entry.entry_id, **entry.fields, "dlq": entry.stream}
            print(json.dumps(document, sort_keys=True))
        else:
            where = f"{entry.stream}/" if settings.cluster else ""
            fields = entry.fields
            print(
                f"{where}{entry.entry_id}  reason={fields.get('reason', '?')}  "
                f"workflow={fields.get('workflow_id', '-')}  event={fields.get('event_id', '-')}  "
                f"attempts={fields.get('attempts', '?')}  {fields.get('error', '')}"
            )
    return 0


def replay_dead_letters(redis: SyncRedis, settings: Settings, ids: list[str]) -> list[str]:
    """Move ``ctxd:dlq`` entries ``ids`` back to the input stream atomically (one node).

    Returns, per id, the new input id ("" for an id not in the DLQ, "cut" for an entry
    whose DLQ copy was cut: not moved).
    """
    script = redis.register_script(scripts.DLQ_REPLAY)  # sync client: no gateway call
    result = script(keys=[settings.dlq_stream, settings.input_stream], args=ids)
    return [str(x) for x in cast(list[str], result)]


def replay_across_slots(redis: SyncRedis, settings: Settings, ref: DeadLetterRef) -> str:
    """Replay one dead letter from a DLQ in another slot than ``ctxd:in`` (a cluster).

    Non-atomic but idempotent (see the module's docstring): append, then delete. The
    entry is read and written as bytes, so values that are not UTF-8 come back as they
    were. Returns the new input id, "" when the entry is not there, "cut" when its copy
    was cut (then it stays in the DLQ).
    """
    found = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        # NEVER_DECODE: this one reply as bytes, on a decoding client (redis-py's option).
        redis.execute_command(  # type: ignore[no-untyped-call]
            "XRANGE", ref.stream, ref.entry_id, ref.entry_id, **{NEVER_DECODE: []}
        ),
    )
    if not found:
        return ""
    fields = found[0][1]
    if _CUT_FIELD in fields:
        return "cut"
    original = {k: v for k, v in fields.items() if k not in _DLQ_ONLY}
    if not original:
        original = {b"replayed_from": ref.entry_id.encode()}
    if b"event_id" not in original:
        # A fixed idempotency key: a second append (after a crash) is a duplicate.
        original[b"event_id"] = fields.get(b"source_id") or ref.entry_id.encode()
    new_id = redis.xadd(settings.input_stream, cast(Any, original))
    redis.xdel(ref.stream, ref.entry_id)
    return str(new_id)


def _resolve(
    redis: SyncRedis, streams: list[str], wanted: list[str]
) -> tuple[list[DeadLetterRef], list[str]]:
    """The dead letters ``wanted`` names (``ID`` or ``STREAM/ID``), in the order given,
    and the problems (unknown stream, an id in no DLQ or in several)."""
    bare = [item for item in wanted if "/" not in item]
    holders: dict[str, list[str]] = {}
    if bare:
        # A bare id is looked up in every DLQ: one XRANGE per stream, pipelined.
        pipe = redis.pipeline(transaction=False)
        for entry_id in bare:
            for stream in streams:
                pipe.xrange(stream, entry_id, entry_id)
        replies = iter(pipe.execute())
        for entry_id in bare:
            found = [next(replies) for _ in streams]
            holders[entry_id] = [s for s, reply in zip(streams, found, strict=True) if reply]
    refs: list[DeadLetterRef] = []
    problems: list[str] = []
    for item in wanted:
        stream, _, entry_id = item.rpartition("/")
        if stream:
            if stream in streams:
                refs.append(DeadLetterRef(stream, entry_id))
            else:
                problems.append(f"{item}: {stream} is not a DLQ of this deployment")
            continue
        where = holders[item]
        if len(where) == 1:
            refs.append(DeadLetterRef(where[0], item))
        elif where:
            problems.append(f"{item}: in {len(where)} DLQs ({', '.join(where)}): give STREAM/ID")
        else:
            problems.append(f"{item}: not in any DLQ")
    return refs, problems


def _dlq_replay(configured: Settings, args: argparse.Namespace) -> int:
    if not args.ids and not args.all:
        print("ctxd dlq replay: give --id ID (repeatable) or --all")
        return 2
    with client_redis(configured) as redis:
        settings = command_settings(configured, redis)
        if not settings.cluster:
            return _replay_single(redis, settings, args)
        streams = dead_letter_streams(settings, partition_count(redis, settings))
        if args.ids:
            refs, problems = _resolve(redis, streams, args.ids)
        else:
            refs = [
                DeadLetterRef(entry.stream, entry.entry_id)
                for entry in oldest(redis, streams, count=2**31)
            ]
            problems = []
        for ref in refs:
            new = replay_across_slots(redis, settings, ref)
            if new == "cut":
                problems.append(_cut_line(str(ref)))
            elif new:
                print(f"{ref} -> {settings.input_stream} {new}")
            else:
                problems.append(f"{ref}: not in the DLQ any more")
    for line in problems:
        print(line)
    return 1 if problems else 0


def _replay_single(redis: SyncRedis, settings: Settings, args: argparse.Namespace) -> int:
    ids = args.ids or [
        entry_id
        for entry_id, _ in cast(list[tuple[str, object]], redis.xrange(settings.dlq_stream))
    ]
    new_ids = replay_dead_letters(redis, settings, ids)
    missing = [i for i, new in zip(ids, new_ids, strict=True) if not new or new == "cut"]
    for old, new in zip(ids, new_ids, strict=True):
        if new == "cut":
            print(_cut_line(old))
        elif new:
            print(f"{old} -> {settings.input_stream} {new}")
        else:
            print(f"{old}: not in {settings.dlq_stream}")
    return 1 if missing else 0


def _cut_line(name: str) -> str:
    return (
        f"{name}: not replayed, its DLQ copy was cut (field ctxd_cut; "
        "CTXD_DLQ_FIELD_BYTES): send the original event again"
    )
