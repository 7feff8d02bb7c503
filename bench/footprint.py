"""The ``footprint`` scenario: Redis memory stays flat under a steady load.

One ``ctxd run`` gets a steady rate of events over a fixed set of workflows (one run per
event: each workflow's events are further apart than a run takes). Redis's
``used_memory`` and ctxd's keys by category (actors/service/footprint.py) are read after N
events and after 2N; with every bound reached before N, the second figure is at most
1.15 x the first. The retention bounds are set small (:data:`BOUNDS`) so that N is past
all of them within minutes; the per-workflow and per-event bytes measured here give the
figures for the defaults (docs/performance.md, "Footprint").

Redis must be ctxd's alone for ``used_memory`` to mean anything: ``python -m bench``
starts its own embedded Redis unless given ``--redis-url``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from redis import Redis

from actors.config import Settings, load_settings
from actors.service.footprint import collect_footprint
from bench.procs import MeasuredProcess
from bench.workload import make_events

__all__ = ["BOUNDS", "FootprintResult", "run_footprint"]

BOUNDS: Mapping[str, str] = {
    "CTXD_OUTPUT_MAXLEN": "200",
    "CTXD_DLQ_MAXLEN": "100",
    "CTXD_DEDUPE_TTL": "60",
    "CTXD_TRIM_INTERVAL": "1",
}
"""Small bounds, so N events reach all of them within minutes (defaults: 100000 outputs,
10000 dead letters, 1 day of dedupe keys, a trim every 60 s). Checkpoints keep the
default, 20 per workflow: a few dozen runs per workflow reach it. (A smaller one is
not flat sooner: the rollback points of the last 20 closed segments are kept too, and
with this workload a segment closes at almost every event, so how many of them fall
outside a small newest-N window depends on how the load batches events.)"""

_MAX_RATIO = 1.15


@dataclass
class FootprintResult:
    """The figures of one footprint run.

    Attributes:
        events: N (the first measurement); the second is after 2N.
        workflows: the fixed set of workflows.
        rate: arrivals per second.
        bounds: the retention settings of the run.
        used_memory: Redis ``used_memory`` after N and after 2N events.
        kept: ctxd's keys and bytes by category after N and after 2N events.
        ratio: used_memory after 2N / after N.
        runs_per_event: distinct checkpoints in the outputs / outputs read (1.0: one
            run per event).
        checkpoint_bytes: ``used_memory`` freed per retained checkpoint deleted (with
            its index entries) after the run.
        checkpoints_per_workflow: retained checkpoints per workflow after 2N.
        output_entry_bytes: ``used_memory`` freed per ``ctxd:out`` entry deleted.
        dedupe_key_bytes: ``used_memory`` freed per dedupe key deleted.
    """

    events: int
    workflows: int
    rate: float
    bounds: dict[str, str]
    used_memory: list[int] = field(default_factory=list)
    kept: list[dict[str, object]] = field(default_factory=list)
    ratio: float = 0.0
    runs_per_event: float = 0.0
    checkpoint_bytes: float = 0.0
    checkpoints_per_workflow: float = 0.0
    output_entry_bytes: float = 0.0
    dedupe_key_bytes: float = 0.0

    @property
    def flat(self) -> bool:
        """``used_memory`` after 2N is at most 1.15 x after N."""
        return self.ratio <= _MAX_RATIO

    def as_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {**self.__dict__, "flat": self.flat, "max_ratio": _MAX_RATIO}

    def render(self) -> str:
        """The lines ``python -m bench`` prints."""
        defaults = load_settings({})
        per_workflow = self.checkpoint_bytes * defaults.retain_checkpoints
        per_event = self.output_entry_bytes + self.dedupe_key_bytes
        mb = 1024 * 1024
        return "\n".join(
            [
                f"footprint: {self.workflows} workflows at {self.rate:g} events/s, "
                f"{self.runs_per_event:.2f} runs per event; bounds "
                + " ".join(f"{k}={v}" for k, v in self.bounds.items()),
                f"  used_memory after {self.events} events {self.used_memory[0] / mb:.2f} MB, "
                f"after {2 * self.events} {self.used_memory[1] / mb:.2f} MB: ratio "
                f"{self.ratio:.3f} ({'PASS' if self.flat else 'MISS'} <= {_MAX_RATIO})",
                f"  per workflow: {self.checkpoints_per_workflow:.1f} checkpoints kept of "
                f"{self.checkpoint_bytes / 1024:.1f} KB each; per retained event: output "
                f"{self.output_entry_bytes:.0f} B + dedupe key {self.dedupe_key_bytes:.0f} B",
                f"  with the defaults: {defaults.retain_checkpoints} newest checkpoints = "
                f"{per_workflow / mb:.2f} MB per workflow (plus up to 20 segment rollback "
                f"points); {defaults.output_maxlen} outputs = "
                f"{defaults.output_maxlen * self.output_entry_bytes / mb:.0f} MB; dedupe keys "
                f"at 20 events/s for {defaults.dedupe_ttl} s = "
                f"{20 * defaults.dedupe_ttl * self.dedupe_key_bytes / mb:.0f} MB "
                f"({per_event:.0f} B per retained event)",
            ]
        )


class _OutputCounter:
    """Reads ``ctxd:out`` as it grows (it is trimmed, so XLEN does not count)."""

    def __init__(self, redis: Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self._last = "0-0"
        self.count = 0
        self.checkpoints: set[str] = set()

    def poll(self, block_ms: int = 200) -> None:
        reply = cast(
            list[tuple[str, list[tuple[str, dict[str, str]]]]],
            self._redis.xread({self._stream: self._last}, count=5000, block=block_ms),
        )
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.count += 1
                self.checkpoints.add(fields.get("checkpoint_id", ""))
                self._last = entry_id


def run_footprint(
    redis_url: str,
    workdir: Path,
    *,
    events: int,
    workflows: int,
    rate: float,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = print,
    stall_seconds: float = 120.0,
) -> FootprintResult:
    """Run the footprint scenario: 2 x ``events`` at ``rate`` over ``workflows``.

    Raises:
        RuntimeError: the process died, or no output came for ``stall_seconds``.
    """
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    bounds = {**BOUNDS, **(env or {})}
    settings = Settings(stream_prefix=prefix)
    redis = Redis.from_url(redis_url, decode_responses=True)
    process = MeasuredProcess(
        ["actors.app.cli", "run"],
        {
            "CTXD_REDIS_URL": redis_url,
            "CTXD_STREAM_PREFIX": prefix,
            "CTXD_STATE_DIR": str(workdir / "state"),
            "CTXD_INSTANCE": f"{prefix}-0",
            "CTXD_LOG_FORMAT": "json",
            **bounds,
        },
        ready_text="ctxd is running",
        log_path=workdir / "footprint-0.log",
    )
    result = FootprintResult(events=events, workflows=workflows, rate=rate, bounds=bounds)
    stop = threading.Event()
    try:
        process.wait_ready()
        feed = make_events(2 * events, workflows, prefix)
        producer = threading.Thread(
            target=_produce, args=(redis, f"{prefix}:in", feed, rate, stop), daemon=True
        )
        producer.start()
        counter = _OutputCounter(redis, f"{prefix}:out")
        last_change, seen = time.monotonic(), 0
        started = time.monotonic()
        for target in (events, 2 * events):
            while counter.count < target:
                counter.poll()
                now = time.monotonic()
                if counter.count != seen:
                    if counter.count // 100 != seen // 100:
                        progress(
                            f"  footprint: {counter.count}/{2 * events} events, "
                            f"{now - started:5.1f} s"
                        )
                    seen, last_change = counter.count, now
                elif now - last_change > stall_seconds or not process.alive():
                    raise RuntimeError(
                        f"footprint: stalled at {counter.count}/{2 * events}; log:\n"
                        f"{process.tail()}"
                    )
            info = cast(Mapping[str, int], redis.info("memory"))
            result.used_memory.append(int(info["used_memory"]))
            result.kept.append(collect_footprint(redis, settings))
        producer.join(timeout=5)
    finally:
        stop.set()
        process.stop()
    result.ratio = round(result.used_memory[1] / result.used_memory[0], 3)
    result.runs_per_event = round(len(counter.checkpoints) / max(counter.count, 1), 3)
    # Bytes measured as Redis frees them (the service is stopped; this Redis is ours):
    # MEMORY USAGE of a RedisJSON document overstates it about threefold.
    checkpoints = list(redis.scan_iter(match=f"{prefix}:checkpoint:*", count=1000))
    result.checkpoints_per_workflow = round(len(checkpoints) / workflows, 1)
    result.checkpoint_bytes = round(_freed(redis, checkpoints) / max(len(checkpoints), 1), 1)
    outputs = int(redis.xlen(f"{prefix}:out"))
    result.output_entry_bytes = round(_freed(redis, [f"{prefix}:out"]) / max(outputs, 1), 1)
    done = list(redis.scan_iter(match=f"{prefix}:{{p*}}:done:*", count=1000))
    result.dedupe_key_bytes = round(_freed(redis, done) / max(len(done), 1), 1)
    redis.close()
    return result


def _freed(redis: Redis, keys: list[str]) -> int:
    """``used_memory`` freed by deleting ``keys``."""
    before = int(cast(Mapping[str, int], redis.info("memory"))["used_memory"])
    for start in range(0, len(keys), 500):
        redis.delete(*keys[start : start + 500])
    after = int(cast(Mapping[str, int], redis.info("memory"))["used_memory"])
    return max(before - after, 0)


def _produce(
    redis: Redis, stream: str, events: list[dict[str, str]], rate: float, stop: threading.Event
) -> None:
    start = time.monotonic()
    for i, fields in enumerate(events):
        delay = start + i / rate - time.monotonic()
        if stop.wait(max(delay, 0.0)):  # a paced producer thread, until the run ends
            return
        redis.xadd(stream, fields)  # type: ignore[arg-type]
