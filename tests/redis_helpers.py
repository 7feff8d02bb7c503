"""Start extra Redis Stack servers for tests that need their own (TLS, ACL, restarts)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from actors.app.redis_server import locate_redis_stack


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


def start_tls_redis(
    data_dir: Path, tls_port: int, certs: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """Start Redis Stack listening on ``tls_port`` only (no plain port), with
    ``certs/server.crt`` and ``certs/server.key``; clients need no certificate."""
    return start_redis(
        data_dir, 0,
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"),
        "--tls-auth-clients", "no",
        *extra,
    )  # fmt: skip


class OwnRedis:
    """A Redis Stack server a test module starts, stops and restarts itself (by pid),
    on a fixed free port and data directory (a separate checkpoint store, say)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again), with its data, and wait until it is ready."""
        self.process = start_redis(self.data_dir, self.port)

    def stop(self) -> None:
        """Stop it (SIGTERM to its pid) and wait for the exit."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
