"""``python -m bench --quick`` end to end: every scenario runs and every figure is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests_support import REPO

_SCENARIOS = (
    "baseline-drain",
    "ctxd-drain-1",
    "ctxd-drain-2",
    "ctxd-drain-1-traced",
    "baseline-steady",
    "ctxd-steady-1",
    "ctxd-steady-2",
)


@pytest.mark.slow
def test_quick_bench_writes_every_figure(redis_url: str, tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--redis-url",
            redis_url,
            "--output",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"results written to {output}" in run.stdout
    assert "events/s" in run.stdout  # the per-second progress lines
    document = json.loads(output.read_text())
    assert document["config"]["quick"] is True
    scenarios = document["scenarios"]
    assert set(scenarios) == set(_SCENARIOS)
    for name, figures in scenarios.items():
        assert figures["events_per_s"] > 0, name
        assert set(figures["latency_ms"]) >= {"p50", "p95", "p99"}, name
        assert 0 <= figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"], name
        assert figures["cpu_s_per_1000"] > 0, name
        assert len(figures["peak_rss_mb"]) == figures["processes"], name
        assert all(mb > 10 for mb in figures["peak_rss_mb"]), name
    config = document["config"]
    assert scenarios["baseline-drain"]["events"] == config["baseline_events"]
    assert scenarios["ctxd-drain-1"]["events"] == config["events"]
    assert scenarios["ctxd-steady-1"]["events"] == round(config["rate"] * config["duration"])
    assert scenarios["ctxd-drain-2"]["processes"] == 2
    ratios = document["ratios"]
    assert len(ratios) == 5
    for check in ratios:
        assert check["value"] is not None, check
        assert check["verdict"] in ("PASS", "MISS"), check
        assert check["verdict"] in run.stdout
