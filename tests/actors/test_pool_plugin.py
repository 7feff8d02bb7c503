"""A plug-in raising a BaseException subclass, against a real worker pool and Redis."""

from __future__ import annotations

import json
import time
from typing import cast

import anyio
from actor_support import RawEntries, RawRead, actor_settings, open_redis, running

from actors.config import Settings
from actors.runtime.mailbox import ActorReply, ActorRequest, mailbox_stream
from actors.runtime.redis_io import text
from actors.service.tree import ActorSystem
from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer
from graph.work import WorkHandlers, WorkKind


class Boom(BaseException):
    """Not an Exception."""


async def booming(request: AnalysisRequest) -> AnalysisResult:
    if "boom" in request.window[-1]:
        raise Boom("the plug-in blew up")
    return await heuristic_analyzer(request)


async def test_a_crashing_request_takes_down_only_itself_and_only_once(
    settings: Settings,
) -> None:
    """Read in one batch with a good request: the bad one crashes the worker (one
    restart); on redelivery the good one is answered and the bad one dead-lettered with
    the crash, its asker told. The supervisor never escalates."""
    settings = actor_settings(settings, actor_workers=1, actor_read_count=10)
    stream = mailbox_stream(settings, "analysis")
    reply_to = f"{settings.stream_prefix}:test-replies"
    deadline = time.time() + 600
    async with open_redis(settings) as redis:
        ids = {}
        for name, text_ in (("bad", "boom"), ("good", "checkout latency rose")):
            payload = json.dumps({"workflow_id": "w", "window": [text_], "pass_number": 0})
            request = ActorRequest(name, "analysis", payload, reply_to, deadline)
            ids[name] = text(await redis.xadd(stream, request.to_fields()))  # type: ignore[arg-type]
        system = ActorSystem(redis, settings, WorkHandlers(analyzer=booming), ask=False)
        async with running(system):
            replies: dict[str, ActorReply] = {}
            last = "0-0"
            with anyio.fail_after(30):
                while len(replies) < 2:
                    got = cast(RawRead | None, await redis.xread({reply_to: last}, block=1000))
                    for _, entries in got or []:
                        for entry_id, raw in entries:
                            last = text(entry_id)
                            reply = ActorReply.from_fields(
                                {text(k): text(v) for k, v in raw.items()}
                            )
                            replies[reply.id] = reply
            stats = system.supervisors[WorkKind.ANALYSIS].statistics()
        dead = cast(RawEntries, await redis.xrange(settings.dlq_stream))
        dlq = [{text(k): text(v) for k, v in f.items()} for _, f in dead]
        pending = await redis.xpending(stream, settings.group)
    assert replies["good"].ok, replies["good"].body
    assert not replies["bad"].ok
    assert "it crashed its worker: PluginError: " in replies["bad"].body
    assert "Boom: the plug-in blew up" in replies["bad"].body
    assert stats.restarts["analysis.0"] == 1
    assert stats.children[0].last_error_type == "PluginError"
    assert [(f["source_id"], f["reason"], f["attempts"]) for f in dlq] == [
        (ids["bad"], "poison", "2")
    ]
    assert pending["pending"] == 0
