"""Redis Streams operations with the delivery guarantees in them.

- :func:`ensure_group` creates a consumer group (``MKSTREAM``), tolerating ``BUSYGROUP``.
- :class:`OutputCommitter` writes results effectively-once: for each event, in one Lua
  script, ``SET done:{workflow_id}/{event_id} NX`` (:func:`done_key`) then ``XADD out``
  only if the key was new, then ``XACK`` the input. A crash before the script leaves
  the input pending (it will be redelivered, and the workflow's outbox answers it
  without reprocessing); a crash after it leaves nothing to redo. A repeated
  ``event_id`` within a workflow is acknowledged without a second output.
- :func:`dead_letter` moves an entry to the DLQ and acknowledges it in one MULTI; the
  copy is bounded by :func:`dlq_entry` (each field cut to a prefix, with a marker).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.runtime.redis_io import ensure_group  # re-exported: callers import it from here

__all__ = [
    "DLQ_CUT_FIELD",
    "OUTPUT_ERROR_CHARS",
    "CommitItem",
    "FencedReader",
    "OutputCommitter",
    "bounded_error",
    "dead_letter",
    "dlq_entry",
    "done_key",
    "done_key_pattern",
    "ensure_group",
    "output_fields",
    "trim_acknowledged",
    "trim_bounded_streams",
]

# KEYS: out, in, lease, done_1..done_n. ARGV: group, ttl, n, lease value ("" = unfenced),
# then per item: source_id, nfields, field/value pairs. Returns, per item, the output
# entry id or "" for a duplicate; an error FENCED when the lease is not ours any more.
_COMMIT_LUA = """
local group, ttl, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return redis.error_reply('FENCED the partition lease was lost to another instance')
end
local pos, ids = 5, {}
for i = 1, n do
  local source_id, nfields = ARGV[pos], tonumber(ARGV[pos + 1])
  local fields = {}
  for j = 1, nfields * 2 do fields[j] = ARGV[pos + 1 + j] end
  pos = pos + 2 + nfields * 2
  local done = KEYS[3 + i]
  if nfields > 0 and redis.call('SET', done, 'pending', 'NX', 'EX', ttl) then
    local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
    redis.call('SET', done, id, 'EX', ttl)
    ids[i] = id
  else
    ids[i] = ''
  end
  redis.call('XACK', KEYS[2], group, source_id)
end
return ids
"""


def done_key(settings: Settings, workflow_id: str, event_id: str) -> str:
    """The dedupe key of one event: ``{prefix}:done:{workflow_id}/{event_id}``.

    An ``event_id`` is an idempotency key within its workflow only (two workflows may
    use the same one). Workflow ids cannot contain ``/``, so the key is unambiguous and
    one workflow's keys are :func:`done_key_pattern` for ``SCAN MATCH``.
    """
    return settings.key("done", f"{workflow_id}/{event_id}")


def done_key_pattern(settings: Settings, workflow_id: str) -> str:
    """``SCAN MATCH`` pattern of one workflow's dedupe keys (its ids hold no glob characters)."""
    return settings.key("done", f"{workflow_id}/*")


@dataclass(frozen=True)
class CommitItem:
    """One event's output, ready to commit.

    Attributes:
        source_id: the input entry id to acknowledge.
        done_key: the dedupe key of the event id.
        fields: the output entry's fields.
    """

    source_id: str
    done_key: str
    fields: Mapping[str, str]


class OutputCommitter:
    """Writes outputs and acknowledges inputs atomically, suppressing duplicates.

    Args:
        redis: the client.
        input_stream: the stream whose entries are acknowledged.
        output_stream: the stream results are appended to.
        group: the consumer group.
        dedupe_ttl: seconds a done key lives (the window in which duplicates are caught).
    """

    def __init__(
        self, redis: Redis, *, input_stream: str, output_stream: str, group: str, dedupe_ttl: int
    ) -> None:
        self._script = redis.register_script(_COMMIT_LUA)
        self._input = input_stream
        self._output = output_stream
        self._group = group
        self._ttl = dedupe_ttl

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> OutputCommitter:
        """The committer of ``ctxd:in`` → ``ctxd:out`` for these settings."""
        return cls(
            redis,
            input_stream=settings.input_stream,
            output_stream=settings.output_stream,
            group=settings.group,
            dedupe_ttl=settings.dedupe_ttl,
        )

    async def commit(
        self,
        items: Sequence[CommitItem],
        *,
        input_stream: str | None = None,
        lease: tuple[str, str] | None = None,
    ) -> list[str]:
        """Commit ``items`` in one script; return output ids ("" where a duplicate).

        Args:
            items: the events' outputs.
            input_stream: the stream to acknowledge in (default: the committer's).
            lease: ``(key, value)`` of the lease the write is fenced by; the script
                refuses (``ResponseError`` "FENCED ...") when the key holds another value.
        """
        if not items:
            return []
        lease_key, lease_value = lease or (self._output, "")
        keys = [
            self._output,
            input_stream or self._input,
            lease_key,
            *(item.done_key for item in items),
        ]
        args: list[str | int] = [self._group, self._ttl, len(items), lease_value]
        for item in items:
            args += [item.source_id, len(item.fields)]
            for name, value in item.fields.items():
                args += [name, value]
        result = await self._script(keys=keys, args=args)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in result]


# KEYS: lease, dlq, in. ARGV: lease value, group, source id, then field/value pairs
# (bounded by dlq_entry, so unpack stays far below Lua's limit of about 8,000 values).
_FENCED_DLQ_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease was lost to another instance')
end
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
  return ''
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
return id
"""


DLQ_CUT_FIELD = "ctxd_cut"
"""A DLQ entry whose copy was cut has this field saying what was cut (docs/operations.md)."""

DLQ_MIN_FIELDS = 64
"""A DLQ copy keeps at least this many original fields (``CTXD_MAX_FIELDS`` if more)."""

_DLQ_OWN_FIELDS = frozenset({"reason", "error", "attempts", "source_id", DLQ_CUT_FIELD})
_DLQ_NAME_BYTES = 256
_DLQ_ERROR_BYTES = 1000
_SOURCE_FIELD = "ctxd_source_id"  # = actors.service.router.SOURCE_FIELD (the router imports us)


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


async def dead_letter(
    redis: Redis,
    *,
    dlq_stream: str,
    input_stream: str,
    group: str,
    source_id: str,
    fields: Mapping[str, str | bytes] | Mapping[bytes, bytes] | Mapping[str | bytes, str | bytes],
    reason: str,
    error: str,
    attempts: int,
    lease: tuple[str, str] | None = None,
    field_bytes: int = 4096,
    max_fields: int = DLQ_MIN_FIELDS,
    original_id: str | None = None,
    done_key: str | None = None,
) -> str:
    """Append the entry to the DLQ with why, and acknowledge it, atomically.

    With ``done_key`` (needs ``lease``), an event whose output is already committed is
    only acknowledged and "" returned: a run whose commit reply was lost looks failed to
    its process, and must not end as a dead letter as well as an output.

    The copy is bounded by :func:`dlq_entry` (``field_bytes``, ``max_fields``), which
    also says where the DLQ's ``source_id`` comes from (``original_id`` first).
    With ``lease`` (key, value) the write is fenced like a commit: refused with
    "FENCED ..." unless the lease still holds the value.
    """
    entry = dlq_entry(
        fields,
        reason=reason,
        error=error,
        attempts=attempts,
        source_id=source_id,
        field_bytes=field_bytes,
        max_fields=max_fields,
        original_id=original_id,
    )
    if lease is not None:
        flat: list[str | bytes] = [lease[1], group, source_id]
        for name, value in entry.items():
            flat += [name, value]
        keys = [lease[0], dlq_stream, input_stream, *([done_key] if done_key else [])]
        script = redis.register_script(_FENCED_DLQ_LUA)
        dlq_id = await script(keys=keys, args=flat)
    else:
        if done_key is not None:
            raise ValueError("dead_letter(done_key=...) is checked in the fenced script only")
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(dlq_stream, entry)  # type: ignore[arg-type]
            pipe.xack(input_stream, group, source_id)
            dlq_id, _ = await pipe.execute()
    return dlq_id.decode() if isinstance(dlq_id, bytes) else str(dlq_id)


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


async def trim_bounded_streams(redis: Redis, settings: Settings) -> int:
    """Trim ``ctxd:out`` and the DLQ to ``CTXD_OUTPUT_MAXLEN`` / ``CTXD_DLQ_MAXLEN``.

    ``MAXLEN ~`` trims whole macro nodes only (cheap); a bound of 0 leaves the stream
    alone. Returns how many entries went.
    """
    trimmed = 0
    for stream, maxlen in (
        (settings.output_stream, settings.output_maxlen),
        (settings.dlq_stream, settings.dlq_maxlen),
    ):
        if maxlen:
            trimmed += int(await redis.xtrim(stream, maxlen=maxlen, approximate=True))
    return trimmed


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


# KEYS: lease, stream. ARGV: lease value, group, consumer, count, cursor.
_FENCED_READ_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease was lost to another instance')
end
local got = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                       'STREAMS', KEYS[2], ARGV[5])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {got, last}
"""


class FencedReader:
    """``XREADGROUP`` that only reads while the caller holds a lease.

    A reader whose lease expired (a paused process, a "zombie") must not move new
    entries into the group's pending list: the new lease holder has already read that
    list and would never see them, and they would be lost or reordered. Checking the
    lease and reading in one script closes that gap. Scripts cannot block, so when
    nothing new is there the caller waits with a plain ``XREAD BLOCK`` (:meth:`wait`)
    from the stream's last id.

    Args:
        redis: the client.
        group: the consumer group.
        consumer: the consumer name.
    """

    def __init__(self, redis: Redis, *, group: str, consumer: str) -> None:
        self._redis = redis
        self._script = redis.register_script(_FENCED_READ_LUA)
        self._group = group
        self._consumer = consumer

    async def read(
        self, stream: str, cursor: str, count: int, *, lease: tuple[str, str]
    ) -> tuple[list[tuple[str, dict[bytes, bytes] | None]], str]:
        """Read up to ``count`` entries after ``cursor`` (``>`` or a PEL id).

        Returns:
            The entries and the stream's last entry id ("0-0" when empty).

        Raises:
            ResponseError: "FENCED ..." when the lease no longer holds our value.
        """
        got, last = await self._script(
            keys=[lease[0], stream], args=[lease[1], self._group, self._consumer, count, cursor]
        )
        entries: list[tuple[str, dict[bytes, bytes] | None]] = []
        for _, stream_entries in got or []:
            for entry_id, flat in stream_entries:
                fields = None
                if flat is not None:
                    fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
                entries.append((_text(entry_id), fields))
        last_id = _text(last[0][0]) if last else "0-0"
        return entries, last_id

    async def wait(self, stream: str, after: str, block_ms: int) -> None:
        """Block until ``stream`` has an entry after ``after`` (or ``block_ms`` passed)."""
        await self._redis.xread({stream: after}, count=1, block=block_ms)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
