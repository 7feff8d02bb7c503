"""``ctxd status`` shows what is kept: keys (exact, SCAN) and bytes (sampled MEMORY
USAGE, scaled) by category."""

from __future__ import annotations

import json

from redis import Redis

from actors.config import Settings
from actors.service.footprint import categorize, collect_footprint
from actors.service.parking import parked_stream
from actors.service.partitions import (
    attempts_key,
    partition_key,
    partition_lease,
    partition_stream,
)
from actors.service.streams import done_key
from tests_support import run_ctxd


def _fill(redis: Redis, settings: Settings) -> None:
    prefix = settings.stream_prefix
    for i in range(30):
        redis.set(f"{prefix}:checkpoint:w{i}:__empty__:1f0-{i}", "x" * 2000)
        redis.set(done_key(settings, f"w{i}", f"e{i}"), "1-0", ex=600)
    redis.set(f"{prefix}:checkpoint_latest:w1:__empty__", "k")
    redis.set(f"{prefix}:write_keys_zset:w1:__empty__:1f0-1", "k")
    for i in range(10):
        redis.xadd(f"{prefix}:out", {"event_id": f"e{i}"})
        redis.xadd(f"{prefix}:dlq", {"reason": "poison", "content": "y" * 5000})
    redis.xadd(parked_stream(settings, "w1"), {"content": "z"})
    redis.hset(attempts_key(settings, 0), "0/1-0", 1)


def test_footprint_counts_keys_by_category_and_estimates_bytes(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    _fill(redis, settings)
    footprint = collect_footprint(redis, settings)
    categories = footprint["categories"]
    assert isinstance(categories, dict)
    assert {name: c["keys"] for name, c in categories.items()} == {
        "checkpoints": 32,
        "streams": 2,
        "dedupe": 30,
        "dlq": 1,
        "other": 1,
    }
    assert footprint["complete"] is True
    assert categories["checkpoints"]["bytes"] > 30 * 2000  # the 2 KB values, scaled
    assert categories["dlq"]["bytes"] > 10 * 5000
    assert footprint["used_memory"] > categories["checkpoints"]["bytes"]
    partial = collect_footprint(redis, settings, scan_limit=10)
    assert partial["complete"] is False
    assert partial["scanned"] == 10
    assert categorize(settings, f"{prefix}:reply:host:1") == "streams"
    assert categorize(settings, partition_lease(settings, 3)[0]) == "other"
    assert categorize(settings, partition_stream(settings, 3)) == "streams"
    assert categorize(settings, partition_key(settings, 3, "dlq")) == "dlq"


def test_status_prints_what_is_kept(service_env: dict[str, str], redis: Redis, prefix: str) -> None:
    _fill(redis, Settings(stream_prefix=prefix))
    shown = run_ctxd(service_env, "status")
    assert shown.returncode == 0, shown.stderr
    assert "kept: Redis used_memory" in shown.stdout
    assert any(
        line.split()[:3] == ["checkpoints", "32", "keys"] for line in shown.stdout.splitlines()
    )
    document = json.loads(run_ctxd(service_env, "status", "--json").stdout)
    assert document["footprint"]["categories"]["dedupe"]["keys"] == 30
    assert "MEMORY USAGE" in document["footprint"]["method"]
    limited = run_ctxd(service_env, "status", "--scan-limit", "5")
    assert "kept (first 5 keys only)" in limited.stdout
    skipped = json.loads(run_ctxd(service_env, "status", "--json", "--scan-limit", "0").stdout)
    assert skipped["footprint"] is None
    helped = run_ctxd(service_env, "status", "--help")
    assert "MEMORY USAGE" in helped.stdout
    assert "SCAN" in helped.stdout
