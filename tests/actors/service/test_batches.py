"""Batch outcomes on the real Redis: committed, duplicate, failed and retried, lost,
refused, transient, interrupted.

Each test puts entries in a partition stream, reads them into the group as the partition's
owner (under a real partition lease) and hands them to :class:`BatchProcessor` with the
real contextual graph on a memory checkpointer. :class:`ScriptedGraph` lets a test make a
run fail, be refused by a breaker, meet a Redis outage or hang until interrupted; the
outcome is then read back from Redis (outputs, acknowledgements, attempts, dedupe keys).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import anyio
import pytest
from actor_support import open_redis
from opentelemetry.trace import NoOpTracer
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT
from redis_helpers import free_port, start_redis

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.breaker import BreakerState, CallNotPermittedError
from actors.service.batches import (
    BatchProcessor,
    Outcome,
    PendingEntry,
    RunSlot,
    attempt_field,
    error_field,
    poison_error,
)
from actors.service.lease import Leases
from actors.service.partitions import (
    OWNER_CONSUMER,
    attempts_key,
    partition_lease,
    partition_of,
    partition_stream,
)
from actors.service.streams import done_key
from actors.service.validation import decode_fields, parse_entry
from actors.testing import aread_entries
from graph.checkpointer import open_checkpointer
from graph.work import LocalDispatch
from graph.workflow import ContextualGraph, build_contextual_workflow

WORKFLOW = "wf-batch"
FAILURE = "analysis step exploded"


class ScriptedGraph:
    """The real graph; ``mode`` decides what its next runs do instead of running."""

    def __init__(self, real: ContextualGraph) -> None:
        self._real = real
        self.mode = "run"
        self.started = anyio.Event()
        self.before_refusal: Callable[[], Awaitable[object]] | None = None
        """Awaited by a refused run just before the refusal (e.g. to fill Redis)."""

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)  # state reads and writes go to the real graph

    def astream(self, *args: object, **kwargs: object) -> object:
        self.started.set()
        if self.mode == "fail":
            raise RuntimeError(FAILURE)
        if self.mode == "refuse":
            if self.before_refusal is not None:
                return self._refuse_after(self.before_refusal)
            raise _refusal()
        if self.mode == "outage":
            raise RedisConnectionError("Error 111 connecting to redis. Connection refused.")
        if self.mode == "hang":
            return self._hang()
        return self._real.astream(*args, **kwargs)  # type: ignore[call-overload]

    async def _refuse_after(self, hook: Callable[[], Awaitable[object]]) -> AsyncIterator[object]:
        await hook()
        raise _refusal()
        yield None  # pragma: no cover - never reached

    async def _hang(self) -> AsyncIterator[object]:
        await anyio.sleep_forever()
        yield None  # pragma: no cover - never reached


def _refusal() -> CallNotPermittedError:
    return CallNotPermittedError(
        "test breaker open", breaker="actor.analysis", state=BreakerState.OPEN,
        next_probe_at=None, retry_after=None,
    )  # fmt: skip


@dataclass
class Harness:
    """One partition owned by the test, and the processor under test.

    The one place that knows how a BatchProcessor is built, called and interrupted, and
    where it counts; the tests speak only through it and Redis.
    """

    redis: Redis
    settings: Settings
    graph: ScriptedGraph
    processor: BatchProcessor
    availability: RedisAvailability
    counts: Counter[str]
    partition: int
    lease: str

    @property
    def stream(self) -> str:
        return partition_stream(self.settings, self.partition)

    async def entries(self, *event_ids: str) -> list[PendingEntry]:
        """Append one event per id to the partition and read them as its owner."""
        s = self.settings
        for event_id in event_ids:
            fields: dict[FieldT, EncodableT] = {
                "workflow_id": WORKFLOW,
                "content": f"latency rose after deploy {event_id}",
                "event_id": event_id,
            }
            await self.redis.xadd(self.stream, fields)
        reply = await self.redis.xreadgroup(
            s.group, OWNER_CONSUMER, {self.stream: ">"}, count=len(event_ids)
        )
        [(_, raw)] = cast("list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]", reply)
        return [
            PendingEntry(
                event=parse_entry(i.decode(), f, s),
                entry_id=i.decode(),
                partition=self.partition,
                lease=self.lease,
                fields=decode_fields(f),
                deliveries=1,
            )
            for i, f in raw
        ]

    slot: RunSlot = field(default_factory=RunSlot)
    running: list[PendingEntry] = field(default_factory=list)

    async def process(self, batch: list[PendingEntry]) -> Outcome:
        """Process ``batch`` and count its report as the scheduler does."""
        self.running = batch
        try:
            with anyio.fail_after(10):
                report = await self.processor.process(WORKFLOW, self.slot, batch)
        finally:
            self.running = []
        self.counts.update(
            processed=report.processed,
            duplicates=report.duplicates,
            interrupted=report.interrupted,
            failed_runs=int(report.failed),
        )
        return report.outcome

    def interrupt(self) -> list[str]:
        """Cancel the running batch as the scheduler does for a newer event; its entry ids."""
        running = [p.entry_id for p in self.running]
        assert self.slot.interrupt()
        return running

    async def outputs(self) -> list[dict[str, str]]:
        return [f for _, f in await aread_entries(self.redis, self.settings.output_stream, 0)]

    async def pending(self) -> int:
        summary = await self.redis.xpending(self.stream, self.settings.group)
        return int(summary["pending"])

    async def attempts(self, entry: PendingEntry) -> Mapping[str, str | None]:
        key = attempts_key(self.settings, self.partition)
        fields = (
            attempt_field(self.partition, entry.entry_id),
            error_field(self.partition, entry.entry_id),
        )
        runs, error = await self.redis.hmget(key, list(fields))
        return {"runs": _text(runs), "error": _text(error)}


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def open_harness(settings: Settings) -> AsyncIterator[Harness]:
    """One partition of ``WORKFLOW`` owned by the test, on ``settings.redis_url``."""
    s = replace(settings, partitions=4, max_deliveries=3, multitask="interrupt")
    n = partition_of(WORKFLOW, s.partitions)
    async with (
        open_redis(s) as redis,
        open_checkpointer("memory", namespace=s.stream_prefix) as saver,
    ):
        await redis.xgroup_create(partition_stream(s, n), s.group, id="0", mkstream=True)
        lease = await Leases(redis, s.instance, s.lease_ttl).acquire(*partition_lease(s, n))
        assert lease is not None
        graph = ScriptedGraph(build_contextual_workflow(LocalDispatch(), saver))
        availability = RedisAvailability(redis, probe_key=s.key("probe"), backoff_base=0.001)
        counts: Counter[str] = Counter()
        processor = BatchProcessor(
            redis, s, cast("ContextualGraph", graph), consumer=OWNER_CONSUMER,
            instruments=None, metric_attributes={}, tracer=NoOpTracer(), availability=availability,
        )  # fmt: skip
        yield Harness(redis, s, graph, processor, availability, counts, n, lease)


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    async with open_harness(settings) as opened:
        yield opened


async def test_a_batch_is_committed_once_and_a_repeated_event_id_is_a_duplicate(
    harness: Harness,
) -> None:
    h = harness
    batch = await h.entries("a", "b")
    assert await h.process(batch) == "done"
    outputs = await h.outputs()
    assert [(o["event_id"], o["error"]) for o in outputs] == [("a", ""), ("b", "")]
    assert await h.pending() == 0
    assert await h.redis.exists(done_key(h.settings, WORKFLOW, "a"))
    assert await h.attempts(batch[0]) == {"runs": None, "error": None}  # nothing left behind

    again = await h.entries("a")
    assert await h.process(again) == "done"
    assert len(await h.outputs()) == 2  # no second output for "a"
    assert await h.pending() == 0  # but acknowledged
    assert (h.counts["processed"], h.counts["duplicates"]) == (2, 1)


async def test_a_failed_run_is_retried_counting_each_start_and_keeping_its_error(
    harness: Harness,
) -> None:
    """The count and the error are what the ingress compares with CTXD_MAX_DELIVERIES and
    writes in the poison DLQ entry; a later good run clears them."""
    h = harness
    batch = await h.entries("a")
    h.graph.mode = "fail"
    for _ in range(3):
        assert await h.process(batch) == "retry"
    assert await h.attempts(batch[0]) == {"runs": "3", "error": f"RuntimeError: {FAILURE}"}
    assert await h.outputs() == []
    assert await h.pending() == 1
    assert h.counts["failed_runs"] == 3
    error = await poison_error(h.redis, h.settings, h.partition, batch[0].entry_id, 3)
    assert error == f"failed 3 times (limit 3); last error: RuntimeError: {FAILURE}"

    h.graph.mode = "run"
    assert await h.process(batch) == "done"
    assert [o["event_id"] for o in await h.outputs()] == ["a"]
    assert await h.attempts(batch[0]) == {"runs": None, "error": None}


async def test_poison_error_says_the_process_stopped_when_no_run_recorded_one(
    harness: Harness,
) -> None:
    error = await poison_error(harness.redis, harness.settings, harness.partition, "9-9", 3)
    assert error.startswith("the run did not finish in 3 attempts (limit 3): the process stopped")


async def test_a_batch_whose_partition_lease_was_lost_is_left_to_the_new_owner(
    harness: Harness,
) -> None:
    h = harness
    batch = await h.entries("a")
    await h.redis.set(partition_lease(h.settings, h.partition)[0], "inst-b|999999")
    assert await h.process(batch) == "lost"
    assert await h.outputs() == []
    assert await h.pending() == 1  # the new owner inherits it
    assert not await h.redis.exists(done_key(h.settings, WORKFLOW, "a"))
    assert (await h.attempts(batch[0]))["runs"] == "0"  # not the event's fault: taken back


async def test_a_batch_refused_by_a_breaker_waits_without_counting_an_attempt(
    harness: Harness,
) -> None:
    h = harness
    batch = await h.entries("a")
    h.graph.mode = "refuse"
    assert await h.process(batch) == "refused"
    assert await h.attempts(batch[0]) == {"runs": "0", "error": None}
    assert (await h.outputs(), await h.pending(), h.counts["failed_runs"]) == ([], 1, 0)


async def test_a_run_that_meets_a_redis_outage_is_transient_not_an_attempt(
    harness: Harness,
) -> None:
    h = harness
    batch = await h.entries("a")
    h.graph.mode = "outage"
    assert await h.process(batch) == "transient"
    assert await h.attempts(batch[0]) == {"runs": "0", "error": None}
    assert h.availability.statistics().outages == 1  # reported to the monitor
    assert h.availability.available  # and over: the start was taken back once Redis answered
    assert (await h.outputs(), await h.pending(), h.counts["failed_runs"]) == ([], 1, 0)


async def test_an_interrupted_run_commits_an_interrupted_output(harness: Harness) -> None:
    """CTXD_MULTITASK=interrupt: the ingress cancels the running batch's scope when a newer
    event of the workflow arrives; the batch still ends with one output per event."""
    h = harness
    batch = await h.entries("a")
    h.graph.mode = "hang"
    outcome: list[Outcome] = []

    async def run() -> None:
        outcome.append(await h.process(batch))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            await h.graph.started.wait()
        assert h.interrupt() == [batch[0].entry_id]
    assert outcome == ["done"]
    [output] = await h.outputs()
    assert (output["event_id"], output["status"]) == ("a", "error")
    assert (
        output["error"] == "interrupted by a newer event of the workflow (CTXD_MULTITASK=interrupt)"
    )
    assert h.counts["interrupted"] == 1
    assert await h.pending() == 0


async def test_a_refused_batch_waits_out_maxmemory_instead_of_crashing_the_scheduler(
    settings: Settings, tmp_path: Path
) -> None:
    """At maxmemory (noeviction) a breaker opens and batches come back refused; taking
    their start back is a write Redis refuses too. That is an outage to wait out, never
    an error that crashes the scheduler (which would count toward restart intensity)."""
    port = free_port()
    server = start_redis(tmp_path / "redis", port)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        async with open_harness(replace(settings, redis_url=url)) as h:
            batch = await h.entries("a")

            async def fill() -> None:
                await h.redis.config_set("maxmemory-policy", "noeviction")
                used = int((await h.redis.info("memory"))["used_memory"])
                await h.redis.config_set("maxmemory", used // 2)

            h.graph.mode = "refuse"
            h.graph.before_refusal = fill
            outcome: list[Outcome] = []
            async with anyio.create_task_group() as tg:

                async def process() -> None:
                    outcome.append(await h.process(batch))

                tg.start_soon(process)
                with anyio.fail_after(10):
                    await h.availability.wait_unavailable()  # the take-back was refused
                await h.redis.config_set("maxmemory", 0)  # the operator makes room
            assert outcome == ["refused"]
            assert await h.attempts(batch[0]) == {"runs": "0", "error": None}
            assert h.availability.statistics().outages == 1
    finally:
        server.terminate()
        server.wait(timeout=10)
