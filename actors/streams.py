"""Redis Streams operations with the delivery guarantees in them.

- :func:`ensure_group` creates a consumer group (``MKSTREAM``), tolerating ``BUSYGROUP``.
- :class:`OutputCommitter` writes results effectively-once: for each event, in one Lua
  script, ``SET done:{event_id} NX`` then ``XADD out`` only if the key was new, then
  ``XACK`` the input. A crash before the script leaves the input pending (it will be
  redelivered, and the workflow's outbox answers it without reprocessing); a crash
  after it leaves nothing to redo. A repeated ``event_id`` is acknowledged without a
  second output.
- :func:`dead_letter` moves an entry to the DLQ and acknowledges it in one MULTI.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings

__all__ = [
    "CommitItem",
    "FencedReader",
    "OutputCommitter",
    "dead_letter",
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


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` from the beginning, creating the stream if needed."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


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


# KEYS: lease, dlq, in. ARGV: lease value, group, source id, then field/value pairs.
_FENCED_DLQ_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease was lost to another instance')
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
return id
"""


async def dead_letter(
    redis: Redis,
    *,
    dlq_stream: str,
    input_stream: str,
    group: str,
    source_id: str,
    fields: Mapping[str, str | bytes],
    reason: str,
    error: str,
    attempts: int,
    lease: tuple[str, str] | None = None,
) -> str:
    """Append the entry to the DLQ with why, and acknowledge it, atomically.

    With ``lease`` (key, value) the write is fenced like a commit: refused with
    "FENCED ..." unless the lease still holds the value.
    """
    entry: dict[str | bytes, str | bytes] = {
        k: v for k, v in fields.items() if k not in ("reason", "error", "attempts", "source_id")
    }
    original = entry.pop("ctxd_source_id", None)
    entry.update(
        reason=reason,
        error=error[:1000],
        attempts=str(attempts),
        source_id=original if original is not None else source_id,
    )
    if lease is not None:
        flat: list[str | bytes] = [lease[1], group, source_id]
        for name, value in entry.items():
            flat += [name, value]
        script = redis.register_script(_FENCED_DLQ_LUA)
        dlq_id = await script(keys=[lease[0], dlq_stream, input_stream], args=flat)
    else:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(dlq_stream, entry)  # type: ignore[arg-type]
            pipe.xack(input_stream, group, source_id)
            dlq_id, _ = await pipe.execute()
    return dlq_id.decode() if isinstance(dlq_id, bytes) else str(dlq_id)


def output_fields(
    result: Mapping[str, object], *, trace_id: str, checkpoint_id: str
) -> dict[str, str]:
    """The ``ctxd:out`` entry for one event's result (DESIGN's output contract)."""
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
    }


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
