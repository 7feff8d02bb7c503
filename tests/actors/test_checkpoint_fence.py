"""A zombie's checkpoint write never becomes the workflow's latest state.

The chaos test once ended with a workflow whose state counted 37 events for 40 outputs: an
instance paused between its fence check and the write of the latest-checkpoint pointer, lost
its partition lease meanwhile, and on waking moved the pointer back under the new owner's
feet. These tests open the real Redis checkpointer as the service does and write from a lost
tenure *after* the check would have passed, which is exactly that window.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import AsyncIterator

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.lease import fenced_pointer_writer
from actors.service.partitions import partition_lease
from graph.checkpointer import open_checkpointer
from graph.errors import FencedError

_TENURE: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "test_tenure", default=None
)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def saver(
    client: Redis, redis_url: str, prefix: str
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer(
        "redis",
        namespace=prefix,
        redis_url=redis_url,
        redis_client=client,
        pointer_writer=fenced_pointer_writer(_TENURE.get),
    ) as opened:
        yield opened


async def _put(saver: BaseCheckpointSaver[str], thread: str, events: int) -> str:
    checkpoint = empty_checkpoint()
    checkpoint["id"] = str(uuid6())
    checkpoint["channel_values"] = {"events_processed": events}
    config: RunnableConfig = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    await saver.aput(config, checkpoint, {"source": "loop", "step": events}, {})
    return checkpoint["id"]


async def _latest_events(saver: BaseCheckpointSaver[str], thread: str) -> int:
    found = await saver.aget_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
    assert found is not None
    return int(found.checkpoint["channel_values"]["events_processed"])


async def test_write_from_a_lost_tenure_is_refused_and_latest_stays(
    client: Redis, saver: BaseCheckpointSaver[str], prefix: str
) -> None:
    thread = f"wf-{uuid.uuid4().hex[:6]}"
    lease = partition_lease(Settings(stream_prefix=prefix), 3)[0]
    await client.set(lease, "a|1")
    _TENURE.set((lease, "a|1"))
    await _put(saver, thread, 37)

    await client.set(lease, "b|2")  # a paused instance lost the partition to b
    _TENURE.set((lease, "b|2"))
    await _put(saver, thread, 40)  # the new owner went on

    _TENURE.set((lease, "a|1"))  # the zombie wakes up past its fence check
    with pytest.raises(FencedError):
        await _put(saver, thread, 38)
    assert await _latest_events(saver, thread) == 40


async def test_writes_outside_a_run_are_not_fenced(
    saver: BaseCheckpointSaver[str],
) -> None:
    """Commands (`ctxd rollback`'s fork, tests) write without a partition tenure."""
    thread = f"wf-{uuid.uuid4().hex[:6]}"
    _TENURE.set(None)
    await _put(saver, thread, 1)
    await _put(saver, thread, 2)
    assert await _latest_events(saver, thread) == 2
