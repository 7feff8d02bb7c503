"""What ctxd keeps in Redis, by category: keys and bytes (``ctxd status``).

Keys are counted exactly with ``SCAN MATCH {prefix}:*`` up to a bound (``--scan-limit``;
past it the counts are marked incomplete). Bytes are estimated: ``MEMORY USAGE`` of up
to :data:`SAMPLES` keys per category, picked evenly over the scan, times the category's
key count. ``used_memory``
is Redis's own figure for the whole server.

RedisJSON reports its documents' ``MEMORY USAGE`` about three times larger than what
deleting them frees (118 KB against 40 KB per checkpoint, measured by the footprint
bench), so the checkpoints figure is an upper bound; ``used_memory`` is exact.

The streams category holds every stream but the DLQ; its bytes are an estimate like the
others (a few large streams among many small ones make it rough).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import cast

from redis import Redis as SyncRedis
from redis.cluster import RedisCluster

from actors.config import Settings

__all__ = ["CATEGORIES", "SAMPLES", "categorize", "collect_footprint", "format_bytes"]

SAMPLES = 64
"""Keys per category whose ``MEMORY USAGE`` is read."""

CATEGORIES = ("checkpoints", "streams", "dedupe", "dlq", "other")

_CHECKPOINT_KINDS = frozenset(
    {"checkpoint", "checkpoint_write", "checkpoint_latest", "write_keys_zset"}
)
_STREAM_KINDS = frozenset({"in", "out", "stream", "actor", "reply", "parked"})


def categorize(settings: Settings, key: str) -> str:
    """The category of one of ctxd's keys (one of :data:`CATEGORIES`)."""
    if key == settings.dlq_stream:
        return "dlq"
    kind, _, rest = key.removeprefix(f"{settings.stream_prefix}:").partition(":")
    if kind.startswith("{p") and kind.endswith("}"):  # a partition's key: {p<n>}:<kind>:...
        kind = rest.split(":", 1)[0]
        if kind == "dlq":
            return "dlq"
    if kind in _CHECKPOINT_KINDS:
        return "checkpoints"
    if kind in _STREAM_KINDS:
        return "streams"
    if kind == "done":
        return "dedupe"
    return "other"


def _memory_usage(redis: SyncRedis, keys: list[str]) -> list[int | None]:
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key)
    return [
        None if isinstance(r, Exception) else (int(r) if r is not None else 0)
        for r in pipe.execute(raise_on_error=False)
    ]


def collect_footprint(
    redis: SyncRedis, settings: Settings, *, scan_limit: int = 200_000
) -> dict[str, object]:
    """Keys and estimated bytes per category, with how they were obtained.

    Args:
        redis: a decoding client.
        settings: the prefix and stream names.
        scan_limit: keys scanned at most.
    """
    counts: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    samples: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    rng = random.Random(0)
    scanned = 0
    complete = True
    for key in cast(list[str], redis.scan_iter(match=f"{settings.stream_prefix}:*", count=1000)):
        if scanned >= scan_limit:
            complete = False
            break
        scanned += 1
        category = categorize(settings, key)
        counts[category] += 1
        # reservoir sampling: every key of the category equally likely to be measured
        if len(samples[category]) < SAMPLES:
            samples[category].append(key)
        else:
            slot = rng.randrange(counts[category])
            if slot < SAMPLES:
                samples[category][slot] = key
    categories: dict[str, dict[str, object]] = {}
    for category in CATEGORIES:
        # None: MEMORY USAGE refused (an ACL without it); 0 keys measure 0 bytes
        measured = [u for u in _memory_usage(redis, samples[category]) if u is not None]
        estimate: int | None = 0
        if measured:
            estimate = round(sum(measured) / len(measured) * counts[category])
        elif samples[category]:
            estimate = None
        categories[category] = {
            "keys": counts[category],
            "bytes": estimate,
            "sampled": len(measured),
        }
    used_memory = _used_memory(redis)
    return {
        "method": f"SCAN (up to {scan_limit} keys) + MEMORY USAGE of up to {SAMPLES} "
        "sampled keys per category, scaled to the key count",
        "complete": complete,
        "scanned": scanned,
        "categories": categories,
        "used_memory": used_memory,
    }


def _used_memory(redis: SyncRedis) -> int:
    """Redis's ``used_memory``: of the server, or summed over a cluster's masters.

    The cluster client sends ``INFO`` to one node unless told otherwise; ``SCAN`` above
    already covers every master (redis-py's cluster ``scan_iter``).
    """
    if isinstance(redis, RedisCluster):
        per_node = cast(
            Mapping[str, Mapping[str, object]],
            redis.info("memory", target_nodes=RedisCluster.PRIMARIES),
        )
        return sum(int(cast(int, info.get("used_memory", 0))) for info in per_node.values())
    info = cast(Mapping[str, object], redis.info("memory"))
    return int(cast(int, info.get("used_memory", 0)))


def format_bytes(value: object) -> str:
    """``12.3 MB`` style (``?`` when unknown)."""
    if not isinstance(value, int | float):
        return "?"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover
