"""Stored state that does not fit the schema, corrupted in the store itself (RedisJSON
documents of the Redis saver; the memory saver's table): detected on load, the workflow
rolled back to its last good checkpoint or given a fresh segment, the event's result
says so in ``error``, the next event is normal, and the history lists the bad one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from redis import Redis
from state_corruption import CASES, checkpoint_key, inject_pickled_write

from graph.checkpointer import open_checkpointer, strict_serializer
from graph.history import checkpoint_history, last_good_checkpoint
from graph.work import LocalDispatch
from graph.workflow import ContextualGraph, build_contextual_workflow, run_events, thread_config
from tests_support import MARKET, TECH


@pytest.fixture
async def saver(redis_url: str, prefix: str) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer("redis", namespace=prefix, redis_url=redis_url) as opened:
        yield opened


def _graph(saver: BaseCheckpointSaver[str]) -> ContextualGraph:
    return build_contextual_workflow(LocalDispatch(), saver)


def _wf() -> str:
    return f"wf-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_stored_checkpoint_is_rolled_back_with_an_error_result(
    saver: BaseCheckpointSaver[str], redis: Redis, case: str
) -> None:
    corrupt, expected = CASES[case]
    graph = _graph(saver)
    workflow_id = _wf()
    good = await run_events(graph, workflow_id, [{"event_id": "e1", "content": TECH}])
    bad = await run_events(graph, workflow_id, [{"event_id": "e2", "content": MARKET}])
    corrupt(redis, checkpoint_key(redis, workflow_id, str(bad.checkpoint_id)))

    run = await run_events(graph, workflow_id, [{"event_id": "e3", "content": TECH}])
    error = str(run.results["e3"]["error"])
    assert expected in error
    assert f"checkpoint {bad.checkpoint_id} did not fit the schema" in error
    assert f"rolled back to checkpoint {good.checkpoint_id}" in error
    assert run.recovery is not None
    assert run.recovery.restored_from == good.checkpoint_id
    assert run.results["e3"]["status"] in ("ok", "fallback")
    values = (await graph.aget_state(thread_config(workflow_id))).values
    assert values["events_processed"] == 2  # e1 and e3: e2's bad state was left behind

    after = await run_events(graph, workflow_id, [{"event_id": "e4", "content": MARKET}])
    assert not after.results["e4"]["error"]
    assert after.recovery is None

    history = await checkpoint_history(graph, workflow_id)
    flagged = {h.checkpoint_id: h for h in history if h.problems}
    assert list(flagged) == [bad.checkpoint_id]
    assert any(expected in p for p in flagged[str(bad.checkpoint_id)].problems)
    assert len(history) >= 5  # nothing was deleted: e1, e2 (bad), fork, e3, e4


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["redis", "memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_saver(
    request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    """Each checkpointer ctxd supports, with its strict serializer."""
    async with open_checkpointer(
        request.param, namespace=prefix, redis_url=redis_url, postgres_url=POSTGRES_URL
    ) as opened:
        yield opened


async def test_an_undecodable_pickled_write_is_refused_and_rolled_back(
    any_saver: BaseCheckpointSaver[str], tmp_path: Path
) -> None:
    """The strict serializer refuses the pickle (no code runs); the workflow goes on."""
    saver = any_saver
    marker = tmp_path / "pwned"
    graph = _graph(saver)
    workflow_id = _wf()
    good = await run_events(graph, workflow_id, [{"event_id": "e1", "content": TECH}])
    bad = await run_events(graph, workflow_id, [{"event_id": "e2", "content": TECH}])
    await inject_pickled_write(saver, workflow_id, str(bad.checkpoint_id), marker)

    run = await run_events(graph, workflow_id, [{"event_id": "e3", "content": TECH}])
    error = str(run.results["e3"]["error"])
    assert "could not be decoded" in error
    assert "pickle" in error
    assert f"rolled back to checkpoint {good.checkpoint_id}" in error
    after = await run_events(graph, workflow_id, [{"event_id": "e4", "content": TECH}])
    assert not after.results["e4"]["error"]
    history = await checkpoint_history(graph, workflow_id)
    assert [h.checkpoint_id for h in history if h.problems] == [bad.checkpoint_id]
    assert await last_good_checkpoint(graph, workflow_id) == after.checkpoint_id
    assert not marker.exists()
    if hasattr(saver, "adelete_thread"):
        await saver.adelete_thread(workflow_id)


async def test_a_workflow_whose_only_checkpoint_is_bad_starts_a_fresh_segment(
    saver: BaseCheckpointSaver[str], redis: Redis
) -> None:
    graph = _graph(saver)
    workflow_id = _wf()
    only = await run_events(
        graph,
        workflow_id,
        [{"event_id": "e1", "content": TECH}, {"event_id": "e2", "content": MARKET}],
    )
    key = checkpoint_key(redis, workflow_id, str(only.checkpoint_id))
    segment = cast(list[int], redis.json().get(key, "$.checkpoint.channel_values.segment"))[0]
    redis.json().set(key, "$.checkpoint.channel_values.window", 5)

    run = await run_events(graph, workflow_id, [{"event_id": "e3", "content": TECH}])
    error = str(run.results["e3"]["error"])
    assert "window: expected list, got int 5" in error
    assert "no good checkpoint left: started a fresh context segment" in error
    values = (await graph.aget_state(thread_config(workflow_id))).values
    assert values["window"] == [TECH]  # the fresh segment holds only the new event
    assert values["segment"] == segment + 1
    assert values["events_processed"] == 3  # the counter goes on
    after = await run_events(graph, workflow_id, [{"event_id": "e4", "content": TECH}])
    assert not after.results["e4"]["error"]


async def test_memory_saver_undecodable_only_checkpoint_starts_a_fresh_segment() -> None:
    """The memory saver: the stored blob of the only checkpoint does not decode."""
    saver = InMemorySaver(serde=strict_serializer())
    graph = _graph(saver)
    await run_events(graph, "wf", [{"event_id": "e1", "content": TECH}])
    (checkpoint_id, (_, metadata, parent)), *_ = saver.storage["wf"][""].items()
    saver.storage["wf"][""][checkpoint_id] = (("msgpack", b"\xc1 not msgpack"), metadata, parent)

    run = await run_events(graph, "wf", [{"event_id": "e2", "content": TECH}])
    error = str(run.results["e2"]["error"])
    assert f"checkpoint {checkpoint_id} did not fit the schema" in error
    assert "could not be decoded" in error
    assert "fresh context segment" in error
    values = (await graph.aget_state(thread_config("wf"))).values
    assert values["events_processed"] == 1
    assert values["window"] == [TECH]
    history = await checkpoint_history(graph, "wf")
    assert [h.checkpoint_id for h in history if h.problems] == [checkpoint_id]
