"""The upgrade from the single leased router to owners routing their own partitions.

A deployment from before has a consumer group ``ctxd`` on ``ctxd:in``: its router read
entries under the consumer name ``router`` and moved each to its partition and
acknowledged it in one script, so every entry up to the group's last-delivered id was
moved except those still pending (read, not yet moved). On its first start the new
version therefore:

1. waits for the router lease (``{prefix}:lease:router``) to be free and takes it: an
   old-version router still running keeps it, and while we hold it an old router's
   fenced reads and moves are refused, so the group stands still;
2. moves each partition's pending entries into the partition and sets the partition's
   first cursor to the group's last-delivered id, in one script per partition that does
   nothing when the partition has a cursor already (a second instance doing the same, a
   crash half way): nothing is lost, nothing is moved twice;
3. retires the router lease for good (the value :data:`RETIRED`, no TTL: an old-version
   instance started later can never route again), then deletes the group.

A deployment without the group (new, or upgraded already) skips all of it; its
partitions' first cursors are ``0-0`` (``ctxd:in`` holds only what was never moved).
"""

from __future__ import annotations

from typing import Literal, cast

import anyio
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.runtime.redis_io import Entry, text
from actors.service.gateway import route_partition
from actors.service.input_routing import barrier_key, cursor_key, route_target
from actors.service.lease import Leases
from actors.service.partitions import dlq_stream_of, lease_key, partition_key, partition_stream

__all__ = ["RETIRED", "take_over_router_group"]

RETIRED = "retired: partition owners route ctxd:in"
"""The router lease's value once a deployment is upgraded (it never expires)."""

_log = structlog.get_logger("ctxd.router")

_PAGE = 500


async def _group(redis: Redis, settings: Settings) -> dict[str, object] | None:
    try:
        groups = await redis.xinfo_groups(settings.input_stream)
    except ResponseError:
        return None  # no ctxd:in yet
    for group in groups:
        if text(group["name"]) == settings.group:
            return dict(group)
    return None


async def _pending_entries(redis: Redis, settings: Settings) -> list[Entry]:
    """The old group's pending entries (every consumer's), in ``ctxd:in`` order."""
    s = settings
    ids: list[str] = []
    start = "-"
    while True:
        page = await redis.xpending_range(s.input_stream, s.group, start, "+", _PAGE)
        ids += [text(cast(bytes, p["message_id"])) for p in page]
        if len(page) < _PAGE:
            break
        ms, _, seq = ids[-1].partition("-")
        start = f"{ms}-{int(seq) + 1}"
    entries: list[Entry] = []
    for n in range(0, len(ids), _PAGE):
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in ids[n : n + _PAGE]:
                pipe.xrange(s.input_stream, entry_id, entry_id)
            for entry_id, found in zip(ids[n : n + _PAGE], await pipe.execute(), strict=True):
                entries.append((entry_id, found[0][1] if found else None))
    return entries


async def take_over_router_group(redis: Redis, settings: Settings, stopping: anyio.Event) -> bool:
    """Upgrade a deployment that still has the old router's group; True if it had one.

    Returns False at once where there is no group. Waits (logging once) while an
    old-version router holds the router lease; returns early when ``stopping`` is set.
    """
    s = settings
    if await _group(redis, s) is None:
        return False
    key, fence = lease_key(s, "router")
    leases = Leases(redis, f"{s.instance}/upgrade", max(s.lease_ttl, 10.0))
    value: str | None = None
    waited = False
    while value is None:
        if text(await redis.get(key) or b"") == RETIRED:
            break  # upgraded by another instance (or by us before a crash): finish it
        value = await leases.acquire(key, fence)
        if value is None:
            if not waited:
                _log.warning(
                    "an old-version router holds the router lease; waiting for it to stop "
                    "before taking over its pending entries",
                    lease=key,
                )
                waited = True
            with anyio.move_on_after(max(s.lease_ttl / 3, 0.2)):
                await stopping.wait()
            if stopping.is_set():
                return True
    group = await _group(redis, s)
    if group is None:  # another instance finished the upgrade meanwhile
        return True
    last = text(group["last-delivered-id"])  # type: ignore[arg-type]
    items: dict[int, list[tuple[str, Literal["stream", "dlq"], dict[bytes, bytes]]]] = {}
    for entry_id, raw in await _pending_entries(redis, s):
        if raw is not None:  # trimmed while pending: nothing to move
            n, target, fields = route_target(s, entry_id, raw)
            items.setdefault(n, []).append((entry_id, target, fields))
    moved = 0
    for n in range(s.partitions):
        reply = await route_partition(
            redis,
            lease=(partition_key(s, n, "cursor"), ""),  # unfenced: no owner moves without it
            cursor_key=cursor_key(s, n),
            stream=partition_stream(s, n),
            dlq_stream=dlq_stream_of(s, n),
            barrier_key=barrier_key(s, n),
            expected="!",
            scanned=last,
            items=items.get(n, []),
        )
        moved += reply.moved
    await redis.set(key, RETIRED)
    await redis.xgroup_destroy(s.input_stream, s.group)
    _log.info(
        "upgraded from the single router: its pending entries moved to their partitions, "
        "every partition routes from its own cursor now",
        pending_moved=moved,
        cursor=last,
    )
    return True
