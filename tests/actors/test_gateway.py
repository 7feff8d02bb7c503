"""The fenced-write gateway against a real Redis: commits, DLQ moves, reads and routing
refuse with FencedError once the lease moved, commits are idempotent by done key, the
DLQ path respects the done key, and parked replays commit through the same path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.redis_io import text
from actors.runtime.scripts import call_script
from actors.service.gateway import (
    FencedReader,
    OutputCommitter,
    dead_letter,
    output_item,
    route_entries,
)
from actors.service.lease import CheckpointFence, Leases
from actors.service.parking import AckTarget, WorkflowRunner, parked_stream
from actors.service.partitions import lease_key, partition_lease, partition_of
from actors.service.streams import done_key, ensure_group
from actors.service.validation import parse_event
from graph.checkpointer import strict_serializer
from graph.errors import CtxdError, FencedError
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow

TECH = "The API latency of the database cluster rose after the deploy; pods restart."


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _held_lease(aredis: Redis, settings: Settings, name: str) -> tuple[str, str]:
    """Acquire lease ``name`` (``part:<n>`` or ``router``) for this instance: (key, value)."""
    if name.startswith("part:"):
        key, fence = partition_lease(settings, int(name.removeprefix("part:")))
    else:
        key, fence = lease_key(settings, name)
    value = await Leases(aredis, settings.instance, 30.0).acquire(key, fence)
    assert value is not None
    return key, value


async def _move_lease(aredis: Redis, lease: tuple[str, str]) -> None:
    """Another instance takes the lease over (ours expired)."""
    await aredis.set(lease[0], "other|999")


async def _entries(aredis: Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await aredis.xrange(stream))


async def _pending_entry(aredis: Redis, settings: Settings, stream: str, event_id: str) -> str:
    await ensure_group(aredis, stream, settings.group)
    entry_id = await aredis.xadd(stream, {"workflow_id": "w", "event_id": event_id})
    await aredis.xreadgroup(settings.group, "owner", {stream: ">"})
    return text(entry_id)


def test_fenced_error_is_under_the_root_error() -> None:
    assert issubclass(FencedError, CtxdError)


async def test_commit_writes_once_and_is_refused_with_fenced_error_after_the_lease_moved(
    aredis: Redis, settings: Settings
) -> None:
    lease = await _held_lease(aredis, settings, "part:0")
    stream = f"{settings.input_stream}:p"
    committer = OutputCommitter.from_settings(aredis, settings)
    first = await _pending_entry(aredis, settings, stream, "e1")
    item = output_item(
        settings, "w", "e1", first, {"status": "ok"}, trace_id="t", checkpoint_id="c"
    )
    ids = await committer.commit([item], input_stream=stream, lease=lease)
    assert ids[0]
    assert await aredis.xlen(settings.output_stream) == 1

    await _move_lease(aredis, lease)
    second = await _pending_entry(aredis, settings, stream, "e2")
    item = output_item(
        settings, "w", "e2", second, {"status": "ok"}, trace_id="t", checkpoint_id="c"
    )
    with pytest.raises(FencedError, match=lease[0]):
        await committer.commit([item], input_stream=stream, lease=lease)
    assert await aredis.xlen(settings.output_stream) == 1  # nothing written
    assert await aredis.get(done_key(settings, "w", "e2")) is None
    assert (await aredis.xpending(stream, settings.group))["pending"] == 1  # still ours to redo


async def test_a_repeated_event_id_commits_no_second_output_but_settles_its_input(
    aredis: Redis, settings: Settings
) -> None:
    lease = await _held_lease(aredis, settings, "part:0")
    stream = f"{settings.input_stream}:p"
    committer = OutputCommitter.from_settings(aredis, settings)
    ids = []
    for _ in range(2):
        entry_id = await _pending_entry(aredis, settings, stream, "same")
        item = output_item(
            settings, "w", "same", entry_id, {"status": "ok"}, trace_id="", checkpoint_id=""
        )
        ids += await committer.commit([item], input_stream=stream, lease=lease)
    assert ids[0]
    assert ids[1] == ""
    assert await aredis.xlen(settings.output_stream) == 1
    assert await aredis.get(done_key(settings, "w", "same")) == ids[0].encode()
    assert (await aredis.xpending(stream, settings.group))["pending"] == 0


async def test_dead_letter_settles_without_a_dlq_entry_when_the_done_key_exists(
    aredis: Redis, settings: Settings
) -> None:
    lease = await _held_lease(aredis, settings, "part:0")
    stream = f"{settings.input_stream}:p"
    key = done_key(settings, "w", "e1")

    async def poison() -> str:
        entry_id = await _pending_entry(aredis, settings, stream, "e1")
        return await dead_letter(
            aredis,
            dlq_stream=settings.dlq_stream,
            input_stream=stream,
            group=settings.group,
            source_id=entry_id,
            fields={"event_id": "e1"},
            reason="poison",
            error="failed",
            attempts=5,
            lease=lease,
            done_key=key,
        )

    assert await poison()
    assert await aredis.xlen(settings.dlq_stream) == 1
    await aredis.set(key, "1-0")  # the event's output is committed (a lost commit reply)
    dlq_id = await poison()
    assert dlq_id == ""
    assert await aredis.xlen(settings.dlq_stream) == 1
    assert (await aredis.xpending(stream, settings.group))["pending"] == 0


async def test_dead_letter_is_refused_with_fenced_error_after_the_lease_moved(
    aredis: Redis, settings: Settings
) -> None:
    lease = await _held_lease(aredis, settings, "part:0")
    stream = f"{settings.input_stream}:p"
    entry_id = await _pending_entry(aredis, settings, stream, "e1")
    await _move_lease(aredis, lease)
    with pytest.raises(FencedError):
        await dead_letter(
            aredis,
            dlq_stream=settings.dlq_stream,
            input_stream=stream,
            group=settings.group,
            source_id=entry_id,
            fields={"event_id": "e1"},
            reason="poison",
            error="failed",
            attempts=5,
            lease=lease,
        )
    assert await aredis.xlen(settings.dlq_stream) == 0
    assert (await aredis.xpending(stream, settings.group))["pending"] == 1


async def test_unfenced_dead_letter_of_a_request_acknowledges_it(
    aredis: Redis, settings: Settings
) -> None:
    """The actor pools' DLQ path: the same script, no lease."""
    mailbox = f"{settings.input_stream}:mailbox"
    entry_id = await _pending_entry(aredis, settings, mailbox, "r1")
    dlq_id = await dead_letter(
        aredis,
        dlq_stream=settings.dlq_stream,
        input_stream=mailbox,
        group=settings.group,
        source_id=entry_id,
        fields={"kind": "analyze"},
        reason="invalid_request",
        error="bad",
        attempts=1,
    )
    entries = await _entries(aredis, settings.dlq_stream)
    assert [e for e, _ in entries] == [dlq_id.encode()]
    assert entries[0][1][b"reason"] == b"invalid_request"
    assert (await aredis.xpending(mailbox, settings.group))["pending"] == 0


async def test_fenced_read_and_route_are_refused_after_the_lease_moved(
    aredis: Redis, settings: Settings
) -> None:
    lease = await _held_lease(aredis, settings, "router")
    await ensure_group(aredis, settings.input_stream, settings.group)
    await aredis.xadd(settings.input_stream, {"workflow_id": "w"})
    reader = FencedReader(aredis, group=settings.group, consumer="router")
    entries, last = await reader.read(settings.input_stream, ">", 10, lease=lease)
    assert [e for e, _ in entries] == [last]
    target = f"{settings.input_stream}:target"
    await route_entries(
        aredis,
        lease=lease,
        input_stream=settings.input_stream,
        group=settings.group,
        moves=[(last, target, {b"workflow_id": b"w"})],
    )
    assert await aredis.xlen(target) == 1

    await aredis.xadd(settings.input_stream, {"workflow_id": "w"})
    await _move_lease(aredis, lease)
    with pytest.raises(FencedError):
        await reader.read(settings.input_stream, ">", 10, lease=lease)
    assert (await aredis.xpending(settings.input_stream, settings.group))["pending"] == 0
    with pytest.raises(FencedError):
        await route_entries(
            aredis,
            lease=lease,
            input_stream=settings.input_stream,
            group=settings.group,
            moves=[("0-1", target, {b"workflow_id": b"w"})],
        )
    assert await aredis.xlen(target) == 1


async def test_call_script_passes_other_script_errors_through(aredis: Redis) -> None:
    with pytest.raises(ResponseError) as caught:
        await call_script(aredis, "return redis.error_reply('NOTFENCED no')", keys=[], args=[])
    assert not isinstance(caught.value, FencedError)
    assert not scripts.is_fenced(caught.value)


async def test_a_parked_replay_commits_through_the_fenced_commit_path(
    aredis: Redis, settings: Settings, prefix: str
) -> None:
    """A replay is refused like any commit once the partition moved: the parked entry
    stays for the new owner, no output is written; with the lease it commits once."""
    workflow_id = f"{prefix}-w"
    n = partition_of(workflow_id, settings.partitions)
    lease = await _held_lease(aredis, settings, f"part:{n}")
    stream = parked_stream(settings, workflow_id)
    parked = {"workflow_id": workflow_id, "event_id": "p1", "content": TECH, "source_id": "0-1"}
    await aredis.xadd(stream, parked)  # type: ignore[arg-type]
    graph = build_contextual_workflow(LocalDispatch(), InMemorySaver(serde=strict_serializer()))
    runner = WorkflowRunner(aredis, settings, graph)
    newer = {"workflow_id": workflow_id, "event_id": "n1", "content": TECH}
    event = parse_event("0-2", newer)
    ack = AckTarget(stream=settings.input_stream, entry_ids={"0-2": "0-2"}, lease=lease)

    await _move_lease(aredis, lease)
    with pytest.raises(FencedError):
        await runner.run(workflow_id, [(event, newer)], ack=ack)
    assert await aredis.xlen(stream) == 1
    assert await aredis.xlen(settings.output_stream) == 0

    await aredis.set(*lease)  # ours again
    await runner.run(workflow_id, [(event, newer)], ack=ack)
    outputs = await _entries(aredis, settings.output_stream)
    assert [f[b"event_id"] for _, f in outputs] == [b"p1"]
    assert await aredis.xlen(stream) == 0
    assert await aredis.get(done_key(settings, workflow_id, "p1")) == outputs[0][0]


async def test_checkpoint_fence_admits_only_the_current_tenure_of_the_workflows_partition(
    aredis: Redis, settings: Settings, prefix: str
) -> None:
    workflow_id = f"{prefix}-w"
    n = partition_of(workflow_id, settings.partitions)
    lease = await _held_lease(aredis, settings, f"part:{n}")
    fence = CheckpointFence(aredis, settings)
    with pytest.raises(FencedError, match="outside a run"):
        await fence.check(workflow_id)
    with CheckpointFence.tenure(lease):
        await fence.check(workflow_id)
    other = (partition_lease(settings, n + 1)[0], lease[1])
    with CheckpointFence.tenure(other), pytest.raises(FencedError):
        await fence.check(workflow_id)
    await _move_lease(aredis, lease)
    with CheckpointFence.tenure(lease), pytest.raises(FencedError, match="not ours"):
        await fence.check(workflow_id)
