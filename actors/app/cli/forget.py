"""``ctxd forget WORKFLOW_ID``: delete one workflow's state, for data-deletion requests.

It deletes every checkpoint of the workflow with its writes, write registry and index
entries (or rows and blobs on PostgreSQL), its parked stream, its dedupe keys
(``{prefix}:done:{workflow_id}/*``) and its entry in the idle-workflow index. Inputs
and outputs already in ``ctxd:in``/``ctxd:out``/the DLQ are not touched: they belong
to their producers and readers (and age out with ``CTXD_OUTPUT_MAXLEN``/``CTXD_DLQ_MAXLEN``).

It refuses while the workflow is being processed — an entry of it pending (read, not
yet committed: in flight or queued in an instance) or not yet delivered in its
partition stream or in ``ctxd:in`` — because a run in progress would write its state
back. ``--force`` deletes anyway.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import anyio
from redis import Redis as SyncRedis
from redis.exceptions import ResponseError

from actors.app.cli.common import (
    Subcommands,
    client_redis,
    command_settings,
    open_command_checkpointer,
    recorded_count,
)
from actors.config import Settings
from actors.service.input_routing import cursor_key
from actors.service.parking import parked_stream
from actors.service.partitions import (
    output_stream_of,
    partition_of,
    partition_stream,
    workflow_partition,
)
from actors.service.retention import workflows_key
from actors.service.streams import done_key_pattern
from graph.errors import CtxdError
from graph.retention import delete_workflow_state

__all__ = ["ForgetReport", "WorkflowBusyError", "forget_workflow", "queued_entries", "register"]

_SCAN_BOUND = 10_000
"""Entries of a stream looked at to tell whether a workflow is queued; beyond it the
command cannot tell and refuses (without ``--force``)."""


_WORKFLOW_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


class WorkflowBusyError(CtxdError):
    """The workflow has entries being processed or waiting: forgetting it now would be
    undone by the run in progress."""


@dataclass(frozen=True)
class ForgetReport:
    """What ``forget`` deleted.

    Attributes:
        checkpoints: checkpoints deleted.
        dedupe_keys: done keys deleted.
        parked: parked events deleted (inputs that will get no output).
    """

    checkpoints: int
    dedupe_keys: int
    parked: int


def register(commands: Subcommands) -> None:
    """Add ``forget`` to the command line."""
    forget = commands.add_parser(
        "forget",
        help="delete one workflow's state and dedupe keys (data-deletion requests)",
        description="Delete every checkpoint (with writes, registry and index entries), "
        "the parked events and the dedupe keys of WORKFLOW_ID. Refused while the workflow "
        "has entries in flight, queued or not yet delivered (its partition's pending list, "
        f"its partition stream, {'{prefix}'}:in), unless --force. Outputs and dead letters "
        "already written are not touched.",
    )
    forget.add_argument("workflow_id", metavar="WORKFLOW_ID")
    forget.add_argument(
        "--force", action="store_true", help="delete even while the workflow is being processed"
    )
    forget.set_defaults(handler=_forget)


def _entries_of(redis: SyncRedis, stream: str, ids: list[str], workflow_id: str) -> int:
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, entry_id, entry_id)
    found = 0
    for entries in pipe.execute():
        for _, fields in cast(list[tuple[str, dict[str, str]]], entries):
            found += fields.get("workflow_id") == workflow_id
    return found


def _stream_queue(redis: SyncRedis, stream: str, group: str, workflow_id: str) -> int:
    """Entries of the workflow pending in ``group`` or not yet delivered to it."""
    try:
        groups = cast(list[dict[str, object]], redis.xinfo_groups(stream))
    except ResponseError:
        return 0  # no stream yet
    found = 0
    for info in groups:
        if info.get("name") != group:
            continue
        pending = cast(
            list[dict[str, object]],
            redis.xpending_range(stream, group, min="-", max="+", count=_SCAN_BOUND + 1),
        )
        if len(pending) > _SCAN_BOUND:
            raise WorkflowBusyError(
                f"{stream} has more than {_SCAN_BOUND} pending entries: cannot tell whether "
                "the workflow is among them; try again when the backlog is smaller, or --force"
            )
        found += _entries_of(redis, stream, [str(p["message_id"]) for p in pending], workflow_id)
        last = str(info.get("last-delivered-id") or "0-0")
        undelivered = cast(
            list[tuple[str, dict[str, str]]],
            redis.xrange(stream, f"({last}", "+", count=_SCAN_BOUND + 1),
        )
        if len(undelivered) > _SCAN_BOUND:
            raise WorkflowBusyError(
                f"{stream} has more than {_SCAN_BOUND} undelivered entries: cannot tell "
                "whether the workflow is among them; try again later, or --force"
            )
        found += sum(f.get("workflow_id") == workflow_id for _, f in undelivered)
    return found


def queued_entries(redis: SyncRedis, settings: Settings, workflow_id: str) -> int:
    """Entries of the workflow in flight, queued or undelivered (partition and ``ctxd:in``).

    Raises:
        WorkflowBusyError: a backlog too long to look through.
    """
    n = partition_of(workflow_id, settings.partitions)
    return _stream_queue(
        redis, partition_stream(settings, n), settings.group, workflow_id
    ) + _input_queue(redis, settings, n, workflow_id)


def _input_queue(redis: SyncRedis, settings: Settings, n: int, workflow_id: str) -> int:
    """The workflow's ``ctxd:in`` entries its partition has not moved yet: those after
    the partition's cursor (actors/service/router.py).

    Raises:
        WorkflowBusyError: more than the scan bound waits there.
    """
    cursor = cast(str | None, redis.get(cursor_key(settings, n))) or "0-0"
    waiting = cast(
        list[tuple[str, dict[str, str]]],
        redis.xrange(settings.input_stream, f"({cursor}", "+", count=_SCAN_BOUND + 1),
    )
    if len(waiting) > _SCAN_BOUND:
        raise WorkflowBusyError(
            f"{settings.input_stream} has more than {_SCAN_BOUND} entries not routed yet: "
            "cannot tell whether the workflow is among them; try again later, or --force"
        )
    return sum(f.get("workflow_id") == workflow_id for _, f in waiting)


def _scan(redis: SyncRedis, pattern: str) -> Iterator[str]:
    yield from cast(Iterator[str], redis.scan_iter(match=pattern, count=1000))


async def _delete_checkpoints(settings: Settings, workflow_id: str) -> int:
    async with open_command_checkpointer(
        settings, memory_hint="restarting the service forgets every workflow"
    ) as saver:
        return await delete_workflow_state(saver, workflow_id)


def forget_workflow(
    redis: SyncRedis, settings: Settings, workflow_id: str, *, force: bool = False
) -> ForgetReport:
    """Delete the workflow's state, parked events and dedupe keys.

    Raises:
        WorkflowBusyError: the workflow is being processed and ``force`` is False.
    """
    if not _WORKFLOW_ID.fullmatch(workflow_id):
        raise CtxdError(
            f"{workflow_id[:80]!r} is not a workflow id: 1-200 characters of "
            "letters, digits and _ . : -"
        )
    settings = recorded_count(redis, settings)
    if not force:
        queued = queued_entries(redis, settings, workflow_id)
        if queued:
            raise WorkflowBusyError(
                f"workflow {workflow_id!r} is being processed: {queued} of its entries are "
                "in flight, queued or not yet delivered; run forget once its outputs are "
                f"in {output_stream_of(settings, workflow_partition(settings, workflow_id))}, "
                "or use --force"
            )
    checkpoints = anyio.run(_delete_checkpoints, settings, workflow_id)
    parked = parked_stream(settings, workflow_id)
    parked_count = int(redis.xlen(parked))
    dedupe = 0
    batch: list[str] = []
    for key in _scan(redis, done_key_pattern(settings, workflow_id)):
        batch.append(key)
        if len(batch) == 500:
            dedupe += int(redis.unlink(*batch))
            batch = []
    if batch:
        dedupe += int(redis.unlink(*batch))
    pipe = redis.pipeline(transaction=True)
    pipe.delete(parked)
    pipe.zrem(workflows_key(settings, partition_of(workflow_id, settings.partitions)), workflow_id)
    pipe.execute()
    return ForgetReport(checkpoints=checkpoints, dedupe_keys=dedupe, parked=parked_count)


def _forget(configured: Settings, args: argparse.Namespace) -> int:
    with client_redis(configured) as redis:
        settings = command_settings(configured, redis)
        report = forget_workflow(redis, settings, args.workflow_id, force=args.force)
    print(
        f"forgot {args.workflow_id}: {report.checkpoints} checkpoint(s), "
        f"{report.dedupe_keys} dedupe key(s), {report.parked} parked event(s)"
    )
    return 0
