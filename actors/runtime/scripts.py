"""Every Lua script ctxd runs in Redis, in one place, and the one way to call them.

A write that must be atomic (an output and its acknowledgement, a DLQ copy and its
acknowledgement) or must come from a lease's holder only (a "fenced" write: the lease
check and the write in one script, so a process whose lease expired is refused instead
of writing) is a script here. Each constant says its ``KEYS``, ``ARGV`` and reply.

Fenced scripts all take the lease as ``KEYS[1]`` / ``ARGV[1]`` and answer a lost lease
with the error ``FENCED …``; :func:`call_script` turns that error into
:class:`~graph.errors.FencedError`, so no caller matches error strings. An empty lease
value (``ARGV[1] == ''``) means "not fenced" where a script allows it.

The typed functions callers use are in :mod:`actors.service.gateway` (commits, DLQ
moves, fenced reads, routing), :mod:`actors.service.lease` (leases) and the modules of
the pools and commands that run the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from graph.errors import FencedError

__all__ = [
    "ACL_CHECK",
    "BARRIER_RAISE",
    "COMMIT",
    "DEAD_LETTER",
    "DLQ_REPLAY",
    "FENCED_ACK",
    "FENCED_POINTER",
    "FENCED_READ",
    "FLOOR_POINTER",
    "FLOOR_RAISE",
    "LEASE_ACQUIRE",
    "LEASE_RELEASE",
    "LEASE_RENEW",
    "MOVE",
    "MOVE_ONCE",
    "PARTITIONS_UPDATE",
    "POOL_FINISH",
    "ROUTE_PARTITION",
    "ZREM_IF_IDLE",
    "call_script",
    "is_fenced",
]

_FENCE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the lease ' .. KEYS[1] .. ' was lost to another instance')
end
"""
# Every fenced script starts with this: KEYS[1] is the lease, ARGV[1] our value ('' = none).

_SETTLE = """
local function settle(stream, group, id, mode)
  if mode == 'delete' then redis.call('XDEL', stream, id)
  else redis.call('XACK', stream, group, id) end
end
"""
# An input is settled by acknowledging it in its group ('ack': a partition, ctxd:in, a
# mailbox) or by deleting it ('delete': a parked stream, which has no group).

COMMIT: Final = (
    _FENCE
    + _SETTLE
    + """
local out, stream, group = KEYS[2], KEYS[3], ARGV[2]
local ttl, mode, n = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local pos, ids = 6, {}
for i = 1, n do
  local source_id, nfields = ARGV[pos], tonumber(ARGV[pos + 1])
  local fields = {}
  for j = 1, nfields * 2 do fields[j] = ARGV[pos + 1 + j] end
  pos = pos + 2 + nfields * 2
  local done = KEYS[3 + i]
  if nfields > 0 and redis.call('SET', done, 'pending', 'NX', 'EX', ttl) then
    local id = redis.call('XADD', out, '*', unpack(fields))
    redis.call('SET', done, id, 'EX', ttl)
    ids[i] = id
  else
    ids[i] = ''
  end
  settle(stream, group, source_id, mode)
end
return ids
"""
)
"""Commit outputs effectively once, fenced: the one commit path (batches and replays).

KEYS: lease, out, the input stream, then one done key per item.
ARGV: lease value ('' = unfenced), group, done-key TTL in seconds, settle mode ('ack' or
'delete'), n, then per item: source id, nfields, nfields field/value pairs.
Reply: per item, the output entry id, or '' when its done key existed (a duplicate) or it
had no fields. Each item's input is settled either way. Error FENCED when the lease moved.
"""

DEAD_LETTER: Final = (
    _FENCE
    + _SETTLE
    + """
local dlq, stream, group, source_id, mode = KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4]
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then
  settle(stream, group, source_id, mode)
  return ''
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', dlq, '*', unpack(fields))
settle(stream, group, source_id, mode)
return id
"""
)
"""Move one entry to the DLQ and settle it: the one DLQ path (entries and requests).

KEYS: lease (any key when unfenced), the DLQ, the input stream, optionally a done key.
ARGV: lease value ('' = unfenced), group, source id, settle mode ('ack' or 'delete'),
then the DLQ entry's field/value pairs (bounded by ``dlq_entry``, so ``unpack`` stays far
below Lua's limit of about 8,000 values).
Reply: the DLQ entry id, or '' when the done key exists (the event's output is committed
already: its input is only settled). Error FENCED when the lease moved.
"""

FENCED_READ: Final = (
    _FENCE
    + """
local got = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                       'STREAMS', KEYS[2], ARGV[5])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {got, last}
"""
)
"""``XREADGROUP`` while holding a lease (a reader whose lease expired must not move new
entries into a pending list the new holder has already read).

KEYS: lease, stream. ARGV: lease value, group, consumer, count, cursor ('>' or an id).
Reply: {the XREADGROUP reply, the stream's last entry (XREVRANGE COUNT 1)}.
Error FENCED when the lease moved.
"""

FENCED_POINTER: Final = _FENCE + "return redis.call('SET', KEYS[2], ARGV[2])\n"
"""Move a workflow's latest-checkpoint pointer while holding the run's partition lease.

KEYS: lease, the pointer key. ARGV: the run's lease value, the checkpoint key it points to.
Reply: OK. Error FENCED when the lease moved (the checkpoint stays unreferenced).
"""

_FLOOR = """
local floor = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local token = tonumber(ARGV[2])
"""
# Scripts of a separate checkpoint store, which cannot read the partition lease:
# KEYS[1] is the floor hash (lease key -> highest fencing token seen), ARGV[1] the lease
# key, ARGV[2] the run's token. The floor only ever goes up.

FLOOR_RAISE: Final = (
    _FLOOR
    + """
if token > floor then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return token
end
return floor
"""
)
"""Raise a lease's fencing-token floor in the checkpoint store to a new holder's token.

KEYS: the floor hash. ARGV: the lease key, the token the new holder took.
Reply: the floor now (the token, or a higher floor already there).
"""

FLOOR_POINTER: Final = (
    _FLOOR
    + """
if token < floor then
  return redis.error_reply('FENCED the lease ' .. ARGV[1] .. ' was taken with token '
    .. floor .. ', above the token ' .. ARGV[2] .. ' of this run')
end
if token > floor then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return redis.call('SET', KEYS[2], ARGV[3])
"""
)
"""Move a workflow's latest-checkpoint pointer unless a newer holder's token is the floor.

KEYS: the floor hash, the pointer key. ARGV: the lease key, the run's fencing token, the
checkpoint key it points to. Reply: OK. Error FENCED when the floor is above the token
(the checkpoint stays unreferenced).
"""

MOVE: Final = (
    _FENCE
    + """
local group, n = ARGV[2], tonumber(ARGV[3])
local pos = 4
for i = 1, n do
  local source_id, nfields = ARGV[pos], tonumber(ARGV[pos + 1])
  local fields = {}
  for j = 1, nfields * 2 do fields[j] = ARGV[pos + 1 + j] end
  pos = pos + 2 + nfields * 2
  redis.call('XADD', KEYS[2 + i], '*', unpack(fields))
  redis.call('XACK', KEYS[2], group, source_id)
end
return n
"""
)
"""Move entries between streams: append each to its target and acknowledge it on the input
(an entry in a partition its workflow does not hash to, moved to its own).

KEYS: the lease (the source partition's), the input stream, then one target stream per item.
ARGV: lease value, group, n, then per item: source id, nfields, field/value pairs (each
item bounded: a valid entry has at most CTXD_MAX_FIELDS + 1 fields, a DLQ copy at most
that + 5, CTXD_MAX_FIELDS <= 1000).
Reply: n. Error FENCED when the lease moved.
"""

ROUTE_PARTITION: Final = (
    _FENCE
    + """
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function after(a, b)  -- stream id a > stream id b
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am > bm or (am == bm and as > bs)
end
local cursor, stream, dlq = KEYS[2], KEYS[3], KEYS[4]
local expected, scanned, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local stored = redis.call('GET', cursor)
local barrier = redis.call('GET', KEYS[5])
if expected == '!' and stored then return {'exists', stored, 0, barrier or ''} end
stored = stored or '0-0'
if expected ~= '' and expected ~= '!' and stored ~= expected then
  return {'resync', stored, 0, barrier or ''}
end
if barrier and after(scanned, barrier) then scanned = barrier end
local pos, moved = 5, 0
for i = 1, n do
  local source_id, target, nfields = ARGV[pos], ARGV[pos + 1], tonumber(ARGV[pos + 2])
  local fields = {}
  for j = 1, nfields * 2 do fields[j] = ARGV[pos + 2 + j] end
  pos = pos + 3 + nfields * 2
  if after(source_id, stored) and not after(source_id, scanned) then
    if target == 'dlq' then redis.call('XADD', dlq, '*', unpack(fields))
    else redis.call('XADD', stream, '*', unpack(fields)) end
    moved = moved + 1
  end
end
if after(scanned, stored) then stored = scanned end
redis.call('SET', cursor, stored)
return {'ok', stored, moved, barrier or ''}
"""
)
"""Move one partition's entries of ``ctxd:in`` into the partition, fenced, exactly once.

Every key is in the partition's slot (on a cluster ``dlq`` is the partition's own DLQ).
The cursor is the last ``ctxd:in`` id this partition has moved or scanned past; items at
or below it were moved before (a crash, an owner change) and are skipped, and the cursor
moves to ``scanned`` in the same step as the appends. The **barrier** key, while it
exists, is a ``ctxd:in`` id nothing past which is moved or scanned (a resize holds the
partition there: checked in the same step as the moves, so no batch read before the
barrier was set can land after it).

KEYS: the partition lease, the partition's cursor, the partition stream, the DLQ, the
partition's barrier.
ARGV: lease value ('' = unfenced), expected cursor ('' = whatever is stored; '!' = only
if no cursor is stored yet, the upgrade's first cursor; else the value this owner last
saw, anything else is answered 'resync'), the last ``ctxd:in`` id scanned, n, then per
item in ``ctxd:in`` order: its ``ctxd:in`` id, 'stream' or 'dlq', nfields, field/value
pairs (bounded as for MOVE).
Reply: {'ok' | 'resync' | 'exists', the cursor now, entries appended, the barrier or ''}.
Error FENCED when the lease moved.
"""

BARRIER_RAISE: Final = """
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function after(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am > bm or (am == bm and as > bs)
end
local barrier = ARGV[1]
local held = redis.call('GET', KEYS[1])
local cursor = redis.call('GET', KEYS[2])
if held and after(held, barrier) then barrier = held end
if cursor and after(cursor, barrier) then barrier = cursor end
redis.call('SET', KEYS[1], barrier)
return barrier
"""
"""Set a partition's barrier to the highest of an id, its barrier and its cursor (never
below what was moved already), atomically with the move script (same slot).

KEYS: the partition's barrier, the partition's cursor. ARGV: a ``ctxd:in`` id.
Reply: the barrier now.
"""

MOVE_ONCE: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
end
return false
"""
"""Append an entry to a stream once, whoever asks how often (a move between slots).

KEYS: a marker key in the target's slot, the target stream. ARGV: marker TTL in seconds,
then the entry's field/value pairs. Reply: the new entry id, or nil when the marker
existed (appended before).
"""

FENCED_ACK: Final = _FENCE + "return redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])\n"
"""Acknowledge an entry while holding a lease. KEYS: lease, stream. ARGV: lease value,
group, entry id. Reply: 1 or 0. Error FENCED when the lease moved."""

LEASE_ACQUIRE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. '|' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
"""Take a free lease with a new fencing token.

KEYS: lease, its fence counter. ARGV: owner, TTL in ms.
Reply: the lease's value ``owner|token``, or nil when someone holds it.
"""

LEASE_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
"""Extend a lease still ours. KEYS: lease. ARGV: value, TTL in ms. Reply: 1, or 0 if lost."""

LEASE_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Give a lease up if still ours. KEYS: lease. ARGV: value. Reply: 1, or 0 if not ours."""

ZREM_IF_IDLE: Final = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""
"""Forget an idle workflow unless it became active meanwhile.

KEYS: the partition's workflow activity set. ARGV: workflow id, the idle cutoff (a score).
Reply: 1 if removed, else 0.
"""

POOL_FINISH: Final = """
local group, maxlen, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local pos = 4
for i = 1, n do
  local entry_id, nfields = ARGV[pos], tonumber(ARGV[pos + 1])
  if nfields > 0 then
    local fields = {}
    for j = 1, nfields * 2 do fields[j] = ARGV[pos + 1 + j] end
    -- pcall: a reply_to that is no stream (WRONGTYPE) loses only its own reply, not
    -- the batch; the request is acknowledged all the same.
    local added
    if maxlen == '0' then  -- CTXD_REPLY_MAXLEN=0: no bound
      added = redis.pcall('XADD', KEYS[1 + i], '*', unpack(fields))
    else
      added = redis.pcall('XADD', KEYS[1 + i], 'MAXLEN', '~', maxlen, '*', unpack(fields))
    end
    if type(added) ~= 'table' or not added.err then
      -- The reply stream of an asker that died goes away a day after its last reply.
      redis.call('EXPIRE', KEYS[1 + i], 86400)
    end
  end
  pos = pos + 2 + nfields * 2
  redis.call('XACK', KEYS[1], group, entry_id)
  redis.call('XDEL', KEYS[1], entry_id)
end
return n
"""
"""Answer, acknowledge and delete a pool's handled requests, in one round trip.

KEYS: the mailbox, then one reply stream per item (the mailbox again when none).
ARGV: group, reply maxlen ('0' = unbounded), n, then per item: entry id, nfields,
field/value pairs. Reply: n.
"""

DLQ_REPLAY: Final = """
local out = {}
for i, id in ipairs(ARGV) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  local cut = false
  if #found > 0 then
    for j = 1, #found[1][2], 2 do
      if found[1][2][j] == 'ctxd_cut' then cut = true end
    end
  end
  if #found == 0 then
    out[i] = ''
  elseif cut then
    out[i] = 'cut'
  else
    local flat, fields = found[1][2], {}
    for j = 1, #flat, 2 do
      local name = flat[j]
      if name ~= 'reason' and name ~= 'error' and name ~= 'attempts' and name ~= 'source_id' then
        fields[#fields + 1] = name
        fields[#fields + 1] = flat[j + 1]
      end
    end
    if #fields == 0 then fields = {'replayed_from', id} end
    out[i] = redis.call('XADD', KEYS[2], '*', unpack(fields))
    redis.call('XDEL', KEYS[1], id)
  end
end
return out
"""
"""``ctxd dlq replay``: move DLQ entries back to the input stream, without ctxd's fields.

KEYS: the DLQ, the input stream. ARGV: DLQ entry ids.
Reply: per id, the new input id, '' when the id is not in the DLQ, or 'cut' when its DLQ
copy was cut (its fields are not the original any more; it stays in the DLQ).
"""

ACL_CHECK: Final = """
local denied = {}
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local args = {}
  for j = 1, n do args[j] = ARGV[i + j] end
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(args))
  if ok and not allowed then denied[#denied + 1] = tostring(i - 1) end
  i = i + n + 1
end
return denied
"""
"""Which commands the connection's ACL user may not run (start-up check).

KEYS: none. ARGV: commands, each as its word count followed by its words.
Reply: the offsets (in ARGV, 0-based) of the denied commands.
"""


PARTITIONS_UPDATE: Final = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local state = redis.call('HGET', KEYS[1], 'state')
if epoch ~= ARGV[1] or state ~= ARGV[2] then return 0 end
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""
"""Change the partition record only if it is still at the epoch and state the caller
read (a compare-and-set: two ``ctxd partitions resize`` never both win).

KEYS: the record hash. ARGV: expected ``epoch``, expected ``state``, then field/value
pairs to set ('' deletes the field). Reply: 1 when applied, 0 when the record moved.
"""


def is_fenced(exc: BaseException) -> bool:
    """Whether ``exc`` is a fenced script's refusal (the error ``FENCED …``)."""
    return isinstance(exc, ResponseError) and str(exc).startswith("FENCED")


async def call_script(
    redis: Redis,
    source: str,
    *,
    keys: Sequence[str | bytes],
    args: Sequence[str | bytes | int | float],
    client: Pipeline | None = None,
) -> object:
    """Run ``source`` (``EVALSHA``, loading it once per server) and return its reply.

    Raises:
        FencedError: the script refused a fenced write (its lease moved).
    """
    script = redis.register_script(source)
    try:
        return await script(keys=list(keys), args=list(args), client=client)
    except ResponseError as exc:
        if is_fenced(exc):
            raise FencedError(str(exc).removeprefix("FENCED ")) from exc
        raise
