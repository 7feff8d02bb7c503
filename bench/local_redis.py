"""Start a Redis Stack server of one's own on loopback (tests and benchmarks)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from actors.app.redis_server import locate_redis_stack

__all__ = ["free_port", "start_redis"]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(
    data_dir: Path, port: int, *extra: str, modules: bool = True
) -> subprocess.Popen[bytes]:
    """Start Redis Stack (RedisJSON + RediSearch, AOF everysec) and wait until it is ready.

    ``modules=False`` starts it without RedisJSON and RediSearch. Readiness is the
    server's own "Ready to accept connections" log line.
    """
    stack = locate_redis_stack()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "redis.log"
    log.write_text("")
    args = stack.command(
        "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--logfile", str(log), *extra,
        modules=modules,
    )  # fmt: skip
    proc = subprocess.Popen(args, env=dict(stack.env), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while "Ready to accept connections" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis did not start: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.05)  # a child's readiness: nothing to await but its log
    return proc
