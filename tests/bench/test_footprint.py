"""The footprint scenario, quick: Redis used_memory is flat under a steady load once
every retention bound is reached (after 2N events at most 1.15 x after N)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest

from actors.config import Settings
from bench.footprint import run_footprint
from bench.procs import bench_redis


@pytest.mark.slow
@pytest.mark.timeout(300)  # two N-event phases at a paced 20 events/s, on a loaded machine
def test_used_memory_is_flat_past_every_bound(tmp_path: Path) -> None:
    """4 workflows at 16 events/s (a workflow's events 250 ms apart: one run each), N = 560
    (140 per workflow: past the outbox's 128 results, the default 20 retained
    checkpoints, 200 outputs and 5 s of dedupe keys)."""
    with bench_redis(None, tmp_path / "redis") as redis_url:  # used_memory is ours alone
        result = run_footprint(
            redis_url,
            tmp_path,
            events=560,
            workflows=4,
            rate=16.0,
            env={"CTXD_DEDUPE_TTL": "5"},
            progress=lambda line: None,
        )
    assert result.ratio <= 1.15, result.as_json()
    # one run per event, unless the loaded machine made the service fall behind (then
    # it batches; the bound holds all the same)
    assert result.runs_per_event >= 0.5, result.as_json()
    # the newest 20, the runs since the last prune (every 5), older rollback points
    assert result.checkpoints_per_workflow <= 20 + 5 + 20
    kept = cast(Mapping[str, Mapping[str, int]], result.kept[1]["categories"])
    # a stream per partition (CTXD_PARTITIONS, default 64), plus ctxd:in/out/dlq, the
    # mailboxes and the reply streams: a fixed set, not one per workflow or event
    assert kept["streams"]["keys"] < Settings().partitions + 24
    assert kept["dedupe"]["keys"] <= 5 * 16 * 2  # 5 s of keys at 16 events/s, with slack
    assert result.output_entry_bytes > 0
    assert result.dedupe_key_bytes > 0
