"""Checkpoint retention on the real savers: pruning keeps the newest N plus what the
guarantees need, and leaves no orphans (keys, index entries, rows counted before and
after); deleting a workflow removes all of its state and nothing else."""

from __future__ import annotations

import collections
import uuid
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from redis import Redis

from graph.checkpointer import open_checkpointer
from graph.history import checkpoint_history, fork_checkpoint, is_intact
from graph.retention import (
    checkpoint_store,
    delete_workflow_state,
    protected_checkpoints,
    prune_workflow,
)
from graph.work import LocalDispatch
from graph.workflow import (
    ContextualGraph,
    build_contextual_workflow,
    paused_event_id,
    resume_workflow,
    run_events,
    thread_config,
)
from tests_support import MARKET, TECH

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def namespace() -> str:
    return f"tret{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def redis_saver(redis_url: str, namespace: str) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer("redis", namespace=namespace, redis_url=redis_url) as saver:
        yield saver


def _graph(saver: BaseCheckpointSaver[str], *, pauses: bool = False) -> ContextualGraph:
    return build_contextual_workflow(LocalDispatch(), saver, escalation_pauses=pauses)


def _census(redis: Redis, namespace: str, workflow_id: str) -> collections.Counter[str]:
    """Keys of one workflow by kind (checkpoint, checkpoint_write, write_keys_zset, ...)."""
    counts: collections.Counter[str] = collections.Counter()
    for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        kind, _, rest = key.removeprefix(f"{namespace}:").partition(":")
        if rest.startswith(f"{workflow_id}:__empty__"):
            counts[kind] += 1
    return counts


def _docs(redis: Redis, index: str) -> int:
    return int(redis.ft(index).info()["num_docs"])  # type: ignore[no-untyped-call]


async def _events(graph: ContextualGraph, workflow_id: str, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        text = TECH if (i // 3) % 2 == 0 else MARKET  # shifts close segments now and then
        await run_events(graph, workflow_id, [{"event_id": f"e{i}", "content": text}])


async def test_redis_prune_keeps_the_newest_and_leaves_no_orphans(
    redis_saver: BaseCheckpointSaver[str], redis: Redis, namespace: str
) -> None:
    graph = _graph(redis_saver)
    workflow_id, other = "wf", "wf:b"  # one id is a prefix of the other's keys
    await _events(graph, workflow_id, 12)
    await _events(graph, other, 3)
    # a paused escalation leaves pending writes and a write registry on its checkpoint
    paused_graph = _graph(redis_saver, pauses=True)
    run = await run_events(
        paused_graph, workflow_id, [{"event_id": "p", "content": "ok", "priority": "critical"}]
    )
    assert run.interrupted
    before = _census(redis, namespace, workflow_id)
    assert before["checkpoint"] == 13
    assert before["checkpoint_write"] >= 1
    assert before["write_keys_zset"] >= 1
    docs_before = _docs(redis, f"{namespace}:checkpoint")
    other_before = _census(redis, namespace, other)
    protected = await protected_checkpoints(graph, workflow_id)

    store = checkpoint_store(redis_saver)
    deleted = await prune_workflow(graph, store, workflow_id, 4)

    history = await checkpoint_history(graph, workflow_id)
    kept = {h.checkpoint_id for h in history}
    assert deleted == 13 - len(kept)
    assert len(kept) == len({*[h.checkpoint_id for h in history[:4]], *protected})
    assert protected <= kept
    after = _census(redis, namespace, workflow_id)
    assert after["checkpoint"] == len(kept)
    assert _docs(redis, f"{namespace}:checkpoint") == docs_before - deleted  # index entries go
    # writes and registries exist only for kept checkpoints
    for key in redis.scan_iter(match=f"{namespace}:checkpoint_write:{workflow_id}:*"):
        assert key.split(":")[4] in kept, key
    for key in redis.scan_iter(match=f"{namespace}:write_keys_zset:{workflow_id}:*"):
        assert key.split(":")[-1] in kept, key
    assert _census(redis, namespace, other) == other_before
    # the pause survived: resume works on the pruned history
    assert await paused_event_id(paused_graph, workflow_id) == "p"
    resumed = await resume_workflow(paused_graph, workflow_id, None, control_event_id="c1")
    assert resumed.results["p"]["status"] == "ok"


async def test_pruning_keeps_rollback_points_and_every_listed_checkpoint_forks(
    redis_saver: BaseCheckpointSaver[str],
) -> None:
    graph = _graph(redis_saver)
    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    await _events(graph, workflow_id, 15)
    values = (await graph.aget_state(thread_config(workflow_id))).values
    points = {s["checkpoint_id"] for s in values["segments"] if s.get("checkpoint_id")}
    assert points, "the workload closes segments"
    await prune_workflow(graph, checkpoint_store(redis_saver), workflow_id, 2)
    history = await checkpoint_history(graph, workflow_id)
    listed = [h.checkpoint_id for h in history]
    assert points <= set(listed)
    assert len(listed) < 15
    for checkpoint_id in listed:  # ctxd rollback to any listed checkpoint works
        forked = await fork_checkpoint(graph, workflow_id, checkpoint_id)
        state = await graph.aget_state(thread_config(workflow_id))
        assert state.config["configurable"]["checkpoint_id"] == forked
        assert is_intact(state.values)


async def test_integrity_recovery_after_pruning(redis_saver: BaseCheckpointSaver[str]) -> None:
    """A tampered latest checkpoint still rolls back to the last good one."""
    graph = _graph(redis_saver)
    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    await _events(graph, workflow_id, 6)
    store = checkpoint_store(redis_saver)
    await prune_workflow(graph, store, workflow_id, 2)
    good = (await graph.aget_state(thread_config(workflow_id))).config["configurable"][
        "checkpoint_id"
    ]
    await graph.aupdate_state(thread_config(workflow_id), {"analysis": "tampered"})
    # a prune between the tampering and the next event keeps the last good checkpoint
    await prune_workflow(graph, store, workflow_id, 2)
    await prune_workflow(graph, store, workflow_id, 2)
    assert good in await protected_checkpoints(graph, workflow_id)
    run = await run_events(graph, workflow_id, [{"event_id": "x", "content": TECH}])
    assert run.results["x"]["state_integrity"] == "corrupted"
    assert run.recovered_to == good
    assert (await graph.aget_state(thread_config(workflow_id))).values["analysis"] != "tampered"


async def test_redis_delete_workflow_state_removes_everything_of_it_only(
    redis_saver: BaseCheckpointSaver[str], redis: Redis, namespace: str
) -> None:
    graph = _graph(redis_saver, pauses=True)
    await _events(graph, "wf", 3)
    await run_events(graph, "wf", [{"event_id": "p", "content": "ok", "priority": "critical"}])
    await _events(graph, "wf:b", 2)
    other = _census(redis, namespace, "wf:b")
    docs = _docs(redis, f"{namespace}:checkpoint"), _docs(redis, f"{namespace}:checkpoint_write")
    assert await delete_workflow_state(redis_saver, "wf") == 4
    assert not _census(redis, namespace, "wf")
    assert not list(redis.scan_iter(match=f"{namespace}:*:wf:__empty__*"))
    assert _census(redis, namespace, "wf:b") == other
    assert _docs(redis, f"{namespace}:checkpoint") == docs[0] - 4
    assert _docs(redis, f"{namespace}:checkpoint_write") < docs[1]
    state = await graph.aget_state(thread_config("wf"))
    assert not state.values  # a new workflow from scratch
    await _events(graph, "wf", 1)
    assert (await graph.aget_state(thread_config("wf"))).values["events_processed"] == 1


def _pg_rows(namespace: str, workflow_id: str) -> dict[str, int]:
    with psycopg.connect(POSTGRES_URL) as conn:
        counts = {}
        for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
            row = conn.execute(
                f'SELECT count(*) FROM "{namespace}".{table} WHERE thread_id = %s',
                (workflow_id,),
            ).fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts


def _pg_orphan_blobs(namespace: str, workflow_id: str) -> int:
    """Blob rows no checkpoint of the workflow refers to."""
    with psycopg.connect(POSTGRES_URL) as conn:
        row = conn.execute(
            f"""SELECT count(*) FROM "{namespace}".checkpoint_blobs b
            WHERE b.thread_id = %s AND NOT EXISTS (
                SELECT 1 FROM "{namespace}".checkpoints c
                WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns
                AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version)""",
            (workflow_id,),
        ).fetchone()
        return int(row[0]) if row else 0


@pytest.mark.postgres
async def test_postgres_prune_and_delete_leave_no_orphans(namespace: str) -> None:
    async with open_checkpointer(
        "postgres", namespace=namespace, postgres_url=POSTGRES_URL
    ) as saver:
        try:
            graph = _graph(saver, pauses=True)
            await _events(graph, "wf", 10)
            await run_events(
                graph, "wf", [{"event_id": "p", "content": "ok", "priority": "critical"}]
            )
            before = _pg_rows(namespace, "wf")
            assert _pg_orphan_blobs(namespace, "wf") == 0
            values = {h.checkpoint_id: h.values for h in await checkpoint_history(graph, "wf")}
            assert before["checkpoints"] == 11
            assert before["checkpoint_blobs"] > 0
            assert before["checkpoint_writes"] > 0
            deleted = await prune_workflow(graph, checkpoint_store(saver), "wf", 3)
            after = _pg_rows(namespace, "wf")
            assert after["checkpoints"] == 11 - deleted <= 3 + 3
            assert after["checkpoint_blobs"] < before["checkpoint_blobs"]
            assert _pg_orphan_blobs(namespace, "wf") == 0
            history = await checkpoint_history(graph, "wf")
            assert len(history) == after["checkpoints"]
            for h in history:  # every kept checkpoint loads as it did before the prune
                assert h.values == values[h.checkpoint_id]
            assert await paused_event_id(graph, "wf") == "p"
            resumed = await resume_workflow(graph, "wf", None, control_event_id="c1")
            assert resumed.results["p"]["status"] == "ok"
            assert await delete_workflow_state(saver, "wf") == after["checkpoints"] + 1
            assert _pg_rows(namespace, "wf") == {
                "checkpoints": 0,
                "checkpoint_writes": 0,
                "checkpoint_blobs": 0,
            }
        finally:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


async def test_memory_prune_keeps_the_newest() -> None:
    async with open_checkpointer("memory", namespace="m") as saver:
        graph = _graph(saver)
        await _events(graph, "wf", 8)
        deleted = await prune_workflow(graph, checkpoint_store(saver), "wf", 3)
        history = await checkpoint_history(graph, "wf")
        assert deleted == 8 - len(history)
        assert 3 <= len(history) < 8
        assert all(h.values for h in history)


async def test_redis_prune_and_delete_are_exact_about_the_workflow_id(
    redis_saver: BaseCheckpointSaver[str], redis: Redis, namespace: str
) -> None:
    """RediSearch tags ignore case and ``_`` needs escaping: pruning ``acme`` counts only
    ``acme``'s checkpoints (not ``ACME``'s), deleting ``acme`` leaves ``ACME`` whole and
    ends, and the workflow named ``_`` can be pruned and deleted."""
    graph = _graph(redis_saver)
    store = checkpoint_store(redis_saver)
    await _events(graph, "acme", 4)
    await _events(graph, "ACME", 12)
    await _events(graph, "_", 3)
    acme_before = _census(redis, namespace, "acme")["checkpoint"]
    upper_before = _census(redis, namespace, "ACME")["checkpoint"]

    assert {i for _, i in await store.checkpoint_ids("acme")} == {
        h.checkpoint_id for h in await checkpoint_history(graph, "acme")
    }
    await prune_workflow(graph, store, "acme", retain=100)
    assert _census(redis, namespace, "acme")["checkpoint"] == acme_before

    with anyio.fail_after(30):
        assert await delete_workflow_state(redis_saver, "acme") == acme_before
        assert await delete_workflow_state(redis_saver, "_") > 0
    assert _census(redis, namespace, "acme")["checkpoint"] == 0
    assert _census(redis, namespace, "_")["checkpoint"] == 0
    assert _census(redis, namespace, "ACME")["checkpoint"] == upper_before
