"""ActorDispatch: asks behind breakers, health for routing, backpressure, telemetry."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import cast

import anyio
import pytest
import structlog
from actor_support import TextEntries, actor_settings, open_redis, read_stream, running
from opentelemetry.sdk.metrics.export import NumberDataPoint
from opentelemetry.trace import SpanKind
from redis import Redis as SyncRedis

from actors.config import Settings
from actors.runtime.breaker import BreakerState, BreakerTransition, CallNotPermittedError
from actors.runtime.mailbox import ActorError, mailbox_stream
from actors.service.ingress import Ingress
from actors.service.partitions import partition_stream
from actors.service.tree import ActorSystem
from actors.testing import FakeClock
from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer
from graph.checkpointer import open_checkpointer
from graph.state import JSON
from graph.work import LocalDispatch, WorkHandlers, WorkKind
from graph.workflow import build_contextual_workflow
from telemetry.testing import capture_metrics, capture_spans

WINDOW: dict[str, JSON] = {"workflow_id": "w", "window": ["the cache hit rate fell"]}
FALLBACKS = {"fallback_processing", "circuit_breaker_mode"}


class Switch:
    """An analyzer that fails while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = False

    async def __call__(self, request: AnalysisRequest) -> AnalysisResult:
        if self.failing:
            raise ConnectionError("analysis backend unreachable")
        return await heuristic_analyzer(request)


def small_breakers(settings: Settings, **changes: object) -> Settings:
    return actor_settings(
        settings,
        breaker_window=4,
        breaker_minimum_calls=4,
        breaker_failure_rate=0.5,
        breaker_open_wait=30.0,
        breaker_half_open_calls=2,
        **changes,
    )


async def test_breaker_opens_rejects_without_sending_then_recovers_with_probes(
    settings: Settings, redis: SyncRedis
) -> None:
    settings = small_breakers(settings)
    clock, switch = FakeClock(), Switch()
    switch.failing = True
    with capture_spans() as capture, structlog.testing.capture_logs() as logs:
        async with open_redis(settings) as client:
            system = ActorSystem(
                client, settings, WorkHandlers(analyzer=switch), clock=clock, tracer=capture.tracer
            )
            dispatch = system.dispatch
            assert dispatch is not None
            async with running(system):
                with capture.tracer.start_as_current_span("caller"):
                    for _ in range(4):
                        with pytest.raises(ActorError, match="ConnectionError"):
                            await dispatch(WorkKind.ANALYSIS, WINDOW)
                health = dispatch.health()
                assert health.breaker_states["analysis"] == "open"
                assert health.open_breakers == ("analysis",)
                assert health.error_rate == 1.0
                assert health.performance_score == 0.0
                assert not dispatch.reading_allowed()
                before = redis.xinfo_stream(mailbox_stream(settings, "analysis"))[
                    "last-generated-id"
                ]
                with pytest.raises(CallNotPermittedError, match="leave the work pending"):
                    await dispatch(WorkKind.ANALYSIS, WINDOW)
                after = redis.xinfo_stream(mailbox_stream(settings, "analysis"))[
                    "last-generated-id"
                ]
                assert before == after  # the rejected call was never sent
                assert dispatch.health().breaker_states["decision"] == "closed"

                switch.failing = False
                clock.now += 300.0  # past any jittered open wait
                assert dispatch.reading_allowed()  # the breaker turned half-open
                assert dispatch.breakers["analysis"].state is BreakerState.HALF_OPEN
                for _ in range(2):
                    await dispatch(WorkKind.ANALYSIS, WINDOW)
                assert dispatch.health().breaker_states["analysis"] == "closed"
                stats = dispatch.breakers["analysis"].statistics()
        spans = [
            s for s in capture.spans() if s.name == "circuit_breaker.transition actor.analysis"
        ]
    assert stats.not_permitted_calls == 1
    prefix = "ctxd.circuit_breaker.state"
    moves = [
        ((s.attributes or {})[f"{prefix}.from"], (s.attributes or {})[f"{prefix}.to"])
        for s in spans
    ]
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    caller = capture.named("caller")
    assert spans[0].parent is not None
    assert spans[0].parent.span_id == caller.context.span_id  # inside the failing call
    assert (spans[0].attributes or {})["ctxd.circuit_breaker.failure_rate"] == 1.0
    assert spans[1].parent is None  # timer-driven: a root...
    assert [link.context.span_id for link in spans[1].links] == [spans[0].context.span_id]
    assert all(s.kind is SpanKind.INTERNAL for s in spans)
    opened = [e for e in logs if e["event"] == "circuit breaker opened"]
    assert len(opened) == 1
    assert opened[0]["log_level"] == "error"
    assert opened[0]["breaker"] == "actor.analysis"


async def test_breaker_transitions_set_the_state_gauge(settings: Settings) -> None:
    settings = small_breakers(settings)
    clock, switch = FakeClock(), Switch()
    switch.failing = True
    with capture_metrics() as metrics:
        async with open_redis(settings) as client:
            system = ActorSystem(
                client,
                settings,
                WorkHandlers(analyzer=switch),
                clock=clock,
                instruments=metrics.instruments,
            )
            assert system.dispatch is not None
            async with running(system):
                for _ in range(4):
                    with pytest.raises(ActorError):
                        await system.dispatch(WorkKind.ANALYSIS, WINDOW)
        points = metrics.points("ctxd.circuit_breaker.state")
    states = {
        (p.attributes or {})["ctxd.circuit_breaker.state"]: p.value
        for p in points
        if isinstance(p, NumberDataPoint)
        and (p.attributes or {})["ctxd.circuit_breaker.name"] == "actor.analysis"
    }
    assert states == {"closed": 0, "open": 1, "half_open": 0, "forced_open": 0}


class Gated(WorkHandlers):
    """Holds every request until released; records the peak of concurrent requests."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.active = 0
        self.peak = 0
        self.arrived = 0
        self.some_arrived = anyio.Event()

    async def handle(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        self.active += 1
        self.arrived += 1
        self.peak = max(self.peak, self.active)
        self.some_arrived.set()
        try:
            await self.release.wait()
            return await super().handle(kind, payload)
        finally:
            self.active -= 1


async def test_in_flight_asks_are_bounded_by_the_semaphore(settings: Settings) -> None:
    settings = actor_settings(settings, max_asks_in_flight=3, actor_workers=4, actor_read_count=8)
    handlers = Gated()
    async with open_redis(settings) as client:
        system = ActorSystem(client, settings, handlers)
        dispatch, mailbox = system.dispatch, system.mailbox
        assert dispatch is not None
        assert mailbox is not None
        async with running(system), anyio.create_task_group() as tg:
            update: dict[str, JSON] = {"window": ["x"]}
            for _ in range(30):  # a 10x burst over the bound
                tg.start_soon(dispatch, WorkKind.UPDATE, update)
            with anyio.fail_after(10):
                while handlers.arrived < 3:
                    await handlers.some_arrived.wait()
                    handlers.some_arrived = anyio.Event()
            waiting = mailbox.statistics().waiting
            queued = await client.xlen(mailbox_stream(settings, "update"))
            handlers.release.set()
    assert waiting == 3
    assert queued == 3  # never more than the bound in Redis either
    assert handlers.peak == 3
    assert handlers.arrived == 30


async def test_outage_drives_fallback_decisions_pauses_reading_and_loses_nothing(
    settings: Settings, redis: SyncRedis
) -> None:
    """END TO END: closed → open → half_open → closed; no DLQ; backlog processed after."""
    settings = small_breakers(settings, concurrency=2, batch_size=1, event_timeout=30.0)
    clock, switch = FakeClock(), Switch()
    switch.failing = True
    transitions: list[BreakerTransition] = []
    closed_again = anyio.Event()

    def watch(change: BreakerTransition) -> None:
        transitions.append(change)
        if change.to_state is BreakerState.CLOSED:
            closed_again.set()

    total = 12
    for i in range(total):
        content = f"event {i}: checkout latency rose after the deploy, payment API errors"
        redis.xadd(settings.input_stream, {"workflow_id": f"wf-{i % 3}", "content": content})
    async with (
        open_redis(settings) as client,
        open_checkpointer("memory", namespace=settings.stream_prefix) as saver,
    ):
        system = ActorSystem(client, settings, WorkHandlers(analyzer=switch), clock=clock)
        dispatch = system.dispatch
        assert dispatch is not None
        dispatch.breakers["analysis"].add_listener(watch)
        graph = build_contextual_workflow(dispatch, saver)
        ingress = Ingress(client, settings, graph, reading_allowed=dispatch.reading_allowed)
        async with running(system), anyio.create_task_group() as tg:
            await tg.start(ingress.run)
            with anyio.fail_after(60):
                # The ingress has no event for "open and nothing in flight": poll that.
                while True:
                    if transitions and ingress.statistics().in_flight == 0:
                        break
                    await anyio.sleep(0.01)
            assert dispatch.breakers["analysis"].state is BreakerState.OPEN
            during = cast(TextEntries, redis.xrange(settings.output_stream))
            lag = _unread(redis, settings)
            switch.failing = False
            clock.now += 300.0
            with anyio.fail_after(60):
                await closed_again.wait()
            outputs = await read_stream(client, settings.output_stream, total)
            ingress.stop()
    assert [(t.from_state.value, t.to_state.value) for t in transitions] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert 0 < len(during) < total
    # Reading paused while open: the rest was left unread (in ctxd:in or its partition).
    assert 0 < lag <= total - len(during)
    assert {f["decision"] for _, f in during} <= FALLBACKS
    assert {f["status"] for _, f in during} == {"fallback"}
    assert len(outputs) == total
    assert len({f["event_id"] for _, f in outputs}) == total
    assert redis.xlen(settings.dlq_stream) == 0
    assert _pending(redis, settings) == 0
    assert json.loads(outputs[-1][1]["route"])[0] == "context_analyzer"


def _streams(settings: Settings) -> list[str]:
    """ctxd:in and the partition streams the router moves its entries to."""
    return [
        settings.input_stream,
        *(partition_stream(settings, n) for n in range(settings.partitions)),
    ]


def _groups(redis: SyncRedis, stream: str) -> list[dict[str, int | str | None]]:
    if not redis.exists(stream):
        return []
    return cast(list[dict[str, int | str | None]], redis.xinfo_groups(stream))


def _unread(redis: SyncRedis, settings: Settings) -> int:
    """Entries not yet read by the group, over ctxd:in and its partitions."""
    return sum(int(g["lag"] or 0) for s in _streams(settings) for g in _groups(redis, s))


def _pending(redis: SyncRedis, settings: Settings) -> int:
    """Entries read and not acknowledged, over ctxd:in and its partitions."""
    return sum(int(g["pending"] or 0) for s in _streams(settings) for g in _groups(redis, s))


class RefusingGraph:
    """The real graph, except that its first run is refused by an open breaker."""

    def __init__(self, real: object, refused: anyio.Event, gate: list[bool]) -> None:
        self._real = real
        self._refused = refused
        self._gate = gate

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)  # state reads etc. go to the real graph

    def astream(self, *args: object, **kwargs: object) -> object:
        if not self._refused.is_set():
            self._gate[0] = False  # the breaker is open now
            self._refused.set()
            raise CallNotPermittedError(
                "test breaker open", breaker="actor.analysis", state=BreakerState.OPEN,
                next_probe_at=None, retry_after=None,
            )  # fmt: skip
        return self._real.astream(*args, **kwargs)  # type: ignore[attr-defined]


async def test_batch_refused_by_a_breaker_stays_pending_and_is_retried_not_dead_lettered(
    settings: Settings, redis: SyncRedis
) -> None:
    refused, gate = anyio.Event(), [True]
    redis.xadd(settings.input_stream, {"workflow_id": "wf", "content": "alpha beta"})
    async with (
        open_redis(settings) as client,
        open_checkpointer("memory", namespace=settings.stream_prefix) as saver,
    ):
        graph = RefusingGraph(build_contextual_workflow(LocalDispatch(), saver), refused, gate)
        ingress = Ingress(client, settings, graph, reading_allowed=lambda: gate[0])  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(ingress.run)
            with anyio.fail_after(30):
                await refused.wait()
            assert redis.xlen(settings.output_stream) == 0
            assert _pending(redis, settings) == 1
            gate[0] = True  # the breaker lets calls through again
            outputs = await read_stream(client, settings.output_stream, 1)
            ingress.stop()
    stats = ingress.statistics()
    assert len(outputs) == 1
    assert (stats.failed_runs, stats.dead_lettered, stats.processed) == (0, 0, 1)
    assert redis.xlen(settings.dlq_stream) == 0
    assert _pending(redis, settings) == 0


def test_breaker_and_actor_settings_come_from_env_and_toml(tmp_path: object) -> None:
    from pathlib import Path

    from actors.config import load_settings
    from actors.service.dispatch import breaker_config
    from graph.errors import ConfigError

    env = {"CTXD_BREAKER_WINDOW": "8", "CTXD_BREAKER_MINIMUM_CALLS": "4",
           "CTXD_BREAKER_FAILURE_RATE": "0.25", "CTXD_DISPATCH": "local"}  # fmt: skip
    settings = load_settings(env)
    config = breaker_config(settings)
    assert (config.window_size, config.minimum_calls, config.failure_rate_threshold) == (8, 4, 0.25)
    assert settings.dispatch == "local"
    toml = Path(str(tmp_path)) / "ctxd.toml"
    toml.write_text("[ctxd]\nbreaker_open_wait = 2.5\nask_timeout = 0.5\nactor_workers = 3\n")
    from_file = load_settings({}, config_file=toml)
    assert (from_file.breaker_open_wait, from_file.ask_timeout, from_file.actor_workers) == (
        2.5,
        0.5,
        3,
    )
    assert breaker_config(from_file).open_wait == 2.5
    with pytest.raises(ConfigError, match=r"CTXD_BREAKER_FAILURE_RATE='1\.5'"):
        load_settings({"CTXD_BREAKER_FAILURE_RATE": "1.5"})
    with pytest.raises(ConfigError, match="CTXD_DISPATCH='remote'"):
        load_settings({"CTXD_DISPATCH": "remote"})
    with pytest.raises(ConfigError, match="exceeds CTXD_BREAKER_WINDOW"):
        load_settings({"CTXD_BREAKER_WINDOW": "5"})
