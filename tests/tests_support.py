"""Helpers the tests import: wait for stream entries, drive `ctxd` subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from redis import Redis

from actors.config import Settings, load_settings
from actors.service.input_routing import cursor_key

REPO = Path(__file__).resolve().parent.parent

# Sample event texts: one calls for technical research, the other for market research.
TECH = (
    "The API latency of the database cluster rose after the deploy; the kubernetes pods "
    "restart and the cache misses grow. Engineers measured p99 latency of 800 ms."
)
MARKET = (
    "Customers and the market demand pricing changes; revenue growth slowed while "
    "competitors launched rival products and gained market share from our customers."
)


def run_ctxd(
    env: Mapping[str, str], *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run one ``ctxd`` command (``send``, ``state``…) to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "actors.app.cli", *args],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def read_outputs(
    redis: Redis, stream: str, count: int, *, timeout_ms: int = 30000
) -> list[tuple[str, dict[str, str]]]:
    """Block until ``stream`` holds at least ``count`` entries (or the timeout), return all.

    Entries come back as the client answers them (bytes from a raw client), which the
    hostile-input tests need; :func:`actors.testing.read_entries`, shipped for users,
    decodes them. Waits on XREAD BLOCK, i.e. on Redis telling us an entry arrived.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    # A decoding client: ids and fields are text (redis-py's stubs cannot say so).
    entries = cast(list[tuple[str, dict[str, str]]], redis.xrange(stream))
    last = entries[-1][0] if entries else "0-0"
    while len(entries) < count:
        remaining = int((deadline - time.monotonic()) * 1000)
        if remaining <= 0:
            break
        # Short blocks: the test clients have a socket timeout (a hung Redis fails fast).
        reply = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]] | None,
            redis.xread({stream: last}, block=min(remaining, 1000), count=1000),
        )
        for _, new in reply or []:
            entries.extend(new)
            last = new[-1][0]
    return entries


def unmoved_input(
    redis: Redis, prefix: str, partitions: int | None = None, *, within: float = 5.0
) -> int:
    """How many ``ctxd:in`` entries some partition has not moved (or scanned past) yet,
    once every partition's cursor is at the end of ``ctxd:in`` or ``within`` passed.

    A partition with nothing to move writes its cursor at most once a second
    (actors/service/router.py), hence the wait; 0 means every entry was routed.
    """
    if partitions is None:  # the service's default count
        partitions = load_settings({}, overrides={}).partitions
    layout = Settings(stream_prefix=prefix, partitions=partitions)
    deadline = time.monotonic() + within
    while True:
        cursors = [redis.get(cursor_key(layout, n)) for n in range(partitions)]
        newest = cast(list[tuple[str, object]], redis.xrevrange(f"{prefix}:in", count=1))
        if not newest:
            return 0
        low = min((_id(cast(str, c)) if c else (0, 0)) for c in cursors)
        # Ids only, undecoded: hostile entries may hold bytes that are not UTF-8.
        raw = redis.execute_command(  # type: ignore[no-untyped-call]
            "XRANGE", f"{prefix}:in", "-", "+", NEVER_DECODE=True
        )
        behind = [e for e, _ in cast(list[tuple[bytes, object]], raw)]
        left = sum(1 for e in behind if _id(e) > low)
        if left == 0 or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)  # cursors are written by the service; nothing to block on here


def _id(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class ServiceProcess:
    """``ctxd run`` (or another ctxd command) as a real subprocess, with its log lines.

    Args:
        args: ctxd arguments, e.g. ``["run"]``.
        env: extra environment (CTXD_*, OTEL_*).
    """

    def __init__(self, args: list[str], env: Mapping[str, str]) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXD_", "OTEL_"))}
        full_env.update(env)
        full_env.setdefault("CTXD_LOG_FORMAT", "json")
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.app.cli", *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        """Wait until a log line satisfies ``predicate``; fail with the log otherwise."""
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(predicate(x) for x in self.lines) or self.proc.poll() is not None,
                timeout=timeout,
            )
            matches = [x for x in self.lines if predicate(x)]
        if not found or not matches:
            raise AssertionError("expected log line not seen; log:\n" + "\n".join(self.lines[-40:]))
        return matches[0]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the service's "ctxd is running" line."""
        self.wait_for_line(lambda x: "ctxd is running" in x, timeout)

    def signal(self, signum: signal.Signals) -> None:
        """Send a real signal to the process (by pid)."""
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for exit; return the exit code."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        """Make sure the process is gone (SIGKILL by pid if still running)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
