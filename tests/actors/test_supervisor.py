"""Supervision: ordered starts, restart strategies, backoff, intensity, escalation, shutdown.

Children are driven by the test through events; backoff goes through an injected sleep
that records its argument and returns at once; the intensity window uses a fake clock.
``fail_after`` only turns a hang into a failure, it never orders anything.
"""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus

from actors.runtime.supervisor import (
    ChildSpec,
    RestartEvent,
    RestartType,
    Supervisor,
    SupervisorConfig,
    SupervisorEscalation,
)
from actors.testing import FakeClock, FakeSleep
from graph.errors import ConfigError

HANG_GUARD = 5.0
NO_JITTER = SupervisorConfig(jitter=0.0)


class Worker:
    """A child the test steers: it crashes, returns or is stopped on command."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        early_failures: int = 0,
        restart: RestartType = "permanent",
        shutdown: float = 5.0,
    ) -> None:
        self.name = name
        self.log = log
        self.early_failures = early_failures
        self.spec = ChildSpec(name, self.start, restart, shutdown)
        self.starts = 0
        self.ups = 0
        self.stops = 0
        self._wake: anyio.Event | None = None
        self._ending: Exception | None = None
        self._changed = anyio.Event()

    async def start(self, task_status: TaskStatus[None]) -> None:
        self.starts += 1
        attempt = self.starts
        self.log.append(f"{self.name} start {attempt}")
        if attempt <= self.early_failures:
            self._notify()
            raise RuntimeError(f"{self.name} cannot start (attempt {attempt})")
        wake = self._wake = anyio.Event()
        self._ending = None
        task_status.started()
        self.ups += 1
        self._notify()
        try:
            await wake.wait()
        except anyio.get_cancelled_exc_class():
            self.stops += 1
            self.log.append(f"{self.name} stop {attempt}")
            raise
        if self._ending is not None:
            raise self._ending
        self.log.append(f"{self.name} return {attempt}")

    def crash(self, error: Exception | None = None) -> None:
        assert self._wake is not None
        assert not self._wake.is_set(), f"{self.name} is not running"
        self._ending = error if error is not None else ValueError(f"{self.name} crashed")
        self._wake.set()

    def exit_normally(self) -> None:
        assert self._wake is not None
        self._wake.set()

    async def wait_ups(self, count: int) -> None:
        while self.ups < count:
            await self._changed.wait()

    async def wait_starts(self, count: int) -> None:
        while self.starts < count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


def supervisor(
    children: list[ChildSpec | Supervisor],
    config: SupervisorConfig = NO_JITTER,
    *,
    name: str = "pool",
    sleep: FakeSleep | None = None,
    clock: FakeClock | None = None,
    events: list[RestartEvent] | None = None,
    seed: int = 1,
) -> Supervisor:
    return Supervisor(
        name,
        children,
        config,
        clock=clock if clock is not None else FakeClock(),
        sleep=sleep if sleep is not None else FakeSleep(),
        rng=random.Random(seed),
        on_restart=events.append if events is not None else None,
    )


async def test_children_start_one_after_another_and_run_reports_started_when_all_are_up() -> None:
    log: list[str] = []
    gate, entered = anyio.Event(), anyio.Event()
    b = Worker("b", log)

    async def slow_starter(task_status: TaskStatus[None]) -> None:
        entered.set()
        await gate.wait()
        log.append("a up")
        task_status.started()
        await anyio.sleep_forever()

    sup = supervisor([ChildSpec("a", slow_starter), b.spec])
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.run)
            await entered.wait()
            assert b.starts == 0  # b waits until a has reported started
            gate.set()
            await b.wait_ups(1)
            assert log == ["a up", "b start 1"]
            assert sup.statistics().running == ("a", "b")
            tg.cancel_scope.cancel()


async def test_one_for_one_restarts_only_the_crashed_child() -> None:
    log: list[str] = []
    a, b = Worker("a", log), Worker("b", log)
    events: list[RestartEvent] = []
    sleep = FakeSleep()
    sup = supervisor([a.spec, b.spec], sleep=sleep, events=events)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.crash()
            await a.wait_ups(2)
            assert (b.starts, b.stops) == (1, 0)  # b kept its identity
            assert sup.statistics().restarts == {"a": 1, "b": 0}
            assert sup.statistics().running == ("a", "b")
            tg.cancel_scope.cancel()
    assert events == [RestartEvent("pool", "a", "ValueError", 1, 0.2)]
    assert sleep.delays == [0.2]


async def test_one_for_all_stops_the_others_and_restarts_everyone_in_order() -> None:
    log: list[str] = []
    a, b, c = Worker("a", log), Worker("b", log), Worker("c", log)
    events: list[RestartEvent] = []
    sup = supervisor(
        [a.spec, b.spec, c.spec],
        SupervisorConfig(strategy="one_for_all", jitter=0.0),
        events=events,
    )
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            del log[:]
            b.crash()
            await c.wait_ups(2)
            assert log == ["c stop 1", "a stop 1", "a start 2", "b start 2", "c start 2"]
            assert sup.statistics().restarts == {"a": 1, "b": 1, "c": 1}
            tg.cancel_scope.cancel()
    assert events == [RestartEvent("pool", "b", "ValueError", 1, 0.2)]


async def test_one_for_all_restarts_once_when_two_children_crash_together() -> None:
    log: list[str] = []
    a, b = Worker("a", log), Worker("b", log)
    events: list[RestartEvent] = []
    sup = supervisor([a.spec, b.spec], SupervisorConfig(strategy="one_for_all"), events=events)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.crash()
            b.crash()  # b's end is already queued when a's restarts both
            await b.wait_ups(2)
            a.crash()  # handled after b's stale end, which must not restart anyone
            await b.wait_ups(3)
            tg.cancel_scope.cancel()
    assert [e.child for e in events] == ["a", "a"]
    assert (a.starts, b.starts) == (3, 3)


async def test_one_for_all_stops_a_temporary_sibling_for_good() -> None:
    log: list[str] = []
    a, b = Worker("a", log, restart="temporary"), Worker("b", log)
    sup = supervisor([a.spec, b.spec], SupervisorConfig(strategy="one_for_all"))
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            b.crash()
            await b.wait_ups(2)
            assert (a.starts, a.stops) == (1, 1)
            assert sup.statistics().running == ("b",)
            tg.cancel_scope.cancel()


async def test_backoff_doubles_from_initial_and_is_capped_at_max() -> None:
    log: list[str] = []
    a = Worker("a", log)
    sleep = FakeSleep()
    sup = supervisor([a.spec], SupervisorConfig(intensity=100, jitter=0.0), sleep=sleep)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            for n in range(2, 10):
                a.crash()
                await a.wait_ups(n)
            tg.cancel_scope.cancel()
    assert sleep.delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]


@pytest.mark.parametrize("seed", range(10))
async def test_backoff_jitter_stays_within_twenty_percent_and_under_the_cap(seed: int) -> None:
    log: list[str] = []
    a = Worker("a", log)
    sleep = FakeSleep()
    sup = supervisor([a.spec], SupervisorConfig(intensity=100), sleep=sleep, seed=seed)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            for n in range(2, 10):
                a.crash()
                await a.wait_ups(n)
            tg.cancel_scope.cancel()
    bases = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    for delay, base in zip(sleep.delays, bases, strict=True):
        assert base * 0.8 <= delay <= min(base * 1.2, 10.0)
    assert sleep.delays != bases  # the jitter is really applied


async def test_backoff_starts_over_once_earlier_restarts_leave_the_period() -> None:
    log: list[str] = []
    a = Worker("a", log)
    clock, sleep = FakeClock(), FakeSleep()
    sup = supervisor([a.spec], clock=clock, sleep=sleep)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.crash()
            await a.wait_ups(2)
            a.crash()
            await a.wait_ups(3)
            clock.now += 31.0
            a.crash()
            await a.wait_ups(4)
            tg.cancel_scope.cancel()
    assert sleep.delays == [0.2, 0.4, 0.2]


async def test_exceeding_the_intensity_escalates_out_of_run_and_stops_every_child() -> None:
    log: list[str] = []
    a, b = Worker("a", log), Worker("b", log)
    boom = ValueError("disk on fire")
    sup = supervisor([a.spec, b.spec], SupervisorConfig(intensity=3, jitter=0.0), name="pool")
    caught: list[SupervisorEscalation] = []

    async def supervised(*, task_status: TaskStatus[None]) -> None:
        try:
            await sup.run(task_status=task_status)
        except SupervisorEscalation as escalation:
            caught.append(escalation)

    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(supervised)
            for n in range(2, 5):
                a.crash()
                await a.wait_ups(n)  # three restarts are within the intensity
            a.crash(boom)  # the fourth is not
    [escalation] = caught
    assert (escalation.supervisor, escalation.child) == ("pool", "a")
    assert escalation.__cause__ is boom
    message = str(escalation)
    assert "supervisor 'pool' gave up" in message
    assert "child 'a' failed with ValueError: disk on fire" in message
    assert "more than 3 restarts within 30 s" in message
    assert (a.starts, b.stops) == (4, 1)
    assert sup.statistics().running == ()


async def test_child_crashing_before_started_is_restarted_with_backoff() -> None:
    log: list[str] = []
    a, b = Worker("a", log, early_failures=2), Worker("b", log)
    events: list[RestartEvent] = []
    sleep = FakeSleep()
    sup = supervisor([a.spec, b.spec], sleep=sleep, events=events)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            assert log == ["a start 1", "a start 2", "a start 3", "b start 1"]
            assert sup.statistics().restarts == {"a": 2, "b": 0}
            tg.cancel_scope.cancel()
    assert sleep.delays == [0.2, 0.4]
    assert [(e.child, e.error_type, e.restart_count) for e in events] == [
        ("a", "RuntimeError", 1),
        ("a", "RuntimeError", 2),
    ]


async def test_child_that_never_starts_escalates_before_run_reports_started() -> None:
    log: list[str] = []
    a, b = Worker("a", log, early_failures=1_000), Worker("b", log)
    sup = supervisor([a.spec, b.spec], SupervisorConfig(intensity=2, jitter=0.0))
    with anyio.fail_after(HANG_GUARD), pytest.raises(SupervisorEscalation) as caught:
        await sup.run()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "cannot start (attempt 3)" in str(caught.value)
    assert (a.starts, b.starts) == (3, 0)


async def test_nested_supervisor_escalates_to_its_parent_which_restarts_it() -> None:
    log: list[str] = []
    worker, other = Worker("worker", log), Worker("other", log)
    inner_events: list[RestartEvent] = []
    outer_events: list[RestartEvent] = []
    inner = supervisor(
        [worker.spec], SupervisorConfig(intensity=1, jitter=0.0), name="inner", events=inner_events
    )
    outer = supervisor([inner, other.spec], name="outer", events=outer_events)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(outer.run)
            worker.crash()
            await worker.wait_ups(2)  # inner restarts it once
            worker.crash()  # one too many for inner: it escalates, outer restarts inner
            await worker.wait_ups(3)
            assert outer.statistics().restarts == {"inner": 1, "other": 0}
            assert inner.statistics().restarts == {"worker": 0}  # a fresh run
            assert (other.starts, other.stops) == (1, 0)
            tg.cancel_scope.cancel()
    assert [(e.supervisor, e.child, e.error_type) for e in inner_events] == [
        ("inner", "worker", "ValueError")
    ]
    assert [(e.supervisor, e.child, e.error_type) for e in outer_events] == [
        ("outer", "inner", "SupervisorEscalation")
    ]


async def test_transient_child_returning_normally_is_not_restarted() -> None:
    log: list[str] = []
    a, b = Worker("a", log, restart="transient"), Worker("b", log)
    sup = supervisor([a.spec, b.spec])
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.exit_normally()
            b.crash()  # exits are handled in order: once b is back, a's return was handled
            await b.wait_ups(2)
            assert a.starts == 1
            assert sup.statistics().running == ("b",)
            tg.cancel_scope.cancel()


async def test_transient_child_that_crashes_is_restarted() -> None:
    log: list[str] = []
    a = Worker("a", log, restart="transient")
    sup = supervisor([a.spec])
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.crash()
            await a.wait_ups(2)
            tg.cancel_scope.cancel()


async def test_permanent_child_returning_normally_is_restarted() -> None:
    log: list[str] = []
    a = Worker("a", log)
    events: list[RestartEvent] = []
    sup = supervisor([a.spec], events=events)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.exit_normally()
            await a.wait_ups(2)
            tg.cancel_scope.cancel()
    assert [(e.child, e.error_type) for e in events] == [("a", None)]


async def test_temporary_child_is_never_restarted_even_after_a_crash() -> None:
    log: list[str] = []
    a, b = Worker("a", log, restart="temporary"), Worker("b", log)
    events: list[RestartEvent] = []
    sup = supervisor([a.spec, b.spec], events=events)
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            a.crash()
            b.crash()
            await b.wait_ups(2)
            assert a.starts == 1
            stats = sup.statistics()
            assert stats.children[0].last_error_type == "ValueError"
            assert stats.running == ("b",)
            tg.cancel_scope.cancel()
    assert [e.child for e in events] == ["b"]


async def test_cancelling_the_supervisor_stops_children_in_reverse_order_without_a_crash() -> None:
    log: list[str] = []
    a, b, c = Worker("a", log), Worker("b", log), Worker("c", log)
    events: list[RestartEvent] = []
    sup = supervisor([a.spec, b.spec, c.spec], events=events)
    reached_after_run = False

    async def supervised(*, task_status: TaskStatus[None]) -> None:
        nonlocal reached_after_run
        await sup.run(task_status=task_status)
        reached_after_run = True

    with anyio.fail_after(HANG_GUARD):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                await tg.start(supervised)
                del log[:]
                scope.cancel()
    assert scope.cancelled_caught
    assert not reached_after_run  # cancellation propagated out of run()
    assert log == ["c stop 1", "b stop 1", "a stop 1"]
    assert events == []
    stats = sup.statistics()
    assert stats.restarts == {"a": 0, "b": 0, "c": 0}
    assert stats.running == ()


async def test_next_child_is_stopped_only_after_the_previous_one_finished_its_cleanup() -> None:
    log: list[str] = []
    a = Worker("a", log)

    async def tidy(task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                for _ in range(5):  # cleanup that takes a few scheduling rounds
                    await anyio.lowlevel.checkpoint()
            log.append("tidy cleaned up")

    sup = supervisor([a.spec, ChildSpec("tidy", tidy, shutdown=5.0)])
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            tg.cancel_scope.cancel()
    assert log == ["a start 1", "tidy cleaned up", "a stop 1"]


async def test_supervisor_moves_on_when_a_child_overruns_its_shutdown_budget() -> None:
    log: list[str] = []
    a = Worker("a", log)

    async def stubborn(task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            # Shielded cleanup that needs a's stop first: it only finishes if the
            # supervisor stops waiting for it after its (zero) shutdown budget.
            with anyio.move_on_after(HANG_GUARD, shield=True) as waited:
                while a.stops == 0:
                    await anyio.lowlevel.checkpoint()
            log.append("stubborn timed out" if waited.cancelled_caught else "stubborn done")

    sup = supervisor([a.spec, ChildSpec("stubborn", stubborn, shutdown=0.0)])
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        tg.cancel_scope.cancel()
    assert log == ["a start 1", "a stop 1", "stubborn done"]


async def test_statistics_are_a_frozen_snapshot() -> None:
    log: list[str] = []
    a = Worker("a", log)
    sup = supervisor([a.spec])
    stats = sup.statistics()
    assert (stats.name, stats.strategy, stats.running, stats.restarts) == (
        "pool",
        "one_for_one",
        (),
        {"a": 0},
    )
    with pytest.raises(AttributeError):
        stats.name = "other"  # type: ignore[misc]


async def test_a_running_supervisor_refuses_a_second_run() -> None:
    log: list[str] = []
    sup = supervisor([Worker("a", log).spec])
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            with pytest.raises(RuntimeError, match="'pool' is already running"):
                await sup.run()
            tg.cancel_scope.cancel()


def test_bad_configuration_is_refused_with_the_offending_values() -> None:
    log: list[str] = []
    with pytest.raises(ConfigError, match=r"child names must be unique, \['a'\] appear twice"):
        Supervisor("pool", [Worker("a", log).spec, Worker("a", log).spec])
    with pytest.raises(ConfigError, match="intensity must be >= 0, got -1"):
        SupervisorConfig(intensity=-1)
    with pytest.raises(ConfigError, match="jitter must be in"):
        SupervisorConfig(jitter=1.5)
    with pytest.raises(ConfigError, match="restart must be permanent, transient or temporary"):
        ChildSpec("a", Worker("a", log).start, "sometimes")  # type: ignore[arg-type]


def test_defaults_are_the_reference_defaults() -> None:
    cfg = SupervisorConfig()
    assert (cfg.strategy, cfg.intensity, cfg.period) == ("one_for_one", 5, 30.0)
    assert (cfg.backoff_initial, cfg.backoff_max, cfg.backoff_multiplier, cfg.jitter) == (
        0.2,
        10.0,
        2.0,
        0.2,
    )
