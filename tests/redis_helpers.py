"""Start extra Redis Stack servers for tests that need their own (TLS, ACL, restarts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.local_redis import free_port, start_redis

__all__ = ["OwnRedis", "free_port", "start_redis", "start_tls_redis"]


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
