"""The retention policy in the service: pruning after commits (through the real
``ctxd run``), the idle-workflow sweep (fenced by the partition lease), the output/DLQ
bounds and the parked-stream bound, and the guarantees that must survive pruning."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import cast

import anyio
import pytest
from actor_support import RawEntries, actor_settings, running
from langgraph.checkpoint.base import BaseCheckpointSaver
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from actors.config import Settings, load_settings
from actors.runtime.mailbox import ActorRequest, mailbox_stream
from actors.service.parking import WorkflowRunner, parked_stream, resume_fields
from actors.service.partitions import partition_lease, workflow_partition
from actors.service.retention import Retention, workflows_key
from actors.service.streams import ensure_group, trim_bounded_streams
from actors.service.tree import ActorSystem
from actors.service.validation import Event, parse_event
from graph.checkpointer import open_checkpointer
from graph.errors import ConfigError, FencedError
from graph.work import LocalDispatch, WorkHandlers
from graph.workflow import ContextualGraph, build_contextual_workflow, run_events, thread_config
from tests_support import MARKET, TECH, ServiceProcess, read_outputs, run_ctxd


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def saver(redis_url: str, prefix: str) -> AsyncIterator[BaseCheckpointSaver[str]]:
    async with open_checkpointer("redis", namespace=prefix, redis_url=redis_url) as opened:
        yield opened


def _graph(saver: BaseCheckpointSaver[str], *, pauses: bool = False) -> ContextualGraph:
    return build_contextual_workflow(LocalDispatch(), saver, escalation_pauses=pauses)


def _checkpoint_keys(redis: Redis, prefix: str, workflow_id: str) -> set[str]:
    return {
        key.rsplit(":", 1)[1]
        for key in redis.scan_iter(match=f"{prefix}:checkpoint:{workflow_id}:__empty__:*")
    }


# -- settings ---------------------------------------------------------------------------


def test_retention_settings_parse_validate_and_turn_off() -> None:
    settings = load_settings({})
    assert settings.retain_checkpoints == 20
    assert settings.dedupe_ttl == 86400
    assert settings.idle_workflow_ttl == 30 * 86400
    off = load_settings(
        {
            "CTXD_RETAIN_CHECKPOINTS": "0",
            "CTXD_IDLE_WORKFLOW_TTL": "0",
            "CTXD_OUTPUT_MAXLEN": "0",
            "CTXD_DLQ_MAXLEN": "0",
            "CTXD_REPLY_MAXLEN": "0",
            "CTXD_PARKED_MAXLEN": "0",
        }
    )
    assert (off.retain_checkpoints, off.idle_workflow_ttl, off.output_maxlen) == (0, 0, 0)
    assert (off.dlq_maxlen, off.reply_maxlen, off.parked_maxlen) == (0, 0, 0)
    with pytest.raises(ConfigError, match=r"CTXD_RETAIN_CHECKPOINTS='1'.*integrity recovery"):
        load_settings({"CTXD_RETAIN_CHECKPOINTS": "1"})
    with pytest.raises(ConfigError, match=r"CTXD_OUTPUT_MAXLEN='50'.*0 \(no bound\) or >= 100"):
        load_settings({"CTXD_OUTPUT_MAXLEN": "50"})
    with pytest.raises(ConfigError, match=r"CTXD_IDLE_WORKFLOW_TTL='-1'"):
        load_settings({"CTXD_IDLE_WORKFLOW_TTL": "-1"})


# -- streams ----------------------------------------------------------------------------


async def test_output_and_dlq_are_trimmed_to_their_bounds(
    aredis: AsyncRedis, settings: Settings
) -> None:
    bounded = replace(settings, output_maxlen=100, dlq_maxlen=200)
    for _ in range(1000):
        await aredis.xadd(bounded.output_stream, {"a": "b"})
        await aredis.xadd(bounded.dlq_stream, {"a": "b"})
    assert await trim_bounded_streams(aredis, bounded) > 0
    # MAXLEN ~ trims whole macro nodes (100 entries each): at most one node more
    assert 100 <= await aredis.xlen(bounded.output_stream) <= 200
    assert 200 <= await aredis.xlen(bounded.dlq_stream) <= 300
    unbounded = replace(settings, output_maxlen=0, dlq_maxlen=0)
    await aredis.xadd(bounded.output_stream, {"a": "b"})
    before = await aredis.xlen(bounded.output_stream)
    assert await trim_bounded_streams(aredis, unbounded) == 0
    assert await aredis.xlen(bounded.output_stream) == before


async def _entry(aredis: AsyncRedis, settings: Settings, fields: dict[str, str]) -> Event:
    await ensure_group(aredis, settings.input_stream, settings.group)
    added = await aredis.xadd(settings.input_stream, fields)  # type: ignore[arg-type]
    entry_id = cast(bytes, added).decode()  # a bytes client
    await aredis.xreadgroup(settings.group, "test", {settings.input_stream: ">"}, count=100)
    return parse_event(entry_id, fields)


async def test_a_full_parked_stream_sends_further_events_to_the_dlq(
    aredis: AsyncRedis, settings: Settings, saver: BaseCheckpointSaver[str]
) -> None:
    """CTXD_PARKED_MAXLEN: beyond it, an event for a paused workflow is dead-lettered
    with reason parked_full (replayable), never dropped."""
    paused = replace(settings, escalation_pauses=True, parked_maxlen=1)
    workflow_id = "wf-parked"
    runner = WorkflowRunner(aredis, paused, _graph(saver, pauses=True))
    fields = [
        {"workflow_id": workflow_id, "event_id": "e1", "content": "ok", "priority": "critical"},
        {"workflow_id": workflow_id, "event_id": "e2", "content": TECH},
        {"workflow_id": workflow_id, "event_id": "e3", "content": MARKET},
    ]
    batch = [(await _entry(aredis, paused, f), f) for f in fields]
    run = await runner.run(workflow_id, batch)
    assert run.results["e1"]["status"] == "escalated"
    assert await aredis.xlen(parked_stream(paused, workflow_id)) == 1
    dead = cast(RawEntries, await aredis.xrange(paused.dlq_stream))
    assert [(f[b"event_id"], f[b"reason"]) for _, f in dead] == [(b"e3", b"parked_full")]
    assert b"CTXD_PARKED_MAXLEN=1" in dead[0][1][b"error"]
    assert dead[0][1][b"source_id"] == batch[2][0].source_id.encode()
    pending = await aredis.xpending(paused.input_stream, paused.group)
    assert pending["pending"] == 1  # e1 waits for the ingress's commit; e2, e3 are settled
    resume = await _entry(aredis, paused, resume_fields(workflow_id, None))
    await runner.run(workflow_id, [(resume, resume_fields(workflow_id, None))])
    assert await aredis.xlen(parked_stream(paused, workflow_id)) == 0


# -- the idle sweep -----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_idle_workflows_are_deleted_by_their_partition_owner_only(
    aredis: AsyncRedis, redis: Redis, settings: Settings, saver: BaseCheckpointSaver[str]
) -> None:
    """Idle past CTXD_IDLE_WORKFLOW_TTL: state deleted; a paused, a busy and a recent
    workflow are kept; without the partition's lease nothing is deleted."""
    s = replace(settings, idle_workflow_ttl=3600, partitions=1, escalation_pauses=True)
    prefix = s.stream_prefix
    clock = _Clock()
    graph = _graph(saver, pauses=True)
    retention = Retention(aredis, s, graph, clock=clock)
    lease = (partition_lease(s, 0)[0], "tenure-1")
    await aredis.set(lease[0], lease[1])
    for workflow_id in ("idle", "paused", "busy"):
        await run_events(graph, workflow_id, [{"event_id": "e1", "content": TECH}])
        await retention.after_commit(workflow_id, lease)
    await run_events(graph, "paused", [{"event_id": "p", "content": "ok", "priority": "critical"}])
    clock.now += 3000
    await run_events(graph, "recent", [{"event_id": "e1", "content": TECH}])
    await retention.after_commit("recent", lease)
    clock.now += 1000  # idle, paused, busy: 4000 s idle; recent: 1000 s

    with pytest.raises(FencedError):
        await retention.sweep_partition(0, "tenure-0", set())
    assert _checkpoint_keys(redis, prefix, "idle")

    deleted = await retention.sweep_partition(0, "tenure-1", {"busy"})
    assert deleted == 1
    assert not _checkpoint_keys(redis, prefix, "idle")
    assert not (await graph.aget_state(thread_config("idle"))).values
    for kept in ("paused", "busy", "recent"):
        assert _checkpoint_keys(redis, prefix, kept), kept
    members = set(redis.zrange(workflows_key(s, 0), 0, -1))
    assert members == {"paused", "busy", "recent"}
    # the paused one is looked at again only after another TTL
    assert redis.zscore(workflows_key(s, 0), "paused") == clock.now


# -- the guarantees, through the real service -------------------------------------------


@pytest.mark.slow
def test_service_prunes_and_dedupe_rollback_and_resume_still_hold(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """CTXD_RETAIN_CHECKPOINTS=3: a workflow run 12 times keeps 3 checkpoints plus its
    protected ones; a redelivered event_id gives no second output; rollback to every
    listed checkpoint works; a paused workflow resumes after pruning."""
    env = {**service_env, "CTXD_RETAIN_CHECKPOINTS": "3", "CTXD_ESCALATION_PAUSES": "true"}
    out = f"{prefix}:out"
    service = start_service("run", env=env)
    service.wait_ready()
    workflow_id = f"{prefix}-w"
    for i in range(12):
        text = TECH if (i // 3) % 2 == 0 else MARKET
        redis.xadd(
            f"{prefix}:in", {"workflow_id": workflow_id, "event_id": f"e{i}", "content": text}
        )
        assert len(read_outputs(redis, out, i + 1)) == i + 1  # one run per event

    document = json.loads(
        run_ctxd(env, "state", workflow_id, "--history", "--limit", "100", "--json").stdout
    )
    listed = [h["checkpoint_id"] for h in document["history"]]
    segments = document["values"]["segments"]
    assert 3 <= len(listed) <= 3 + len(segments) + 1
    assert set(listed) == _checkpoint_keys(redis, prefix, workflow_id)
    for segment in segments:  # rollback points are kept
        if segment.get("checkpoint_id"):
            assert segment["checkpoint_id"] in listed

    # effectively-once: e0's checkpoint is long pruned, its event_id is still done
    redis.xadd(f"{prefix}:in", {"workflow_id": workflow_id, "event_id": "e0", "content": TECH})
    redis.xadd(f"{prefix}:in", {"workflow_id": workflow_id, "event_id": "e12", "content": TECH})
    outputs = read_outputs(redis, out, 13)
    assert [f["event_id"] for _, f in outputs].count("e0") == 1
    assert outputs[-1][1]["event_id"] == "e12"

    oldest = listed[-1]
    rolled = run_ctxd(env, "rollback", workflow_id, "--to", oldest)
    assert rolled.returncode == 0, rolled.stderr + rolled.stdout
    assert "rollback: status=ok" in rolled.stdout

    # pause, then pruning runs on later commits of other events; resume still works
    redis.xadd(
        f"{prefix}:in",
        {"workflow_id": workflow_id, "event_id": "esc", "content": "ok", "priority": "critical"},
    )
    assert read_outputs(redis, out, 15)[-1][1]["status"] == "escalated"
    for i in range(3):
        redis.xadd(
            f"{prefix}:in", {"workflow_id": workflow_id, "event_id": f"p{i}", "content": TECH}
        )
    layout = Settings(stream_prefix=prefix)
    assert len(read_outputs(redis, parked_stream(layout, workflow_id), 3)) == 3
    resumed = run_ctxd(env, "resume", workflow_id, "--value", "null")
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    outputs = read_outputs(redis, out, 19)
    assert [f["event_id"] for _, f in outputs][15:18] == ["p0", "p1", "p2"]
    assert len(_checkpoint_keys(redis, prefix, workflow_id)) <= 3 + len(segments) + 2
    assert redis.zscore(workflows_key(layout, workflow_partition(layout, workflow_id)), workflow_id)
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


@pytest.mark.slow
def test_integrity_recovery_with_the_default_policy(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """Defaults (20 checkpoints, pruned every 5 runs): 30 runs later, a tampered latest
    checkpoint still rolls back to the last good one, and history stays bounded."""
    out = f"{prefix}:out"
    service = start_service("run")
    service.wait_ready()
    workflow_id = f"{prefix}-w"
    for i in range(30):
        text = TECH if (i // 3) % 2 == 0 else MARKET
        redis.xadd(
            f"{prefix}:in", {"workflow_id": workflow_id, "event_id": f"e{i}", "content": text}
        )
        assert len(read_outputs(redis, out, i + 1)) == i + 1
    latest = read_outputs(redis, out, 30)[-1][1]["checkpoint_id"]
    kept = _checkpoint_keys(redis, prefix, workflow_id)
    assert latest in kept
    assert len(kept) <= 20 + 5 + 20 + 1  # newest + unpruned runs + rollback points + head
    key = f"{prefix}:checkpoint:{workflow_id}:__empty__:{latest}"
    redis.json().set(key, "$.checkpoint.channel_values.window", ["forged"])

    redis.xadd(f"{prefix}:in", {"workflow_id": workflow_id, "event_id": "x", "content": TECH})
    result = read_outputs(redis, out, 31)[-1][1]
    assert result["event_id"] == "x"
    assert result["status"] == "error"
    document = json.loads(run_ctxd(service_env, "state", workflow_id, "--json").stdout)
    assert "forged" not in document["values"]["window"]
    assert document["values"]["events_processed"] == 29  # back to the one before e29's
    service.signal(signal.SIGTERM)
    assert service.wait() == 0


@pytest.mark.parametrize(("maxlen", "bounded"), [(100, True), (0, False)])
async def test_reply_streams_are_bounded_unless_turned_off(
    settings: Settings, maxlen: int, bounded: bool
) -> None:
    """CTXD_REPLY_MAXLEN: replies to an asker that reads none are capped (MAXLEN ~);
    0 keeps every reply."""
    s = actor_settings(settings, reply_maxlen=maxlen)
    replies = s.key("reply", "nobody-reads")
    client = AsyncRedis.from_url(str(s.redis_url))
    try:
        stream = mailbox_stream(s, "monitoring")
        for i in range(300):
            request = ActorRequest(
                id=f"r{i}",
                kind="monitoring",
                payload=json.dumps({"workflow_id": "w", "window": ["x"], "errors": 0}),
                reply_to=replies,
                deadline=time.time() + 600,
            )
            await client.xadd(stream, request.to_fields())  # type: ignore[arg-type]
        system = ActorSystem(client, s, WorkHandlers())
        async with running(system):
            deadline = time.monotonic() + 60  # no event to await: poll with a deadline
            while await client.xlen(stream) > 0:  # handled entries are deleted
                assert time.monotonic() < deadline, "requests not handled in 60 s"
                await anyio.sleep(0.05)
        length = await client.xlen(replies)
    finally:
        await client.aclose()
    if bounded:
        assert 100 <= length <= 200
    else:
        assert length == 300
