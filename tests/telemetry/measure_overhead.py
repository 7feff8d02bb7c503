"""Tracing overhead of the contextual workflow: throughput with tracing on vs off.

Runs N events through :func:`graph.workflow.run_events` twice per round: once with
``OTEL_SDK_DISABLED=true`` (no-op tracer and meter), once with the real SDK (parent-based
sampler, ``BatchSpanProcessor`` + OTLP gRPC exporter to an in-process
:class:`~telemetry.testing.OtlpReceiver` in a child process, metrics on a periodic
reader). Each event also
gets a ``process`` span, as the ingress would give it. The best round of each wins, to
keep a shared machine's noise out; the ratio is on/off throughput. Throughput is given
twice: per wall-clock second, and per CPU second of this process (all its threads,
exporter included), which other processes on a busy machine do not distort.

    .venv/bin/python tests/telemetry/measure_overhead.py [events] [batch] [rounds] [redis-url]

With a Redis URL (Redis 8 / Redis Stack) the workflow checkpoints to ``AsyncRedisSaver``
as the service does; without, to memory, which makes the base cost per event smaller
and the measured overhead proportionally larger (the pessimistic case).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from opentelemetry.trace import SpanKind

from graph.checkpointer import open_checkpointer, strict_serializer
from graph.state import JSON
from graph.tracing import GraphTelemetry, event_trace_fields
from graph.work import LocalDispatch
from graph.workflow import ContextualGraph, build_contextual_workflow, run_events
from telemetry.logging import configure_logging
from telemetry.settings import TelemetrySettings
from telemetry.setup import Telemetry, open_telemetry

_TEXTS = (
    "Checkout latency rose after the deploy; the API and the database look slow.",
    "Competitor pricing changed; market share and customers may shift this quarter.",
    "The vendor's rival launched a cheaper plan in our region.",
    "Error budget burn is high; on-call paged twice overnight.",
)


@dataclass(frozen=True)
class Measurement:
    """Events per second with tracing off and on, and their ratios."""

    events: int
    off: float
    on: float
    off_cpu: float
    on_cpu: float
    spans_received: int

    @property
    def ratio(self) -> float:
        """on / off throughput per wall-clock second."""
        return self.on / self.off

    @property
    def cpu_ratio(self) -> float:
        """on / off throughput per CPU second."""
        return self.on_cpu / self.off_cpu


async def _run(
    telemetry: Telemetry, events: int, batch: int, tag: str, redis_url: str | None = None
) -> tuple[float, float]:
    async with contextlib.AsyncExitStack() as stack:
        saver: BaseCheckpointSaver[str] = (
            await stack.enter_async_context(
                open_checkpointer("redis", namespace=f"overhead-{tag}", redis_url=redis_url)
            )
            if redis_url
            else InMemorySaver(serde=strict_serializer())
        )
        graph = build_contextual_workflow(
            LocalDispatch(),
            saver,
            telemetry=GraphTelemetry(telemetry.tracer, telemetry.instruments),
        )
        return await _drive(graph, telemetry, events, batch, tag)


async def _drive(
    graph: ContextualGraph, telemetry: Telemetry, events: int, batch: int, tag: str
) -> tuple[float, float]:
    tracer = telemetry.tracer
    started, cpu_started = time.perf_counter(), time.process_time()
    for first in range(0, events, batch):
        workflow_id = f"{tag}-{first // (batch * 4)}"
        spans = []
        dicts: list[Mapping[str, JSON]] = []
        for i in range(first, min(first + batch, events)):
            span = tracer.start_span("process ctxd:in", kind=SpanKind.CONSUMER)
            spans.append(span)
            dicts.append(
                {
                    "source_id": f"{i}-0",
                    "event_id": f"{tag}-{i}",
                    "content": _TEXTS[i % len(_TEXTS)],
                    "priority": "standard",
                    "deadline": None,
                    "max_cost": None,
                    "metadata": {},
                    **event_trace_fields(span),
                }
            )
        await run_events(graph, workflow_id, dicts)
        for span in spans:
            span.end()
    telemetry.force_flush()  # the export work belongs to the measurement
    return (
        events / (time.perf_counter() - started),
        events / (time.process_time() - cpu_started),
    )


_RECEIVER = """
import sys
from telemetry.testing import OtlpReceiver
with OtlpReceiver() as receiver:
    print(receiver.grpc_endpoint, flush=True)
    sys.stdin.readline()
    print(len(receiver.spans()), flush=True)
"""


class _Receiver:
    """An OtlpReceiver in a child process, so its work is not charged to the service."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self.endpoint = proc.stdout.readline().strip()

    def span_count(self) -> int:
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write("count\n")
        self._proc.stdin.flush()
        return int(self._proc.stdout.readline())


@contextlib.contextmanager
def _receiver_process() -> Iterator[_Receiver]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield _Receiver(proc)
    finally:
        if proc.poll() is None:
            proc.kill()  # by pid: the child this function started
        proc.wait(timeout=10)


async def measure(
    events: int = 200,
    batch: int = 8,
    rounds: int = 3,
    redis_url: str | None = None,
    sample_ratio: float | None = None,
) -> Measurement:
    """Measure throughput off and on (best of ``rounds``), interleaved.

    Args:
        events: events per run.
        batch: events per graph run (the ingress batches one workflow's events).
        rounds: runs of each; the best counts.
        redis_url: checkpoint to this Redis rather than to memory.
        sample_ratio: with tracing on, sample this share of traces
            (``parentbased_traceidratio``); all of them if None.
    """
    best_off = best_on = best_off_cpu = best_on_cpu = 0.0
    uid = uuid.uuid4().hex[:8]
    with _receiver_process() as receiver:
        on_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        if sample_ratio is not None:
            on_env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            on_env["OTEL_TRACES_SAMPLER_ARG"] = str(sample_ratio)
        on_settings = TelemetrySettings.from_env(on_env)
        off_settings = TelemetrySettings.from_env({"OTEL_SDK_DISABLED": "true"})
        for r in range(rounds):
            with open_telemetry(off_settings, set_global=False) as off:
                wall, cpu = await _run(off, events, batch, f"off{r}-{uid}", redis_url)
                best_off, best_off_cpu = max(best_off, wall), max(best_off_cpu, cpu)
            with open_telemetry(on_settings, set_global=False) as on:
                wall, cpu = await _run(on, events, batch, f"on{r}-{uid}", redis_url)
                best_on, best_on_cpu = max(best_on, wall), max(best_on_cpu, cpu)
        spans = receiver.span_count()
    return Measurement(
        events=events,
        off=best_off,
        on=best_on,
        off_cpu=best_off_cpu,
        on_cpu=best_on_cpu,
        spans_received=spans,
    )


def main(argv: list[str]) -> None:
    """Print the measurement."""
    events, batch, rounds = (int(a) for a in (argv + ["200", "8", "3"][len(argv) :])[:3])
    redis_url = argv[3] if len(argv) > 3 else None
    configure_logging(level="info", json=True)  # as in production: debug lines filtered
    result = asyncio.run(measure(events, batch, rounds, redis_url))
    print(
        f"events={result.events} batch={batch} rounds={rounds} "
        f"off={result.off:.1f}/s on={result.on:.1f}/s ratio={result.ratio:.3f} "
        f"cpu: off={result.off_cpu:.1f}/s on={result.on_cpu:.1f}/s "
        f"cpu_ratio={result.cpu_ratio:.3f} "
        f"spans_received={result.spans_received} "
        f"checkpointer={'redis' if redis_url else 'memory'}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
