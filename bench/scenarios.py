"""One scenario: fresh prefix, processes started, workload fed, figures measured.

End-to-end latency is measured on the server's clock alone: an input entry's id and
its output entry's id both start with Redis's millisecond time, so
``latency = out_id_ms - in_id_ms`` (the output's ``source_id`` names the input).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from redis import Redis

from bench.procs import MeasuredProcess, cpu_seconds, peak_rss_mb
from bench.profile import Profiler, top_entries
from bench.workload import load, make_events

__all__ = ["Scenario", "ScenarioResult", "percentile", "run_scenario"]

_STALL_SECONDS = 180.0  # no progress for this long: the scenario failed


@dataclass(frozen=True)
class Scenario:
    """What to run.

    Attributes:
        name: the scenario's name in the output.
        pipeline: ``baseline`` (seed-style) or ``ctxd`` (``ctxd run``).
        workload: ``drain`` (a backlog) or ``steady`` (a fixed arrival rate).
        processes: how many processes consume the stream.
        traced: export traces to the bench's OTLP receiver.
        events: events of the workload (drain) or rate * duration (steady).
        workflows: workflows the events spread over.
        rate: arrivals per second (steady only).
        env: extra environment for the processes.
    """

    name: str
    pipeline: str
    workload: str
    processes: int
    events: int
    workflows: int
    traced: bool = False
    rate: float = 0.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ScenarioResult:
    """The figures of one scenario (every time in the server's milliseconds)."""

    name: str
    pipeline: str
    workload: str
    processes: int
    events: int
    workflows: int
    rate: float
    traced: bool
    seconds: float
    events_per_s: float
    latency_ms: dict[str, float]
    cpu_s_per_1000: float
    cpu_s: list[float]
    peak_rss_mb: list[float]
    spans_received: int | None = None
    note: str = ""

    def as_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _start(
    scenario: Scenario,
    redis_url: str,
    prefix: str,
    workdir: Path,
    otlp_endpoint: str | None,
) -> list[MeasuredProcess]:
    processes: list[MeasuredProcess] = []
    for n in range(scenario.processes):
        log = workdir / f"{scenario.name}-{n}.log"
        if scenario.pipeline == "baseline":
            args = [
                "bench.baseline",
                "--redis-url",
                redis_url,
                "--prefix",
                prefix,
            ]
            env: dict[str, str] = {}
            ready = "baseline is running"
        else:
            args = ["actors.app.cli", "run"]
            env = {
                "CTXD_REDIS_URL": redis_url,
                "CTXD_STREAM_PREFIX": prefix,
                "CTXD_STATE_DIR": str(workdir / "state"),
                "CTXD_INSTANCE": f"{prefix}-{n}",
                "CTXD_LOG_FORMAT": "json",
            }
            if otlp_endpoint:
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
                env["OTEL_SERVICE_NAME"] = "ctxd-bench"
            ready = "ctxd is running"
        env.update(scenario.env)
        processes.append(MeasuredProcess(args, env, ready_text=ready, log_path=log))
    for process in processes:
        process.wait_ready()
    return processes


def _feed_steady(
    redis: Redis, stream: str, events: Sequence[dict[str, str]], rate: float
) -> threading.Thread:
    """Append events at ``rate`` per second from a thread (a paced producer)."""

    def produce() -> None:
        start = time.monotonic()
        for i, fields in enumerate(events):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            redis.xadd(stream, fields)  # type: ignore[arg-type]

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread


def run_scenario(
    scenario: Scenario,
    *,
    redis_url: str,
    workdir: Path,
    otlp_endpoint: str | None = None,
    spans_received: Callable[[], int] | None = None,
    progress: Callable[[str], None] = print,
    profile: bool = False,
) -> ScenarioResult:
    """Run one scenario and measure it.

    Raises:
        RuntimeError: a process died or the scenario stalled (with the log tail).
    """
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    in_stream, out_stream = f"{prefix}:in", f"{prefix}:out"
    redis = Redis.from_url(redis_url, decode_responses=True)
    events = make_events(scenario.events, scenario.workflows, prefix)
    processes = _start(
        scenario, redis_url, prefix, workdir, otlp_endpoint if scenario.traced else None
    )
    profiler = (
        Profiler(processes[0].pid, workdir / f"{scenario.name}.pyspy.txt") if profile else None
    )
    try:
        cpu_before = [cpu_seconds(p.pid) for p in processes]
        if scenario.workload == "drain":
            load(redis, in_stream, events)
        else:
            _feed_steady(redis, in_stream, events, scenario.rate)
        _wait_done(scenario, redis, out_stream, processes, progress)
        cpu_after = [cpu_seconds(p.pid) for p in processes]
        rss = [round(peak_rss_mb(p.pid), 1) for p in processes]
    finally:
        for process in processes:
            process.stop()
        if profiler is not None:
            profiler.wait()
    if profiler is not None and profiler.path.exists():
        progress(top_entries(profiler.path))
    outputs = cast(list[tuple[str, dict[str, str]]], redis.xrange(out_stream))
    redis.close()
    # Every input's id is in its output's source_id: ctxd trims acknowledged input
    # entries (CTXD_TRIM_INTERVAL), so the input stream itself may be empty by now.
    first_in = min(_id_ms(f["source_id"]) for _, f in outputs)
    last_out = max(_id_ms(eid) for eid, _ in outputs)
    latencies = [_id_ms(eid) - _id_ms(f["source_id"]) for eid, f in outputs]
    seconds = max(last_out - first_in, 1) / 1000
    cpu = [round(a - b, 2) for a, b in zip(cpu_after, cpu_before, strict=True)]
    return ScenarioResult(
        name=scenario.name,
        pipeline=scenario.pipeline,
        workload=scenario.workload,
        processes=scenario.processes,
        events=len(outputs),
        workflows=scenario.workflows,
        rate=scenario.rate,
        traced=scenario.traced,
        seconds=round(seconds, 3),
        events_per_s=round(len(outputs) / seconds, 1),
        latency_ms={
            "p50": round(percentile(latencies, 50), 1),
            "p95": round(percentile(latencies, 95), 1),
            "p99": round(percentile(latencies, 99), 1),
            "max": float(max(latencies)),
        },
        cpu_s_per_1000=round(sum(cpu) / len(outputs) * 1000, 3),
        cpu_s=cpu,
        peak_rss_mb=rss,
        spans_received=spans_received() if spans_received and scenario.traced else None,
    )


def _wait_done(
    scenario: Scenario,
    redis: Redis,
    out_stream: str,
    processes: Sequence[MeasuredProcess],
    progress: Callable[[str], None],
) -> None:
    """Poll the output stream once a second, printing progress, until every event is out."""
    total = scenario.events
    started = time.monotonic()
    last_done, last_change = 0, started
    history: list[tuple[float, int]] = []
    while True:
        done = int(redis.xlen(out_stream))
        now = time.monotonic()
        history = [*history[-4:], (now, done)]
        if done != last_done:
            last_done, last_change = done, now
        elif now - last_change > _STALL_SECONDS:
            raise RuntimeError(
                f"{scenario.name}: stalled at {done}/{total} for {_STALL_SECONDS:.0f} s; "
                f"log of the first process:\n{processes[0].tail()}"
            )
        (t0, d0), (t1, d1) = history[0], history[-1]
        recent = (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
        progress(
            f"  {scenario.name}: {done}/{total} events, {now - started:5.1f} s, "
            f"~{recent:.0f} events/s"
        )
        if done >= total:
            return
        for process in processes:
            if not process.alive():
                raise RuntimeError(
                    f"{scenario.name}: process {process.pid} exited with "
                    f"{process.proc.returncode}; output:\n{process.tail()}"
                )
        time.sleep(1.0)
