"""Sampling profiles of the processes under measurement, with py-spy (optional).

``python -m bench --profile`` attaches ``py-spy record`` to the first process of every
scenario once it is ready (py-spy is not a dependency of ctxd: install it into your
virtual environment). The collapsed stacks are written next to the logs, and the top
entries by own time and by inclusive time are printed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "top_entries"]

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def _py_spy() -> str:
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class Profiler:
    """``py-spy record`` attached to one pid, writing collapsed stacks to ``path``."""

    def __init__(self, pid: int, path: Path, *, rate: int = 100) -> None:
        self.path = path
        self._proc = subprocess.Popen(
            [
                _py_spy(),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self, timeout: float = 30.0) -> None:
        """Wait for py-spy to write its file (it stops when the target exits)."""
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def _frame(raw: str) -> str:
    return _FRAME_LINE.sub(")", raw.strip())


def top_entries(path: Path, limit: int = 15) -> str:
    """The top functions by own samples and by inclusive samples, as text."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        count = int(match["count"])
        frames = [_frame(f) for f in match["stack"].split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{path}: no samples"
    lines = [f"profile {path.name}: {total} samples", "  by own time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(limit)]
    lines.append("  by inclusive time:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(limit)]
    return "\n".join(lines)
