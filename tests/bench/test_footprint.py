"""The footprint scenario, quick: Redis used_memory is flat under a steady load once
every retention bound is reached (after 2N events at most 1.15 x after N)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.footprint import run_footprint

from bench.procs import bench_redis


@pytest.mark.slow
@pytest.mark.timeout(300)  # two N-event phases at a paced 20 events/s, on a loaded machine
def test_used_memory_is_flat_past_every_bound(tmp_path: Path) -> None:
    """2 workflows at 20 events/s, N = 300 (150 per workflow: past the outbox's 128
    results, 4 retained checkpoints, 200 outputs and 5 s of dedupe keys)."""
    with bench_redis(None, tmp_path / "redis") as redis_url:  # used_memory is ours alone
        result = run_footprint(
            redis_url,
            tmp_path,
            events=300,
            workflows=2,
            rate=20.0,
            env={"CTXD_DEDUPE_TTL": "5"},
            progress=lambda line: None,
        )
    assert result.ratio <= 1.15, result.as_json()
    assert result.runs_per_event >= 0.8  # (almost) one run per event
    assert result.checkpoints_per_workflow <= 4 + 20 + 1  # newest + rollback points + head
    streams = result.kept[1]["categories"]["streams"]  # type: ignore[index]
    assert streams["keys"] < 40  # type: ignore[index]
    assert result.kept[1]["categories"]["dedupe"]["keys"] <= 5 * 20 * 2  # type: ignore[index]
    assert result.output_entry_bytes > 0
    assert result.dedupe_key_bytes > 0
