"""``ctxd state``, ``ctxd resume`` and ``ctxd rollback``: a workflow's state and time travel.

``state`` reads the checkpointer directly (read only). ``resume`` and ``rollback``
change a workflow, so they do not touch the checkpointer themselves: they append a
*control entry* to ``ctxd:in``, and the service applies it in the workflow's order
(actors/service/parking.py) and writes its result to ``ctxd:out`` (on a Redis Cluster: the
output stream of the workflow's partition), which the command waits for.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import anyio
from redis import Redis as SyncRedis

from actors.app.cli.common import (
    Subcommands,
    client_redis,
    command_settings,
    open_command_checkpointer,
)
from actors.app.cli.merged import workflow_partitions
from actors.config import Settings
from actors.runtime.redis_io import xread_text, xrevrange_text
from actors.service.parking import parked_stream, resume_fields, rollback_fields
from actors.service.partitions import dlq_stream_of, output_stream_of
from graph.errors import ConfigError, CtxdError
from graph.history import (
    CheckpointInfo,
    checkpoint_history,
    checkpoint_ids,
    inspect_checkpoint,
    is_intact,
)
from graph.json_values import as_float, as_int, as_list, as_object, as_objects
from graph.state import JSON
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow

__all__ = ["format_state", "format_unfit", "register"]


def register(commands: Subcommands) -> None:
    """Add ``state``, ``resume`` and ``rollback`` to the command line."""
    state = commands.add_parser(
        "state",
        help="show a workflow's state (and its checkpoints)",
        description="Show a workflow's current context, segments and last decisions.",
    )
    state.add_argument("workflow_id", metavar="WORKFLOW_ID")
    state.add_argument("--history", action="store_true", help="also list its checkpoints")
    state.add_argument("--limit", type=int, default=20, help="checkpoints to list (default 20)")
    state.add_argument("--json", action="store_true", help="print raw values as JSON")
    state.set_defaults(handler=_state)

    resume = commands.add_parser(
        "resume",
        help="continue a workflow paused for a person (escalation)",
        description="Answer a paused escalation; the service applies it in the workflow's "
        'order. VALUE is JSON; {"decision": "standard_quality_path"} overrides the decision.',
    )
    resume.add_argument("workflow_id", metavar="WORKFLOW_ID")
    resume.add_argument("--value", default="null", help="the answer, as JSON (default null)")
    resume.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the result")
    resume.set_defaults(handler=_resume)

    rollback = commands.add_parser(
        "rollback",
        help="make an older checkpoint current (a fork; history is kept)",
        description="Roll a workflow back to CHECKPOINT_ID (see `ctxd state --history`).",
    )
    rollback.add_argument("workflow_id", metavar="WORKFLOW_ID")
    rollback.add_argument("--to", required=True, metavar="CHECKPOINT_ID", dest="checkpoint_id")
    rollback.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the result")
    rollback.set_defaults(handler=_rollback)


# -- reading the checkpointer -----------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    values: Mapping[str, JSON]
    checkpoint_id: str | None
    paused: bool
    history: list[CheckpointInfo]
    problems: list[str]  # where the current checkpoint does not fit the schema


async def _read_state(settings: Settings, workflow_id: str, *, history_limit: int | None) -> _Read:
    async with open_command_checkpointer(
        settings, memory_hint="use redis or postgres to inspect workflows from the command line"
    ) as saver:
        graph = build_contextual_workflow(LocalDispatch(), saver)
        # A checkpoint that does not fit the schema (or does not decode) is shown as
        # such, never rendered field by field: its values may be anything.
        snapshot, problems = await inspect_checkpoint(graph, workflow_id)
        if snapshot is None:
            newest = await checkpoint_ids(graph, workflow_id, limit=1)
            checkpoint_id = newest[0] if newest else None
        else:
            checkpoint_id = snapshot.config.get("configurable", {}).get("checkpoint_id")
        history = (
            await checkpoint_history(graph, workflow_id, limit=history_limit)
            if history_limit is not None
            else []
        )
        return _Read(
            values=cast(Mapping[str, JSON], snapshot.values if snapshot else {}) or {},
            checkpoint_id=checkpoint_id,
            paused=bool(snapshot.interrupts) if snapshot else False,
            history=history,
            problems=problems,
        )


def _state(settings: Settings, args: argparse.Namespace) -> int:
    limit = max(args.limit, 1) if args.history else None
    read = anyio.run(lambda: _read_state(settings, args.workflow_id, history_limit=limit))
    values, checkpoint_id, paused, history = (
        read.values,
        read.checkpoint_id,
        read.paused,
        read.history,
    )
    if not values and not read.problems:
        raise CtxdError(f"workflow {args.workflow_id!r} has no state yet: send it an event first")
    with client_redis(settings) as redis:
        parked = int(redis.xlen(parked_stream(settings, args.workflow_id)))
    if args.json:
        document: dict[str, JSON] = {
            "workflow_id": args.workflow_id,
            "checkpoint_id": checkpoint_id,
            "paused": paused,
            "parked": parked,
            "values": dict(values),
            "problems": list(read.problems),
        }
        if args.history:
            document["history"] = [
                {k: v for k, v in vars(info).items() if k != "values"} for info in history
            ]
        print(json.dumps(document, indent=2, sort_keys=True, default=str))
        return 0
    if read.problems:
        print(format_unfit(args.workflow_id, checkpoint_id, read.problems, parked=parked))
    else:
        print(format_state(args.workflow_id, values, checkpoint_id, paused=paused, parked=parked))
    if args.history:
        print("\ncheckpoints (newest first):")
        for info in history:
            print(_format_checkpoint(info, current=info.checkpoint_id == checkpoint_id))
    return 0


def _short(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def format_state(
    workflow_id: str,
    values: Mapping[str, JSON],
    checkpoint_id: str | None,
    *,
    paused: bool = False,
    parked: int = 0,
) -> str:
    """A workflow's state as a person reads it: key values, segments, last decisions."""
    health = as_object(values.get("health"))
    lines = [
        f"workflow {workflow_id}",
        f"  checkpoint       {checkpoint_id or '-'}",
        f"  status           {'PAUSED (waiting for `ctxd resume`)' if paused else 'active'}"
        + (f", {parked} event(s) parked" if parked else ""),
        f"  events processed {as_int(values.get('events_processed'))}",
        f"  quality          {as_float(values.get('quality')):.3f}",
        f"  integrity        {'intact' if is_intact(values) else 'CHANGED OUTSIDE THE GRAPH'}"
        f" (last check: {health.get('state_integrity', '-')})",
        f"  errors           {as_int(values.get('error_count'))}",
        f"  analysis         {_short(str(values.get('analysis') or '-'), 100)}",
        f"  segment          #{as_int(values.get('segment'))}, "
        f"{len(as_list(values.get('window')))} event(s) in the window",
    ]
    segments = as_objects(values.get("segments"))
    if segments:
        lines.append("closed segments:")
        for seg in segments[-5:]:
            lines.append(
                f"  #{seg.get('segment')} {seg.get('events')} event(s), rollback point "
                f"{seg.get('checkpoint_id') or '-'}: {_short(str(seg.get('summary', '')), 80)}"
            )
    decisions = as_objects(values.get("decisions"))
    if decisions:
        lines.append("last decisions:")
        for record in decisions[-5:]:
            name = str(record.get("decision", "?"))
            score = as_object(record.get("scores")).get(name)
            shown = f" score={float(score):.3f}" if isinstance(score, int | float) else ""
            resolved = " (resolved by a person)" if "resolution" in record else ""
            lines.append(f"  event {record.get('event_id')}: {name}{shown}{resolved}")
    return "\n".join(lines)


def format_unfit(
    workflow_id: str, checkpoint_id: str | None, problems: list[str], *, parked: int = 0
) -> str:
    """A current checkpoint that does not fit the schema: what is wrong, what happens next."""
    lines = [
        f"workflow {workflow_id}",
        f"  checkpoint       {checkpoint_id or '-'}",
        "  state            does not fit the schema: "
        + _short("; ".join(problems), 300)
        + (f", {parked} event(s) parked" if parked else ""),
        "  next event       the service rolls the workflow back to its last good checkpoint",
        "                   (or starts a fresh segment) and reports it in that output's error",
    ]
    return "\n".join(lines)


def _format_checkpoint(info: CheckpointInfo, *, current: bool) -> str:
    flags = [f for f, on in (("paused", info.paused), ("CHANGED", not info.intact)) if on]
    if info.problems:
        flags.append("does not fit the schema: " + _short("; ".join(info.problems), 160))
    return (
        f"{'*' if current else ' '} {info.checkpoint_id}  {info.created_at or '-':32}  "
        f"{info.source:6} step={info.step:<4} events={info.events_processed:<5} "
        f"{' '.join(flags)}"
    ).rstrip()


# -- control entries ----------------------------------------------------------------


def _append_and_wait(configured: Settings, fields: dict[str, str], wait: float) -> int:
    with client_redis(configured) as redis:
        settings = command_settings(configured, redis)
        # The entry ends in an output or, refused by the input checks, in the DLQ.
        outputs, dead_letters = _result_streams(redis, settings, fields["workflow_id"])
        last = {
            stream: recent[0][0] if (recent := xrevrange_text(redis, stream, 1)) else "0-0"
            for stream in (*outputs, *dead_letters)
        }
        entry_id = str(redis.xadd(settings.input_stream, fields))  # type: ignore[arg-type]
        print(f"queued {fields['control']} as {entry_id}")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            block = max(1, int(min(1.0, deadline - time.monotonic()) * 1000))
            for stream in last:
                for out_id, out in xread_text(redis, stream, last[stream], block=block):
                    last[stream] = out_id
                    if out.get("source_id") != entry_id:
                        continue
                    if stream in dead_letters:
                        why = " ".join((out.get("error") or "").split())[:500]
                        print(f"{fields['control']}: refused ({out.get('reason')}): {why}")
                        return 1
                    print(_control_outcome(fields["control"], out))
                    return 0 if out.get("status") != "error" else 1
                block = 1  # the first stream waited; the second is only looked at
    print("no result yet: the service applies it when it reads the entry (see `ctxd tail`)")
    return 0


def _result_streams(
    redis: SyncRedis, settings: Settings, workflow_id: str
) -> tuple[list[str], list[str]]:
    """Where a control entry's result can appear: output streams, then DLQs.

    One node: ``ctxd:out`` and ``ctxd:dlq``. A cluster: the output stream and the DLQ of
    the workflow's partition, partition 0's DLQ (entries without a usable workflow id)
    and the shared ``ctxd:dlq``; each is read on its own (they are in different slots).
    """
    if not settings.cluster:
        return [settings.output_stream], [settings.dlq_stream]
    parts = workflow_partitions(redis, settings, workflow_id)
    dead_letters = [dlq_stream_of(settings, n) for n in sorted({*parts, 0})]
    return [output_stream_of(settings, n) for n in parts], [*dead_letters, settings.dlq_stream]


def _control_outcome(control: str, out: Mapping[str, str]) -> str:
    """One line for a control entry's output; a failure says why (the output's error)."""
    if out.get("status") == "error":
        why = " ".join((out.get("error") or "").split()) or (
            "the output has no error field: the service predates it; upgrade the service"
        )
        return f"{control}: status=error: {why}"
    return (
        f"{control}: status={out.get('status')} "
        f"decision={out.get('decision') or '-'} "
        f"checkpoint={out.get('checkpoint_id') or '-'}"
    )


def _resume(settings: Settings, args: argparse.Namespace) -> int:
    try:
        value = json.loads(args.value)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--value {args.value!r} is not JSON ({exc.msg}): quote strings"
        ) from None
    return _append_and_wait(settings, resume_fields(args.workflow_id, value), args.wait)


def _rollback(settings: Settings, args: argparse.Namespace) -> int:
    return _append_and_wait(
        settings, rollback_fields(args.workflow_id, args.checkpoint_id), args.wait
    )
