"""The records ctxd writes to its streams, and the streams' upkeep.

- :func:`output_fields` is the one builder of a ``ctxd:out`` entry (from a result, the
  graph's or :func:`event_result`), :func:`dlq_entry`
  of a DLQ entry (each field cut to a prefix, with a marker), :func:`done_key` of an
  event's dedupe key.
- :func:`ensure_group` creates a consumer group (``MKSTREAM``), tolerating ``BUSYGROUP``;
  :func:`trim_acknowledged` and :func:`trim_bounded_streams` keep streams bounded.

The writes themselves (commits, DLQ moves, fenced reads) are in
:mod:`actors.service.gateway`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.runtime.redis_io import ensure_group
from actors.service.partitions import (
    dlq_stream_of,
    output_stream_of,
    partition_key,
    workflow_partition,
)
from graph.state import JSON

__all__ = [
    "DLQ_CUT_FIELD",
    "DLQ_MIN_FIELDS",
    "OUTPUT_ERROR_CHARS",
    "bounded_error",
    "dlq_entry",
    "done_key",
    "done_key_pattern",
    "ensure_group",
    "event_result",
    "output_fields",
    "trim_acknowledged",
    "trim_bounded_streams",
]


def done_key(settings: Settings, workflow_id: str, event_id: str) -> str:
    """The dedupe key of one event: ``{prefix}:{p<n>}:done:{workflow_id}/{event_id}``.

    An ``event_id`` is an idempotency key within its workflow only (two workflows may
    use the same one). Workflow ids cannot contain ``/``, so the key is unambiguous and
    one workflow's keys are :func:`done_key_pattern` for ``SCAN MATCH``.
    """
    n = workflow_partition(settings, workflow_id)
    return partition_key(settings, n, "done", f"{workflow_id}/{event_id}")


def done_key_pattern(settings: Settings, workflow_id: str) -> str:
    """``SCAN MATCH`` pattern of one workflow's dedupe keys (its ids hold no glob characters)."""
    n = workflow_partition(settings, workflow_id)
    return partition_key(settings, n, "done", f"{workflow_id}/*")


DLQ_CUT_FIELD = "ctxd_cut"
"""A DLQ entry whose copy was cut has this field saying what was cut (docs/operations.md)."""

DLQ_MIN_FIELDS = 64
"""A DLQ copy keeps at least this many original fields (``CTXD_MAX_FIELDS`` if more)."""

_DLQ_OWN_FIELDS = frozenset({"reason", "error", "attempts", "source_id", DLQ_CUT_FIELD})
_DLQ_NAME_BYTES = 256
_DLQ_ERROR_BYTES = 1000
_SOURCE_FIELD = "ctxd_source_id"  # = actors.service.input_routing.SOURCE_FIELD (it imports us)


def dlq_entry(
    fields: Mapping[str, str | bytes] | Mapping[bytes, bytes] | Mapping[str | bytes, str | bytes],
    *,
    reason: str,
    error: str,
    attempts: int,
    source_id: str,
    field_bytes: int = 4096,
    max_fields: int = DLQ_MIN_FIELDS,
    original_id: str | None = None,
) -> dict[bytes, bytes]:
    """The DLQ copy of an entry: its fields, bounded, plus ``reason``, ``error``,
    ``attempts`` and ``source_id``.

    Whatever the entry holds (10,000 fields, a 10 MB value, bytes that are not UTF-8),
    the copy has at most ``max(max_fields, DLQ_MIN_FIELDS)`` original fields, each name
    at most 256 bytes and each value at most ``field_bytes`` bytes before its marker
    ``…[cut N bytes]`` (cut on a UTF-8 character boundary); when anything was cut or
    left out, the field ``ctxd_cut`` says what. So no DLQ write can overflow Lua's
    ``unpack`` or hold a whole hostile payload. Values are copied as bytes.

    The DLQ's ``source_id`` is ``original_id`` if given, else the entry's
    ``ctxd_source_id`` field (a partition entry's ``ctxd:in`` id), else ``source_id``.
    """
    keep = max(max_fields, DLQ_MIN_FIELDS)
    entry: dict[bytes, bytes] = {}
    cut: list[str] = []
    dropped = 0
    original: bytes | None = None
    for name, value in fields.items():
        key = _as_bytes(name)
        if key == _SOURCE_FIELD.encode():
            original = _as_bytes(value)
            continue
        if key.decode("utf-8", "replace") in _DLQ_OWN_FIELDS:
            continue  # ours replace them
        short_key, key_cut = _cut(key, _DLQ_NAME_BYTES)
        if len(entry) >= keep or short_key in entry:
            dropped += 1
            continue
        short_value, value_cut = _cut(_as_bytes(value), field_bytes)
        entry[short_key] = short_value
        if key_cut or value_cut:
            cut.append(repr(key[:40].decode("utf-8", "replace")))
    entry[b"reason"] = reason.encode("utf-8", "replace")
    entry[b"error"] = _cut(_as_bytes(error), _DLQ_ERROR_BYTES)[0]
    entry[b"attempts"] = str(attempts).encode()
    if original_id is not None:
        original = original_id.encode("utf-8", "replace")
    entry[b"source_id"] = _cut(original, 200)[0] if original is not None else source_id.encode()
    if cut or dropped:
        notes = []
        if cut:
            shown = ", ".join(cut[:8]) + (f" and {len(cut) - 8} more" if len(cut) > 8 else "")
            notes.append(
                f"{len(cut)} field(s) cut to {field_bytes} bytes (CTXD_DLQ_FIELD_BYTES; "
                f"names to {_DLQ_NAME_BYTES}): {shown}"
            )
        if dropped:
            notes.append(
                f"{dropped} field(s) not copied (the entry had {len(fields)} fields; "
                f"the first {len(entry) - 4} are kept)"
            )
        entry[DLQ_CUT_FIELD.encode()] = "; ".join(notes).encode("utf-8", "replace")
    return entry


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "backslashreplace")  # a lone surrogate cannot be sent


def _cut(value: bytes, limit: int) -> tuple[bytes, bool]:
    """``value`` cut to ``limit`` bytes (backing off to a UTF-8 character boundary) with
    the marker ``…[cut N bytes]``; whether it was cut."""
    if len(value) <= limit:
        return value, False
    end = limit
    for _ in range(3):  # a UTF-8 character is at most 4 bytes: never split one
        if end > 0 and (value[end] & 0xC0) == 0x80:
            end -= 1
    return value[:end] + f"…[cut {len(value) - end} bytes]".encode(), True


OUTPUT_ERROR_CHARS = 500
"""Upper bound of an output's ``error`` field, in characters (a marker shows a cut)."""


def output_fields(
    result: Mapping[str, object], *, trace_id: str, checkpoint_id: str
) -> dict[str, str]:
    """The ``ctxd:out`` entry for one event's result (DESIGN's output contract).

    Every output carries ``error``: empty when nothing failed for the event, else the
    failed step's exception type and message (bounded to :data:`OUTPUT_ERROR_CHARS`).
    Every output path (batches, parking replays, control entries, interrupted runs)
    builds its fields here, so none can leave it out.
    """
    return {
        "workflow_id": str(result.get("workflow_id", "")),
        "event_id": str(result.get("event_id", "")),
        "source_id": str(result.get("source_id", "")),
        "status": str(result.get("status", "ok")),
        "decision": str(result.get("decision") or ""),
        "route": json.dumps(result.get("route") or []),
        "quality_score": f"{float(result.get('quality_score') or 0.0):.6f}",  # type: ignore[arg-type]
        "scores": json.dumps(result.get("scores") or {}, sort_keys=True),
        "trace_id": trace_id,
        "checkpoint_id": checkpoint_id,
        "error": bounded_error(str(result.get("error") or "")),
    }


def event_result(
    workflow_id: str,
    event_id: str,
    source_id: str,
    *,
    status: str,
    route: Sequence[str] = (),
    error: str = "",
) -> dict[str, JSON]:
    """The result of an event the graph gave none for (a control entry, an interrupted
    run): every field :func:`output_fields` reads, so such an output has the same
    shape as any other."""
    return {
        "workflow_id": workflow_id,
        "event_id": event_id,
        "source_id": source_id,
        "status": status,
        "decision": "",
        "route": list(route),
        "quality_score": 0.0,
        "scores": {},
        "error": error,
    }


def bounded_error(text: str, limit: int = OUTPUT_ERROR_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters with a ``…`` marker."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def trim_acknowledged(redis: Redis, stream: str) -> int:
    """Trim entries every group on ``stream`` has acknowledged; return how many went.

    Redis 7.4 has no ``ACKED`` trimming (8.2+), so this trims with ``MINID`` below the
    lowest id still pending in any group, and never past any group's last-delivered id
    (entries not read yet are kept). A stream with no group is left alone.
    """
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return 0  # no such stream
    if not groups:
        return 0
    bounds: list[tuple[int, int]] = []
    for group in groups:
        name = group["name"]
        last = _id_tuple(group["last-delivered-id"])
        bound = (last[0], last[1] + 1)  # everything up to and including last is delivered
        if int(group["pending"]):
            summary = await redis.xpending(stream, name)
            # None: acknowledged since XINFO (a race that a 1 s trim interval hits)
            if summary.get("min") is not None:
                bound = min(bound, _id_tuple(summary["min"]))
        bounds.append(bound)
    low = min(bounds)
    if low <= (0, 0):
        return 0
    return int(await redis.xtrim(stream, minid=f"{low[0]}-{low[1]}", approximate=False))


async def trim_bounded_streams(
    redis: Redis, settings: Settings, partitions: Iterable[int] | None = None
) -> int:
    """Trim the output and dead-letter streams to ``CTXD_OUTPUT_MAXLEN`` / ``CTXD_DLQ_MAXLEN``.

    On a single node that is ``ctxd:out`` and ``ctxd:dlq``. On a Redis Cluster each
    partition has its own output stream and DLQ: each is trimmed to its share of the
    bound, ``ceil(maxlen / CTXD_PARTITIONS)``, so the whole deployment keeps about the
    same number of results as one node would (a busy partition keeps no more than a quiet
    one). The shared ``ctxd:dlq`` (dead letters of no partition) is trimmed to the same
    share, along with partition 0.

    ``MAXLEN ~`` trims whole macro nodes only (cheap: up to ~100 more entries per
    stream); a bound of 0 leaves the streams alone. Returns how many entries went.

    Args:
        redis: the service's client.
        settings: names, bounds and the layout.
        partitions: on a cluster, trim only these partitions' streams (an owner trims
            its own); ``None`` trims every partition's. Ignored on a single node.
    """
    bounds: list[tuple[str, int]] = []
    if not settings.cluster:
        bounds = [
            (settings.output_stream, settings.output_maxlen),
            (settings.dlq_stream, settings.dlq_maxlen),
        ]
    else:
        out_share = -(-settings.output_maxlen // settings.partitions)
        dlq_share = -(-settings.dlq_maxlen // settings.partitions)
        chosen = sorted(set(range(settings.partitions) if partitions is None else partitions))
        for n in chosen:
            bounds += [(output_stream_of(settings, n), out_share)]
            bounds += [(dlq_stream_of(settings, n), dlq_share)]
        if 0 in chosen:
            bounds.append((settings.dlq_stream, dlq_share))
    bounds = [(stream, maxlen) for stream, maxlen in bounds if maxlen]
    if not bounds:
        return 0
    # One trim per stream (each in its own slot on a cluster), pipelined.
    pipe = redis.pipeline(transaction=False)
    for stream, maxlen in bounds:
        pipe.xtrim(stream, maxlen=maxlen, approximate=True)
    return sum(int(n) for n in await pipe.execute())


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
