"""Helpers for the stream service's module tests: a scripted runner and partition entries."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.redis_io import read_group
from actors.service.batches import BatchReport, Outcome, PendingEntry, RunSlot
from actors.service.partitions import partition_lease, partition_of, partition_stream
from actors.service.streams import ensure_group


class ScriptedRunner:
    """A runner (``actors.service.scheduler.Runner``) that says what it is told.

    Each batch is recorded; its outcome is the next of ``outcomes`` (``done`` once they
    run out). While ``hold`` is not set, runs wait inside their slot (so a scheduler can
    interrupt them); an interrupted run reports its events as interrupted.
    """

    def __init__(self, outcomes: Sequence[Outcome] = (), *, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        """The event ids of every batch run, in order."""
        self.outcomes = list(outcomes)
        self.hold = anyio.Event()
        if not hold:
            self.hold.set()
        self.started = anyio.Event()
        """Set once a run is in its slot."""
        self.finished = anyio.Event()
        """Set after every batch; replaced by a new one then."""

    async def process(
        self, workflow_id: str, slot: RunSlot, batch: list[PendingEntry]
    ) -> BatchReport:
        self.batches.append([p.event.event_id for p in batch])
        outcome: Outcome = self.outcomes.pop(0) if self.outcomes else "done"
        completed = False
        with slot.open():
            self.started.set()
            await self.hold.wait()
            completed = True
        finished, self.finished = self.finished, anyio.Event()
        finished.set()
        if not completed:
            return BatchReport("done", interrupted=len(batch))
        if outcome == "done":
            return BatchReport("done", processed=len(batch))
        return BatchReport(outcome, failed=outcome == "retry")


def workflow_in(settings: Settings, n: int, stem: str) -> str:
    """A workflow id named after ``stem`` that hashes to partition ``n`` (the scheduler
    moves an entry to its workflow's partition before anything else)."""
    return next(
        f"{stem}-{i}"
        for i in range(100_000)
        if partition_of(f"{stem}-{i}", settings.partitions) == n
    )


async def add_partition_entries(
    redis: Redis, settings: Settings, n: int, events: Sequence[tuple[str, str]]
) -> list[tuple[str, dict[bytes, bytes]]]:
    """Append ``(workflow, event_id)`` events to partition ``n`` and read them as the
    group's ``owner`` (so they are pending, as a reader leaves them). Each workflow is
    the :func:`workflow_in` partition ``n`` named after the given one."""
    stream = partition_stream(settings, n)
    await ensure_group(redis, stream, settings.group)
    for workflow, event_id in events:
        workflow_id = workflow_in(settings, n, workflow)
        await redis.xadd(
            stream, {"workflow_id": workflow_id, "event_id": event_id, "content": "text"}
        )
    entries = await read_group(
        redis, group=settings.group, consumer="owner", stream=stream, cursor=">", count=1000,
        block=None,
    )  # fmt: skip
    return [(entry_id, fields) for entry_id, fields in entries if fields is not None]


async def hold_lease(redis: Redis, settings: Settings, n: int, value: str) -> None:
    """Make ``value`` the lease value of partition ``n`` (as an acquired lease)."""
    await redis.set(partition_lease(settings, n)[0], value)
