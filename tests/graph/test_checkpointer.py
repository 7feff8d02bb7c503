"""Checkpointers: the strict serializer, and the real AsyncRedisSaver and PostgreSQL
savers (persistence across graph instances, history, forks, interrupt/resume,
integrity recovery)."""

from __future__ import annotations

import pickle
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import ormsgpack
import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.redis.jsonplus_redis import JsonPlusRedisSerializer
from langgraph.checkpoint.serde.jsonplus import (
    EXT_CONSTRUCTOR_POS_ARGS,
    EXT_CONSTRUCTOR_SINGLE_ARG,
    JsonPlusSerializer,
)
from redis import Redis

from graph.checkpointer import open_checkpointer, strict_serializer
from graph.errors import WorkflowError
from graph.history import checkpoint_history, fork_checkpoint, is_intact, latest_checkpoint_id
from graph.json_values import as_list, as_object
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
NAMESPACE = "tckpt"
"""The CTXD_STREAM_PREFIX these tests' checkpoints live under."""

REVIVED: list[str] = []


@dataclass
class Exploit:
    """A class whose construction is a side effect the strict serializer must prevent."""

    command: str

    def __post_init__(self) -> None:
        REVIVED.append(self.command)


# -- the strict serializer ----------------------------------------------------------


def _ext(code: int, payload: object) -> bytes:
    return ormsgpack.packb(ormsgpack.Ext(code, ormsgpack.packb(payload)))


def test_strict_serializer_refuses_crafted_constructor_ext(tmp_path: Path) -> None:
    """A msgpack ext naming os.system is returned as inert data; nothing runs."""
    marker = tmp_path / "pwned"
    serde = strict_serializer()
    crafted = _ext(EXT_CONSTRUCTOR_SINGLE_ARG, ["os", "system", f"touch {marker}"])
    assert serde.loads_typed(("msgpack", crafted)) == f"touch {marker}"
    crafted = _ext(EXT_CONSTRUCTOR_POS_ARGS, ["subprocess", "run", [["touch", str(marker)]]])
    assert serde.loads_typed(("msgpack", crafted)) == [["touch", str(marker)]]
    assert not marker.exists()


def test_strict_serializer_has_no_pickle_fallback() -> None:
    serde = strict_serializer()
    with pytest.raises(NotImplementedError):
        serde.loads_typed(("pickle", pickle.dumps({"a": 1})))


def test_a_non_allowed_object_in_a_checkpoint_is_not_revived() -> None:
    """Written by a permissive saver, read by ctxd's strict one: plain data comes back."""
    REVIVED.clear()
    permissive = JsonPlusSerializer(allowed_msgpack_modules=True)
    typed = permissive.dumps_typed({"payload": Exploit("rm -rf /")})
    REVIVED.clear()
    loaded = strict_serializer().loads_typed(typed)
    assert not isinstance(loaded["payload"], Exploit)
    assert REVIVED == []


# -- savers ---------------------------------------------------------------------------


@pytest.fixture
async def redis_saver(redis_url: str) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer("redis", namespace=NAMESPACE, redis_url=redis_url) as saver:
        yield saver


def _graph(saver: BaseCheckpointSaver[str], *, pauses: bool = False) -> ContextualGraph:
    return build_contextual_workflow(LocalDispatch(), saver, escalation_pauses=pauses)


def _wf() -> str:
    return f"wf-{uuid.uuid4().hex[:12]}"


async def test_redis_saver_refuses_a_non_allowed_object_on_load(
    redis_saver: BaseCheckpointSaver[str],
) -> None:
    """A checkpoint holding a foreign object, stored in Redis, loads as inert data."""
    config = thread_config(_wf())
    config["configurable"]["checkpoint_ns"] = ""
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"health": {"x": Exploit("touch /tmp/x")}}
    strict = redis_saver.serde
    redis_saver.serde = JsonPlusRedisSerializer(allowed_msgpack_modules=True)
    try:
        stored = await redis_saver.aput(config, checkpoint, {"source": "input", "step": -1}, {})
    finally:
        redis_saver.serde = strict
    REVIVED.clear()
    loaded = await redis_saver.aget_tuple(stored)
    assert loaded is not None
    value = loaded.checkpoint["channel_values"]["health"]["x"]
    assert not isinstance(value, Exploit)
    assert REVIVED == []


async def test_state_persists_across_graph_instances_on_redis(
    redis_url: str, redis_saver: BaseCheckpointSaver[str]
) -> None:
    """A new saver and graph (a restarted service) continue the workflow's context."""
    workflow_id = _wf()
    first = await run_events(
        _graph(redis_saver), workflow_id, [{"event_id": "e1", "content": TECH}]
    )
    async with open_checkpointer("redis", namespace=NAMESPACE, redis_url=redis_url) as other:
        graph = _graph(other)
        assert await latest_checkpoint_id(graph, workflow_id) == first.checkpoint_id
        second = await run_events(graph, workflow_id, [{"event_id": "e2", "content": TECH}])
        values = (await graph.aget_state(thread_config(workflow_id))).values
    assert values["events_processed"] == 2
    assert len(values["window"]) == 2
    assert second.checkpoint_id != first.checkpoint_id
    # a redelivered event whose result is durable is not processed twice
    again = await run_events(
        _graph(redis_saver), workflow_id, [{"event_id": "e2", "content": TECH}]
    )
    repeated, original = again.results["e2"], second.results["e2"]
    assert {k: v for k, v in repeated.items() if k != "scores"} == {
        k: v for k, v in original.items() if k != "scores"
    }
    assert repeated["scores"] == pytest.approx(original["scores"])
    values = (await _graph(redis_saver).aget_state(thread_config(workflow_id))).values
    assert values["events_processed"] == 2


async def _history_and_fork(saver: BaseCheckpointSaver[str]) -> str:
    graph = _graph(saver)
    workflow_id = _wf()
    runs = [
        await run_events(graph, workflow_id, [{"event_id": f"e{i}", "content": text}])
        for i, text in enumerate([TECH, TECH, MARKET])
    ]
    history = await checkpoint_history(graph, workflow_id)
    ids = [h.checkpoint_id for h in history]
    assert [r.checkpoint_id for r in reversed(runs)] == ids[:3]
    assert [h.events_processed for h in history[:3]] == [3, 2, 1]
    assert all(h.intact for h in history)
    forked = await fork_checkpoint(graph, workflow_id, str(runs[0].checkpoint_id))
    assert forked not in ids
    state = await graph.aget_state(thread_config(workflow_id))
    assert state.config["configurable"]["checkpoint_id"] == forked
    assert state.values["events_processed"] == 1
    after = await checkpoint_history(graph, workflow_id)
    assert {h.checkpoint_id for h in after} >= set(ids) | {forked}  # history is kept
    # the workflow goes on from the fork
    run = await run_events(graph, workflow_id, [{"event_id": "e9", "content": TECH}])
    values = (await graph.aget_state(thread_config(workflow_id))).values
    assert values["events_processed"] == 2
    assert run.results["e9"]["status"] in ("ok", "fallback")
    with pytest.raises(WorkflowError, match="has no checkpoint"):
        await fork_checkpoint(graph, workflow_id, "1f0-not-a-checkpoint")
    return workflow_id


async def test_history_and_fork_on_redis(redis_saver: BaseCheckpointSaver[str]) -> None:
    await _history_and_fork(redis_saver)


async def test_interrupt_and_resume_through_redis_across_a_restart(
    redis_url: str, redis_saver: BaseCheckpointSaver[str]
) -> None:
    """The pause is durable in Redis: another saver instance sees it and resumes it."""
    workflow_id = _wf()
    run = await run_events(
        _graph(redis_saver, pauses=True),
        workflow_id,
        [{"event_id": "e1", "content": "ok", "priority": "critical"}],
    )
    assert run.interrupted
    assert run.results["e1"]["status"] == "escalated"
    async with open_checkpointer("redis", namespace=NAMESPACE, redis_url=redis_url) as other:
        graph = _graph(other, pauses=True)
        assert await paused_event_id(graph, workflow_id) == "e1"
        resumed = await resume_workflow(graph, workflow_id, "approved", control_event_id="c1")
        assert resumed.results["e1"]["status"] == "ok"
        assert await paused_event_id(graph, workflow_id) is None
        values = (await graph.aget_state(thread_config(workflow_id))).values
        assert values["decisions"][-1]["resolution"]["value"] == "approved"


async def test_state_changed_outside_the_graph_is_detected_and_rolled_back(
    redis_saver: BaseCheckpointSaver[str],
) -> None:
    """Altering a stored checkpoint's values: the next event's monitor reports
    state_integrity=corrupted and the workflow is rolled back to the last good one."""
    graph = _graph(redis_saver)
    workflow_id = _wf()
    good = await run_events(graph, workflow_id, [{"event_id": "e1", "content": TECH}])
    good_values = (await graph.aget_state(thread_config(workflow_id))).values
    # someone writes to the checkpoint store, bypassing the graph's nodes
    await graph.aupdate_state(
        thread_config(workflow_id), {"analysis": "tampered", "events_processed": 99}
    )
    tampered = await graph.aget_state(thread_config(workflow_id))
    assert tampered.values["analysis"] == "tampered"
    assert not is_intact(tampered.values)

    run = await run_events(graph, workflow_id, [{"event_id": "e2", "content": TECH}])
    result = run.results["e2"]
    assert result["state_integrity"] == "corrupted"
    assert result["status"] == "error"
    assert run.recovered_to == good.checkpoint_id
    history = await checkpoint_history(graph, workflow_id)
    monitored = next(h for h in history if h.values.get("inbox") == [] and not h.intact)
    health = as_object(monitored.values["health"])
    assert health["state_integrity"] == "corrupted"
    assert "initiate_state_recovery" in as_list(health["recovery_actions"])
    current = await graph.aget_state(thread_config(workflow_id))
    assert current.config["configurable"]["checkpoint_id"] == run.checkpoint_id
    assert current.values["analysis"] == good_values["analysis"]
    assert current.values["events_processed"] == 1
    assert is_intact(current.values)
    # and the next event is healthy again
    after = await run_events(graph, workflow_id, [{"event_id": "e3", "content": TECH}])
    assert after.results["e3"]["state_integrity"] == "valid"
    assert after.recovered_to is None


@pytest.mark.postgres
async def test_postgres_namespaces_are_separate_schemas() -> None:
    """Two prefixes on one database: a workflow's state in one is absent in the other."""
    workflow_id = _wf()
    async with open_checkpointer(
        "postgres", namespace=f"{NAMESPACE}-a", postgres_url=POSTGRES_URL
    ) as first:
        await run_events(_graph(first), workflow_id, [{"event_id": "e1", "content": TECH}])
        try:
            assert await first.aget_tuple(thread_config(workflow_id)) is not None
            async with open_checkpointer(
                "postgres", namespace=f"{NAMESPACE}-b", postgres_url=POSTGRES_URL
            ) as second:
                assert await second.aget_tuple(thread_config(workflow_id)) is None
        finally:
            await first.adelete_thread(workflow_id)


@pytest.mark.postgres
async def test_postgres_saver_persists_history_forks_and_resumes() -> None:
    """The seed's PostgreSQL backend, on the machine's PostgreSQL; threads are deleted."""
    threads: list[str] = []
    async with open_checkpointer(
        "postgres", namespace=NAMESPACE, postgres_url=POSTGRES_URL
    ) as saver:
        try:
            threads.append(await _history_and_fork(saver))
            workflow_id = _wf()
            threads.append(workflow_id)
            run = await run_events(
                _graph(saver, pauses=True),
                workflow_id,
                [{"event_id": "e1", "content": "ok", "priority": "critical"}],
            )
            assert run.interrupted
            async with open_checkpointer(
                "postgres", namespace=NAMESPACE, postgres_url=POSTGRES_URL
            ) as other:
                graph = _graph(other, pauses=True)
                assert await paused_event_id(graph, workflow_id) == "e1"
                resumed = await resume_workflow(graph, workflow_id, None, control_event_id="c1")
                assert resumed.results["e1"]["status"] == "ok"
        finally:
            for workflow_id in threads:
                await saver.adelete_thread(workflow_id)
        for workflow_id in threads:
            assert await saver.aget_tuple(thread_config(workflow_id)) is None


async def test_a_rewritten_stored_checkpoint_is_detected_and_rolled_back(
    redis_saver: BaseCheckpointSaver[str], redis: Redis
) -> None:
    """Rewriting the stored JSON of the latest checkpoint in Redis (no LangGraph call):
    the next event reports corrupted and the workflow goes back to the one before."""
    graph = _graph(redis_saver)
    workflow_id = _wf()
    first = await run_events(graph, workflow_id, [{"event_id": "e1", "content": TECH}])
    second = await run_events(graph, workflow_id, [{"event_id": "e2", "content": TECH}])
    key = f"{NAMESPACE}:checkpoint:{workflow_id}:__empty__:{second.checkpoint_id}"
    assert redis.json().get(key, "$.checkpoint.channel_values.events_processed") == [2]
    redis.json().set(key, "$.checkpoint.channel_values.window", ["forged"])

    run = await run_events(graph, workflow_id, [{"event_id": "e3", "content": TECH}])
    assert run.results["e3"]["state_integrity"] == "corrupted"
    assert run.recovered_to == first.checkpoint_id
    current = await graph.aget_state(thread_config(workflow_id))
    assert current.values["events_processed"] == 1
    assert "forged" not in current.values["window"]


async def test_instances_starting_together_on_a_fresh_redis_all_open_the_saver(
    tmp_path: Path,
) -> None:
    """Each opener creates the search indexes; only one FT.CREATE can win the race."""
    from actors.app.redis_server import open_embedded_redis

    opened: list[str] = []

    async def open_one(url: str) -> None:
        async with open_checkpointer("redis", namespace=NAMESPACE, redis_url=url) as saver:
            opened.append(type(saver).__mro__[1].__name__)  # the namespaced subclass's base

    with open_embedded_redis(tmp_path / "fresh") as server:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(open_one, server.url)
    assert opened == ["AsyncRedisSaver"] * 4
