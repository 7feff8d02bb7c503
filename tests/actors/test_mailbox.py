"""Mailboxes: ask/tell over Redis streams, replies by correlation id, trace propagation."""

from __future__ import annotations

import json
from collections.abc import Mapping

import anyio
import pytest
from actor_support import actor_settings, open_redis, running
from opentelemetry.trace import SpanKind
from redis import Redis as SyncRedis

from actors.config import Settings
from actors.runtime.mailbox import ActorError, ActorReply, ActorRequest, Mailbox, mailbox_stream
from actors.service.tree import ActorSystem
from graph.analysis import AnalysisRequest, AnalysisResult
from graph.state import JSON
from graph.work import WorkHandlers, WorkKind
from telemetry.testing import capture_spans

DECIDE: dict[str, JSON] = {
    "context": {
        "quality_score": 0.9,
        "performance_score": 0.9,
        "error_rate": 0.0,
        "resource_utilization": 0.2,
        "business_priority": "standard",
    }
}


def test_messages_are_frozen_and_round_trip_through_flat_fields() -> None:
    request = ActorRequest("c1", "decision", json.dumps(DECIDE), "r", 12.5, {"traceparent": "x"})
    assert ActorRequest.from_fields(request.to_fields()) == request
    reply = ActorReply("c1", True, "{}", "host:1:decision:0")
    assert ActorReply.from_fields(reply.to_fields()) == reply
    with pytest.raises(AttributeError):
        request.id = "other"  # type: ignore[misc]
    assert all(isinstance(v, str) for v in request.to_fields().values())


async def test_ask_returns_the_handlers_answer_from_a_named_consumer(settings: Settings) -> None:
    """An ask goes through the decision mailbox's group and comes back by correlation id."""
    settings = actor_settings(settings)
    async with open_redis(settings) as redis:
        system = ActorSystem(redis, settings, WorkHandlers())
        async with running(system):
            assert system.mailbox is not None
            replies = [await system.mailbox.ask_reply("decision", DECIDE, 5.0) for _ in range(3)]
            answer = await system.mailbox.ask("decision", DECIDE, 5.0)
        groups = await redis.xinfo_groups(mailbox_stream(settings, "decision"))
    assert answer["decision"] in json.loads(replies[0].body)["scores"]
    assert all(r.ok for r in replies)
    assert {r.consumer for r in replies} <= {
        f"{settings.instance}:decision:0",
        f"{settings.instance}:decision:1",
    }
    assert [g["name"] for g in groups] == [settings.group.encode()]
    assert groups[0]["pending"] == 0


async def test_many_concurrent_asks_each_get_their_own_reply(settings: Settings) -> None:
    settings = actor_settings(settings)
    async with open_redis(settings) as redis:
        system = ActorSystem(redis, settings, WorkHandlers())
        results: dict[int, str] = {}
        async with running(system):
            assert system.mailbox is not None
            mailbox = system.mailbox

            async def one(i: int) -> None:
                reply = await mailbox.ask("update", {"window": [f"event number {i} zeta{i}"]}, 5.0)
                results[i] = str(reply["summary"])

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
            assert mailbox.statistics().waiting == 0
    assert all(f"zeta{i}" in results[i] for i in range(50))


async def test_a_failing_handler_answers_with_an_error_not_a_crash(settings: Settings) -> None:
    async def broken(request: AnalysisRequest) -> AnalysisResult:
        raise RuntimeError("model unavailable")

    settings = actor_settings(settings)
    async with open_redis(settings) as redis:
        system = ActorSystem(redis, settings, WorkHandlers(analyzer=broken))
        async with running(system):
            assert system.mailbox is not None
            with pytest.raises(ActorError, match="RuntimeError: model unavailable"):
                await system.mailbox.ask("analysis", {"workflow_id": "w", "window": ["a"]}, 5.0)
            restarts = system.root.statistics()
    assert restarts.restarts == {"replies": 0, "actor.analysis": 0, "actor.update": 0,
                                 "actor.monitoring": 0, "actor.decision": 0}  # fmt: skip


async def test_ask_times_out_when_no_worker_serves_the_kind(settings: Settings) -> None:
    settings = actor_settings(settings)
    async with open_redis(settings) as redis:
        system = ActorSystem(redis, settings, WorkHandlers(), serve=())
        async with running(system):
            assert system.mailbox is not None
            with pytest.raises(TimeoutError):
                await system.mailbox.ask("decision", DECIDE, 0.2)
            assert system.mailbox.statistics().waiting == 0


class _Recording(WorkHandlers):
    def __init__(self) -> None:
        super().__init__()
        self.seen = anyio.Event()
        self.payloads: list[dict[str, object]] = []

    async def handle(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        self.payloads.append(dict(payload))
        self.seen.set()
        return await super().handle(kind, payload)


async def test_tell_is_handled_without_a_reply(settings: Settings, redis: SyncRedis) -> None:
    settings = actor_settings(settings)
    handlers = _Recording()
    async with open_redis(settings) as client:
        asker = Mailbox(client, settings)
        await asker.tell("update", {"window": ["alpha"]})
        system = ActorSystem(client, settings, handlers, ask=False)
        async with running(system):
            with anyio.fail_after(10):
                await handlers.seen.wait()
    assert handlers.payloads == [{"window": ["alpha"]}]
    assert redis.xlen(mailbox_stream(settings, "update")) == 0  # acknowledged and deleted


async def test_worker_span_is_a_child_of_the_askers_send_span(settings: Settings) -> None:
    """Trace context crosses the mailbox: same trace, parent = the asker's span."""
    settings = actor_settings(settings)
    with capture_spans() as capture:
        async with open_redis(settings) as redis:
            system = ActorSystem(redis, settings, WorkHandlers(), tracer=capture.tracer)
            async with running(system):
                assert system.mailbox is not None
                await system.mailbox.ask("decision", DECIDE, 5.0)
        stream = mailbox_stream(settings, "decision")
        send = capture.named(f"send {stream}")
        process = capture.named(f"process {stream}")
    assert send.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert process.context.trace_id == send.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id
    assert (process.attributes or {})["messaging.consumer.group.name"] == settings.group
