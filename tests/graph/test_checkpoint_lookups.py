"""Checkpoint lookups by workflow id on the Redis saver are exact: RediSearch tags match
without regard to case, so ``acme``'s search also found ``ACME``'s checkpoints; a busy
``ACME`` then crowded ``acme``'s good checkpoints out of the recovery's search (found by
the adversary review of issue 11)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from redis import Redis
from state_corruption import checkpoint_key

from graph.checkpointer import open_checkpointer
from graph.history import checkpoint_history, checkpoint_ids, fork_checkpoint
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow, run_events
from tests_support import MARKET, TECH


@pytest.fixture
async def saver(redis_url: str, prefix: str) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer("redis", namespace=prefix, redis_url=redis_url) as opened:
        yield opened


async def test_a_busy_workflow_differing_only_in_case_does_not_hide_the_good_checkpoint(
    saver: BaseCheckpointSaver[str], redis: Redis
) -> None:
    graph = build_contextual_workflow(LocalDispatch(), saver)
    good = await run_events(graph, "acme", [{"event_id": "e1", "content": TECH}])
    bad = await run_events(graph, "acme", [{"event_id": "e2", "content": MARKET}])
    other = await run_events(graph, "ACME", [{"event_id": "e1", "content": TECH}])
    for _ in range(210):  # more than the 200 checkpoints the recovery looks at
        await fork_checkpoint(graph, "ACME", str(other.checkpoint_id))

    ids = await checkpoint_ids(graph, "acme")
    assert ids[:2] == [bad.checkpoint_id, good.checkpoint_id]
    assert other.checkpoint_id not in ids
    listed = {info.checkpoint_id for info in await checkpoint_history(graph, "acme", limit=50)}
    assert {good.checkpoint_id, bad.checkpoint_id} <= listed
    assert other.checkpoint_id not in listed

    redis.json().set(
        checkpoint_key(redis, "acme", str(bad.checkpoint_id)),
        "$.checkpoint.channel_values.window",
        5,
    )
    run = await run_events(graph, "acme", [{"event_id": "e3", "content": TECH}])
    assert f"rolled back to checkpoint {good.checkpoint_id}" in str(run.results["e3"]["error"])


async def test_the_workflow_named_underscore_has_a_history(
    saver: BaseCheckpointSaver[str],
) -> None:
    graph = build_contextual_workflow(LocalDispatch(), saver)
    first = await run_events(graph, "_", [{"event_id": "e1", "content": TECH}])
    assert await checkpoint_ids(graph, "_") == [first.checkpoint_id]
    assert [info.checkpoint_id for info in await checkpoint_history(graph, "_")] == [
        first.checkpoint_id
    ]
