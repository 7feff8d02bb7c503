"""A bad setting stops ``ctxd run`` at start: exit code 2 and exactly one stderr line
naming the setting, the value and what is allowed (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests_support import REPO

CASES = [
    ({"CTXD_MULTITASK": "sometimes"}, ["CTXD_MULTITASK", "sometimes", "enqueue", "rollback"]),
    ({"CTXD_PARTITIONS": "0"}, ["CTXD_PARTITIONS", "'0'", ">= 1"]),
    ({"CTXD_LEASE_TTL": "0.1"}, ["CTXD_LEASE_TTL", "0.1", ">= 0.5"]),
    ({"CTXD_DRAIN_BUDGET": "soon"}, ["CTXD_DRAIN_BUDGET", "soon", "number"]),
    ({"CTXD_TRIM_INTERVAL": "-1"}, ["CTXD_TRIM_INTERVAL", "-1", ">= 0"]),
    ({"CTXD_REDIS_URL": "http://x"}, ["CTXD_REDIS_URL", "http", "redis://"]),
    ({"CTXD_CONCURRENCY": "many"}, ["CTXD_CONCURRENCY", "many", "whole number"]),
    ({"CTXD_PARTITION": "3"}, ["CTXD_PARTITION", "not a ctxd setting", "CTXD_PARTITIONS"]),
    ({"CTXD_STREAM_PREFIX": "{ctxd}"}, ["CTXD_STREAM_PREFIX", "{ctxd}", "hash tag", "braces"]),
]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors.app.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize(("bad", "words"), CASES, ids=[next(iter(c[0])) for c in CASES])
def test_bad_setting_exits_2_with_one_line(
    service_env: dict[str, str], bad: dict[str, str], words: list[str]
) -> None:
    """Each bad value: exit 2, one stderr line with the setting, the value, the rule."""
    result = _run({**service_env, **bad}, "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_bad_value_in_the_toml_file(service_env: dict[str, str], tmp_path: Path) -> None:
    """The same for the TOML file given with --config."""
    config = tmp_path / "ctxd.toml"
    config.write_text('[ctxd]\nmultitask = "later"\npartitions = 4\n')
    result = _run(service_env, "--config", str(config), "run")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "multitask" in lines[0]
    assert "later" in lines[0]
    assert "interrupt" in lines[0]
