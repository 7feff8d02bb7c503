"""The embedded Redis, and what `ctxd run` says about a Redis without the modules."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from actors.app.redis_server import EmbeddedRedisError, discover_embedded_redis, open_embedded_redis
from tests_support import run_ctxd

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def plain_redis(tmp_path: Path) -> Iterator[str]:
    """Debian's redis-server (no RedisJSON, no RediSearch) on a free port, stopped by pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no plain redis-server on this machine")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the server says when it is ready: wait for that line
            if "Ready to accept connections" in line:
                break
        else:
            pytest.fail(f"redis-server exited with {proc.wait()}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_redis_without_the_modules_stops_run_with_one_line(
    plain_redis: str, tmp_path: Path
) -> None:
    """`ctxd run` against Redis without JSON/Search exits 1 with one line saying what to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXD_", "OTEL_"))}
    env.update(CTXD_REDIS_URL=plain_redis, CTXD_STATE_DIR=str(tmp_path / "state"))
    result = run_ctxd(env, "run", timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "lacks RedisJSON and RediSearch" in lines[0]
    assert "Redis 8" in lines[0]
    assert "Redis Stack" in lines[0]


def test_embedded_redis_keeps_its_aof_in_the_state_dir_and_stops_cleanly(tmp_path: Path) -> None:
    """Loopback, a port other than 6379, RedisJSON + RediSearch, AOF on disk, clean stop."""
    state = tmp_path / "state"
    with open_embedded_redis(state) as server:
        assert server.port != 6379
        assert discover_embedded_redis(state) == server.__class__(
            url=server.url, pid=server.pid, state_dir=state, owned=False
        )
        client = Redis.from_url(server.url)
        try:
            modules = {m[b"name"] for m in client.module_list()}
            assert {b"ReJSON", b"search"} <= modules
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            client.xadd("kept", {"a": "1"})
        finally:
            client.close()
        pid = server.pid
    assert list((state / "data" / "appendonlydir").iterdir())
    assert discover_embedded_redis(state) is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # The data survives: a new server on the same state dir reads the AOF back.
    with open_embedded_redis(state) as again:
        client = Redis.from_url(again.url)
        try:
            assert client.xlen("kept") == 1
        finally:
            client.close()


def test_embedded_redis_refuses_port_6379(tmp_path: Path) -> None:
    """The machine's own Redis lives on 6379: the embedded one never takes it."""
    with pytest.raises(EmbeddedRedisError, match="never uses port 6379"):
        open_embedded_redis(tmp_path / "s", port=6379).__enter__()
