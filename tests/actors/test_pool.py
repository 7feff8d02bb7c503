"""Worker pools under supervision: crashes mid-message, poison requests, escalation."""

from __future__ import annotations

import json
import time
from typing import cast

import anyio
import pytest
from actor_support import RawEntries, RawRead, actor_settings, open_redis, running
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.mailbox import ActorReply, ActorRequest, mailbox_stream
from actors.runtime.pool import FaultPoint
from actors.runtime.redis_io import text
from actors.runtime.supervisor import SupervisorEscalation
from actors.service.tree import ROOT_INTENSITY, ActorSystem
from graph.state import JSON
from graph.work import WorkHandlers, WorkKind
from telemetry.testing import capture_metrics

WINDOW: dict[str, JSON] = {"workflow_id": "w", "window": ["checkout latency rose after the deploy"]}


def _restart_total(capture: object) -> int:
    points = capture.points("ctxd.actor.restarts")  # type: ignore[attr-defined]
    return int(sum(p.value for p in points))


@pytest.mark.parametrize("point", ["received", "handled"])
async def test_worker_crashing_mid_message_is_restarted_and_then_answers_it(
    settings: Settings, point: FaultPoint
) -> None:
    """The crash leaves the request pending; the restarted worker reads its own PEL."""
    crashed = anyio.Event()

    async def fault(at: FaultPoint, request: ActorRequest) -> None:
        if at == point and not crashed.is_set():
            crashed.set()
            raise RuntimeError(f"injected crash at {at}")

    settings = actor_settings(settings, actor_workers=1)
    with capture_metrics() as metrics:
        async with open_redis(settings) as redis:
            system = ActorSystem(
                redis, settings, WorkHandlers(), fault=fault, instruments=metrics.instruments
            )
            async with running(system):
                assert system.mailbox is not None
                reply = await system.mailbox.ask_reply("analysis", WINDOW, 10.0)
                stats = system.supervisors[WorkKind.ANALYSIS].statistics()
        assert _restart_total(metrics) == 1
    assert crashed.is_set()
    assert reply.ok, reply.body
    assert reply.consumer == f"{settings.instance}:analysis:0"  # the same consumer, restarted
    assert stats.restarts["analysis.0"] == 1
    assert stats.children[0].last_error_type == "RuntimeError"


async def _deliver_to_a_ghost(redis: Redis, settings: Settings, times: int) -> tuple[str, str]:
    """Put a request pending on a consumer that never answers, delivered ``times`` times."""
    stream = mailbox_stream(settings, "decision")
    reply_to = f"{settings.stream_prefix}:test-replies"
    await redis.xgroup_create(stream, settings.group, id="0", mkstream=True)
    request = ActorRequest("poison-1", "decision", json.dumps({"context": {}}), reply_to,
                           time.time() + 600)  # fmt: skip
    entry_id = text(await redis.xadd(stream, request.to_fields()))  # type: ignore[arg-type]
    await redis.xreadgroup(settings.group, "ghost", {stream: ">"}, count=1)
    for _ in range(times - 1):
        await redis.xclaim(stream, settings.group, "ghost", 0, [entry_id])
    return entry_id, reply_to


async def test_request_delivered_too_often_is_dead_lettered_and_the_asker_told(
    settings: Settings,
) -> None:
    settings = actor_settings(settings, ask_timeout=0.1)
    async with open_redis(settings) as redis:
        entry_id, reply_to = await _deliver_to_a_ghost(redis, settings, times=5)
        system = ActorSystem(redis, settings, WorkHandlers(), ask=False)
        async with running(system):
            with anyio.fail_after(20):
                got = cast(RawRead, await redis.xread({reply_to: "0-0"}, block=15000, count=1))
        dlq = cast(RawEntries, await redis.xrange(settings.dlq_stream))
        pending = await redis.xpending(mailbox_stream(settings, "decision"), settings.group)
    reply = ActorReply.from_fields({text(k): text(v) for k, v in got[0][1][0][1].items()})
    assert (reply.id, reply.ok) == ("poison-1", False)
    assert "delivered 6 times" in reply.body
    assert reply.consumer == f"{settings.instance}:decision:reclaim"
    assert len(dlq) == 1
    fields = {text(k): text(v) for k, v in dlq[0][1].items()}
    assert (fields["kind"], fields["reason"], fields["source_id"]) == (
        "decision",
        "poison",
        entry_id,
    )
    assert fields["attempts"] == "6"
    assert pending["pending"] == 0


async def test_idle_request_of_a_dead_consumer_is_reclaimed_and_answered(
    settings: Settings,
) -> None:
    settings = actor_settings(settings, ask_timeout=0.1)
    async with open_redis(settings) as redis:
        _, reply_to = await _deliver_to_a_ghost(redis, settings, times=1)
        # A well-formed decision request this time.
        stream = mailbox_stream(settings, "decision")
        await redis.xtrim(stream, maxlen=0)
        context = {"quality_score": 0.9, "performance_score": 0.9, "error_rate": 0.0,
                   "resource_utilization": 0.1, "business_priority": "standard"}  # fmt: skip
        request = ActorRequest("r-1", "decision", json.dumps({"context": context}), reply_to,
                               time.time() + 600)  # fmt: skip
        await redis.xadd(stream, request.to_fields())  # type: ignore[arg-type]
        await redis.xreadgroup(settings.group, "ghost", {stream: ">"}, count=1)
        system = ActorSystem(redis, settings, WorkHandlers(), ask=False)
        async with running(system):
            with anyio.fail_after(20):
                got = cast(RawRead, await redis.xread({reply_to: "0-0"}, block=15000, count=1))
    reply = ActorReply.from_fields({text(k): text(v) for k, v in got[0][1][0][1].items()})
    assert reply.ok, reply.body
    assert reply.consumer == f"{settings.instance}:decision:reclaim"


async def test_actor_crashing_on_every_start_escalates_to_the_root_which_gives_up(
    settings: Settings,
) -> None:
    """Bounded restarts: the kind's supervisor escalates, the root restarts it, then quits."""
    intensity = 2
    settings = actor_settings(settings, restart_intensity=intensity)
    with capture_metrics() as metrics:
        async with open_redis(settings) as redis:
            # Not a stream: creating the consumer group fails on every start (WRONGTYPE).
            await redis.set(mailbox_stream(settings, "analysis"), "not a stream")
            system = ActorSystem(
                redis,
                settings,
                WorkHandlers(),
                serve=(WorkKind.ANALYSIS,),
                ask=False,
                instruments=metrics.instruments,
            )
            with anyio.fail_after(30), pytest.raises(SupervisorEscalation) as raised:
                await system.run()
        restarts = _restart_total(metrics)
    assert raised.value.supervisor == "ctxd"
    assert raised.value.child == "actor.analysis"
    # Each run of the kind's supervisor restarts its worker `intensity` times; the root
    # restarts that supervisor ROOT_INTENSITY times before it gives up.
    assert restarts == (ROOT_INTENSITY + 1) * intensity + ROOT_INTENSITY
