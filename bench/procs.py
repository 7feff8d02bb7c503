"""Processes under measurement: ``ctxd run`` and the seed-style baseline, and the Redis.

CPU time comes from ``/proc/<pid>/stat`` (utime + stime), peak RSS from ``VmHWM`` in
``/proc/<pid>/status``: the kernel's own accounting of exactly that process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["REPO", "MeasuredProcess", "bench_redis", "cpu_seconds", "peak_rss_mb"]

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def bench_redis(url: str | None, state_dir: Path) -> Iterator[str]:
    """``url`` if given, else the embedded Redis Stack with its data in ``state_dir``."""
    if url:
        yield url
        return
    from actors.app.redis_server import open_embedded_redis

    with open_embedded_redis(state_dir) as server:
        yield server.url


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name (which may hold spaces) start after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return (utime + stime) / _TICKS


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


class MeasuredProcess:
    """A Python module run as a subprocess, with its output kept and a ready line awaited.

    Args:
        module_args: ``-m`` module and its arguments, e.g. ``["actors.app.cli", "run"]``.
        env: extra environment; inherited ``CTXD_*``/``OTEL_*`` variables are dropped.
        ready_text: the text of the line that says the process is serving.
        log_path: where its output is written (for post-mortems).
    """

    def __init__(
        self,
        module_args: Sequence[str],
        env: Mapping[str, str],
        *,
        ready_text: str,
        log_path: Path,
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXD_", "OTEL_"))}
        full_env.update(env)
        self._ready_text = ready_text
        self._ready = threading.Event()
        self._lines: list[str] = []
        self._log = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *module_args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._log.write(line)
                self._lines.append(line.rstrip("\n"))
                if self._ready_text in line:
                    self._ready.set()
        self._ready.set()  # exited: wake the waiter, which checks the exit code

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the ready line; raise with the log tail if the process died first."""
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            tail = "\n".join(self._lines[-30:])
            raise RuntimeError(f"process {self.pid} did not become ready; output:\n{tail}")

    def alive(self) -> bool:
        """The process still runs."""
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The last lines of its output."""
        return "\n".join(self._lines[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (by pid), wait; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._log.close()
        return self.proc.returncode
