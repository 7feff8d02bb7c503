"""A dead process's pending actor requests are taken over at once, a live one's are not.

A SIGKILLed ``ctxd run`` or ``ctxd worker`` leaves the requests its pool workers had
read pending under their consumer names. Their askers (other processes) wait up to
``CTXD_ASK_TIMEOUT`` (10 s); the idle reclaim takes entries only after twice that. With
the heartbeats' liveness (:func:`actors.service.heartbeat.process_liveness`) a pool claims
them as soon as their process has left the live sets: the asker gets its answer seconds
after the death, which is what keeps a fail-over in seconds (tests/actors/test_failover.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import cast

import anyio
from actor_support import RawRead, actor_settings, open_redis, running
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime.mailbox import ActorReply, ActorRequest, mailbox_stream
from actors.runtime.pool import Liveness
from actors.runtime.redis_io import text
from actors.service.heartbeat import Heartbeat, process_liveness
from actors.service.tree import ActorSystem
from graph.work import WorkHandlers

_CONTEXT = {"quality_score": 0.9, "performance_score": 0.9, "error_rate": 0.0,
            "resource_utilization": 0.1, "business_priority": "standard"}  # fmt: skip


async def _read_by(redis: Redis, settings: Settings, consumer: str, request_id: str) -> str:
    """A decision request read by ``consumer`` (which will never answer it); its reply
    stream."""
    stream = mailbox_stream(settings, "decision")
    request = ActorRequest(request_id, "decision", json.dumps({"context": _CONTEXT}),
                           f"{settings.stream_prefix}:replies:{request_id}",
                           time.time() + 600)  # fmt: skip
    await redis.xadd(stream, request.to_fields())  # type: ignore[arg-type]
    await redis.xreadgroup(settings.group, consumer, {stream: ">"}, count=1)
    return request.reply_to


async def _pending_consumers(redis: Redis, settings: Settings) -> dict[str, int]:
    summary = await redis.xpending(mailbox_stream(settings, "decision"), settings.group)
    return {text(c["name"]): int(c["pending"]) for c in summary["consumers"] or []}


async def test_a_dead_process_s_request_is_answered_long_before_the_ask_timeout(
    settings: Settings,
) -> None:
    settings = actor_settings(settings, ask_timeout=10.0)  # the idle reclaim: after 20 s
    peer = f"{settings.instance}-peer"

    async def live() -> set[str]:
        return {settings.instance, peer}

    liveness = Liveness(live, every=0.1, min_idle=0.2)
    async with open_redis(settings) as redis:
        stream = mailbox_stream(settings, "decision")
        await redis.xgroup_create(stream, settings.group, id="0", mkstream=True)
        reply_to = await _read_by(redis, settings, "dead-host:7:decision:0", "r-dead")
        await _read_by(redis, settings, f"{peer}:decision:1", "r-live")
        started = time.monotonic()
        system = ActorSystem(redis, settings, WorkHandlers(), ask=False, liveness=liveness)
        async with running(system):
            with anyio.fail_after(5):
                got = cast(RawRead, await redis.xread({reply_to: "0-0"}, block=4000, count=1))
            took = time.monotonic() - started
            pending = await _pending_consumers(redis, settings)
    reply = ActorReply.from_fields({text(k): text(v) for k, v in got[0][1][0][1].items()})
    assert (reply.id, reply.ok) == ("r-dead", True)
    assert reply.consumer == f"{settings.instance}:decision:reclaim"
    assert took < 3.0
    assert pending == {f"{peer}:decision:1": 1}  # a live process keeps its work


async def test_the_heartbeats_say_which_processes_are_live(settings: Settings) -> None:
    """``ctxd run`` instances and ``ctxd worker`` processes both count; a process whose
    last beat is older than the lease TTL does not."""
    async with open_redis(settings) as redis:
        await Heartbeat(redis, settings).beat({})
        await Heartbeat(redis, replace(settings, instance="w1"), worker=True).beat({})
        await redis.zadd(f"{settings.stream_prefix}:instances", {"gone": 1})
        live = await process_liveness(redis, settings).live()
    assert set(live) == {settings.instance, "w1"}
