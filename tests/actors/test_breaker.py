"""The circuit breaker's state machine, driven by a fake clock and seeded jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.abc import TaskStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.runtime.breaker import (
    BreakerCall,
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CallNotPermittedError,
    CircuitBreaker,
)
from actors.testing import FakeClock
from graph.errors import ConfigError, InvalidEntryError

CLOSED, OPEN = BreakerState.CLOSED, BreakerState.OPEN
HALF_OPEN, FORCED_OPEN = BreakerState.HALF_OPEN, BreakerState.FORCED_OPEN


def make(
    config: BreakerConfig | None = None, *, seed: int = 7
) -> tuple[CircuitBreaker, FakeClock, list[BreakerTransition]]:
    clock = FakeClock()
    breaker = CircuitBreaker("redis", config, clock=clock, rng=random.Random(seed))
    transitions: list[BreakerTransition] = []
    breaker.add_listener(transitions.append)
    return breaker, clock, transitions


def feed(breaker: CircuitBreaker, outcomes: str) -> None:
    """Report one permitted call per letter: o = ok, f = failure, s = slow success."""
    for outcome in outcomes:
        assert breaker.try_acquire(), f"call refused in state {breaker.state}"
        if outcome == "o":
            breaker.on_success(0.01)
        elif outcome == "s":
            breaker.on_success(6.0)  # slower than the default slow_call_duration of 5 s
        else:
            breaker.on_error(0.01, ConnectionError("refused"))


def trip(breaker: CircuitBreaker) -> None:
    feed(breaker, "f" * breaker.config.minimum_calls)
    assert breaker.state is OPEN


NO_JITTER = BreakerConfig(jitter=0.0)


def test_defaults_are_the_reference_defaults() -> None:
    cfg = BreakerConfig()
    assert (cfg.window_size, cfg.minimum_calls) == (50, 20)
    assert (cfg.failure_rate_threshold, cfg.slow_call_rate_threshold) == (0.5, 0.8)
    assert (cfg.open_wait, cfg.max_open_wait, cfg.jitter) == (30.0, 300.0, 0.2)
    assert cfg.half_open_permitted_calls == 3


def test_failures_below_minimum_calls_never_open() -> None:
    breaker, _, transitions = make()
    feed(breaker, "f" * 19)
    stats = breaker.statistics()
    assert stats.state is CLOSED
    assert (stats.window_calls, stats.failed_calls, stats.failure_rate) == (19, 19, -1.0)
    assert transitions == []


def test_opens_at_exactly_fifty_percent_once_minimum_calls_are_reached() -> None:
    breaker, _, transitions = make()
    feed(breaker, "o" * 10 + "f" * 9)
    assert breaker.state is CLOSED
    feed(breaker, "f")  # 10 of 20
    assert breaker.state is OPEN
    [opened] = transitions
    assert (opened.trigger, opened.failure_rate, opened.window_calls) == ("failure_rate", 0.5, 20)
    assert opened.error_type == "ConnectionError"


def test_just_below_fifty_percent_stays_closed() -> None:
    breaker, _, _ = make()
    feed(breaker, "o" * 11 + "f" * 9)
    stats = breaker.statistics()
    assert (stats.state, stats.failure_rate) == (CLOSED, 0.45)


def test_sliding_window_forgets_the_oldest_outcomes() -> None:
    breaker, _, _ = make()
    feed(breaker, "f" * 9 + "o" * 41)  # 18 %
    feed(breaker, "o" * 9)  # the nine failures slide out
    stats = breaker.statistics()
    assert (stats.window_calls, stats.failed_calls, stats.state) == (50, 0, CLOSED)
    feed(breaker, "f" * 25)  # 25 of the last 50
    assert breaker.state is OPEN


def test_slow_calls_open_at_eighty_percent() -> None:
    breaker, _, transitions = make()
    feed(breaker, "o" * 4 + "s" * 15)
    assert breaker.state is CLOSED
    feed(breaker, "s")  # 16 of 20
    assert breaker.state is OPEN
    [opened] = transitions
    assert (opened.trigger, opened.slow_call_rate, opened.failure_rate) == (
        "slow_call_rate",
        0.8,
        0.0,
    )
    assert opened.error_type is None


def test_open_rejects_calls_and_counts_them() -> None:
    breaker, _, _ = make()
    calls: list[BreakerCall] = []
    breaker.add_call_listener(calls.append)
    trip(breaker)
    assert [breaker.try_acquire() for _ in range(3)] == [False, False, False]
    assert breaker.statistics().not_permitted_calls == 3
    assert [c.outcome for c in calls[-3:]] == ["not_permitted"] * 3


def test_open_turns_half_open_once_the_jittered_wait_has_elapsed() -> None:
    breaker, clock, transitions = make(seed=11)
    trip(breaker)
    expected_wait = 30.0 * (1 + random.Random(11).uniform(-0.2, 0.2))
    next_probe_at = breaker.statistics().next_probe_at
    assert next_probe_at == pytest.approx(clock.now + expected_wait)
    clock.advance(expected_wait - 0.001)
    assert not breaker.try_acquire()
    clock.advance(0.001)
    assert breaker.statistics().state is HALF_OPEN  # lazily, on read
    assert transitions[-1].trigger == "break_elapsed"
    assert transitions[-1].at == clock.now


@pytest.mark.parametrize("seed", range(50))
def test_open_wait_jitter_stays_within_twenty_percent(seed: int) -> None:
    breaker, clock, _ = make(seed=seed)
    trip(breaker)
    wait = breaker.statistics().next_probe_at
    assert wait is not None
    assert 24.0 <= wait - clock.now <= 36.0


def test_half_open_closes_after_three_good_probes_and_resets() -> None:
    breaker, clock, _ = make(NO_JITTER)
    trip(breaker)
    clock.advance(30.0)
    assert [breaker.try_acquire() for _ in range(4)] == [True, True, True, False]
    for _ in range(3):
        breaker.on_success(0.01)
    stats = breaker.statistics()
    assert stats.state is CLOSED
    assert (stats.window_calls, stats.consecutive_opens, stats.next_probe_at) == (0, 0, None)
    trip(breaker)  # the doubling was reset: the next open waits the base time again
    assert breaker.statistics().next_probe_at == clock.now + 30.0


def test_failing_probes_reopen_with_a_doubled_wait_capped_at_five_minutes() -> None:
    breaker, clock, _ = make(NO_JITTER)
    trip(breaker)
    waits = []
    for _ in range(6):
        next_probe_at = breaker.statistics().next_probe_at
        assert next_probe_at is not None
        waits.append(next_probe_at - clock.now)
        clock.now = next_probe_at
        feed(breaker, "f")
        assert breaker.state is OPEN
    assert waits == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    assert breaker.statistics().consecutive_opens == 7


@pytest.mark.parametrize("seed", range(20))
def test_jittered_open_wait_never_exceeds_the_cap(seed: int) -> None:
    breaker, clock, _ = make(seed=seed)
    trip(breaker)
    for _ in range(8):
        next_probe_at = breaker.statistics().next_probe_at
        assert next_probe_at is not None
        clock.now = next_probe_at
        feed(breaker, "f")
    wait = breaker.statistics().next_probe_at
    assert wait is not None
    assert 240.0 <= wait - clock.now <= 300.0


def test_first_failing_probe_reopens_without_waiting_for_the_others() -> None:
    breaker, clock, transitions = make(NO_JITTER)
    trip(breaker)
    clock.advance(30.0)
    assert [breaker.try_acquire() for _ in range(3)] == [True, True, True]
    breaker.on_error(0.01, TimeoutError())
    assert breaker.state is OPEN  # DESIGN: closed only after the probes succeed
    reopened = transitions[-1]
    assert (reopened.trigger, reopened.failure_rate, reopened.window_calls) == (
        "probe_failed",
        1.0,
        1,
    )
    assert reopened.error_type == "TimeoutError"
    breaker.on_success(0.01)  # the other probes' late outcomes change nothing
    breaker.on_success(0.01)
    assert breaker.state is OPEN


def test_one_failing_probe_out_of_three_reopens() -> None:
    breaker, clock, transitions = make(NO_JITTER)
    trip(breaker)
    clock.advance(30.0)
    feed(breaker, "of")
    assert breaker.state is OPEN
    assert transitions[-1].trigger == "probe_failed"
    assert transitions[-1].failure_rate == pytest.approx(1 / 2)


def test_half_open_that_never_settles_reopens_after_max_half_open_wait() -> None:
    breaker, clock, transitions = make(NO_JITTER)
    trip(breaker)
    clock.advance(30.0)
    assert breaker.try_acquire()  # a probe that never reports back
    clock.advance(59.9)
    assert breaker.state is HALF_OPEN
    clock.advance(0.1)
    stats = breaker.statistics()
    assert stats.state is OPEN
    assert transitions[-1].trigger == "half_open_timeout"
    assert stats.next_probe_at == clock.now + 60.0  # counts as a re-open: doubled


def test_ignored_errors_are_neither_successes_nor_failures() -> None:
    class Refused(Exception):
        pass

    breaker, _, _ = make(BreakerConfig(ignore_exceptions=(InvalidEntryError, Refused)))
    calls: list[BreakerCall] = []
    breaker.add_call_listener(calls.append)
    for error in (InvalidEntryError("bad_json", "not JSON"), Refused()):
        for _ in range(30):
            assert breaker.try_acquire()
            breaker.on_error(0.01, error)
    stats = breaker.statistics()
    assert (stats.state, stats.window_calls) == (CLOSED, 0)
    assert {c.outcome for c in calls} == {"ignored"}


def test_record_error_predicate_decides_which_exceptions_count() -> None:
    breaker, _, _ = make(BreakerConfig(record_error=lambda e: not isinstance(e, KeyError)))
    for _ in range(20):
        assert breaker.try_acquire()
        breaker.on_error(0.01, KeyError("missing"))
    assert breaker.statistics().window_calls == 0
    feed(breaker, "f" * 20)
    assert breaker.state is OPEN


async def test_cancellation_is_never_a_failure() -> None:
    breaker, _, _ = make()
    cancelled = anyio.get_cancelled_exc_class()
    assert not breaker.config.counts_as_failure(cancelled())
    assert not breaker.config.counts_as_failure(KeyboardInterrupt())
    assert breaker.config.counts_as_failure(TimeoutError())
    assert breaker.config.counts_as_failure(OSError())


async def test_cancelled_call_is_not_recorded_and_gives_its_probe_back() -> None:
    breaker, clock, _ = make(NO_JITTER)
    calls: list[BreakerCall] = []
    breaker.add_call_listener(calls.append)
    trip(breaker)
    clock.advance(30.0)
    entered = anyio.Event()

    async def hangs() -> None:
        entered.set()
        await anyio.Event().wait()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.call, hangs)
            await entered.wait()
            scope.cancel()
    assert scope.cancelled_caught
    stats = breaker.statistics()
    assert (stats.state, stats.window_calls) == (HALF_OPEN, 0)
    assert len(calls) == 20  # the trip's failures; nothing for the cancelled call
    feed(breaker, "ooo")  # all three probes are available again
    assert breaker.state is CLOSED


async def test_call_records_success_and_failure_timed_with_the_clock() -> None:
    breaker, clock, _ = make()
    calls: list[BreakerCall] = []
    breaker.add_call_listener(calls.append)

    async def slow_ok() -> str:
        clock.advance(7.0)
        return "done"

    async def broken() -> None:
        clock.advance(0.5)
        raise ConnectionResetError("peer went away")

    assert await breaker.call(slow_ok) == "done"
    with pytest.raises(ConnectionResetError):
        await breaker.call(broken)
    assert [(c.outcome, c.duration, c.slow, c.error_type) for c in calls] == [
        ("success", 7.0, True, None),
        ("failure", 0.5, False, "ConnectionResetError"),
    ]
    stats = breaker.statistics()
    assert (stats.window_calls, stats.failed_calls, stats.slow_calls) == (2, 1, 1)


async def test_call_timeout_counts_as_a_failure() -> None:
    breaker, _, _ = make()
    calls: list[BreakerCall] = []
    breaker.add_call_listener(calls.append)
    with pytest.raises(TimeoutError):
        await breaker.call(anyio.Event().wait, timeout=0.0)
    assert [(c.outcome, c.error_type) for c in calls] == [("failure", "TimeoutError")]
    assert breaker.statistics().failed_calls == 1


async def test_call_raises_call_not_permitted_with_state_and_next_probe() -> None:
    breaker, clock, _ = make(NO_JITTER)
    trip(breaker)
    clock.advance(12.5)
    made = False

    async def never() -> None:
        nonlocal made
        made = True

    with pytest.raises(CallNotPermittedError) as caught:
        await breaker.call(never)
    error = caught.value
    assert not made
    assert (error.breaker, error.state, error.retry_after) == ("redis", OPEN, 17.5)
    assert error.next_probe_at == clock.now + 17.5
    message = str(error)
    assert "'redis' is open" in message
    assert "100% failed" in message
    assert "ConnectionError" in message
    assert f"t={clock.now + 17.5:.3f}" in message
    assert "in 17.5 s" in message
    assert "leave the work pending" in message


async def test_call_not_permitted_in_half_open_says_probes_are_busy() -> None:
    breaker, clock, _ = make(NO_JITTER)
    trip(breaker)
    clock.advance(30.0)
    for _ in range(3):
        assert breaker.try_acquire()

    async def never() -> None:
        raise AssertionError("not permitted")

    with pytest.raises(CallNotPermittedError, match="half_open and all 3 probe calls"):
        await breaker.call(never)


async def test_late_outcome_of_a_call_permitted_before_the_trip_is_dropped() -> None:
    breaker, clock, _ = make(NO_JITTER)
    release = anyio.Event()
    entered = anyio.Event()

    async def slow_failure() -> None:
        entered.set()
        await release.wait()
        raise ConnectionError("late")

    async with anyio.create_task_group() as tg:

        async def run_old_call() -> None:
            with pytest.raises(ConnectionError):
                await breaker.call(slow_failure)

        tg.start_soon(run_old_call)
        await entered.wait()  # permitted while closed
        trip(breaker)
        clock.advance(30.0)
        assert breaker.try_acquire()  # one probe in flight in half-open
        release.set()
    stats = breaker.statistics()
    assert (stats.state, stats.window_calls) == (HALF_OPEN, 0)  # not taken for the probe
    feed(breaker, "oo")
    assert breaker.state is HALF_OPEN  # the first probe is still outstanding
    breaker.on_success(0.01)
    assert breaker.state is CLOSED


def test_listener_sees_closed_open_half_open_closed_with_triggers_and_rates() -> None:
    breaker, clock, transitions = make(NO_JITTER)
    start = clock.now
    feed(breaker, "o" * 10 + "f" * 10)
    clock.advance(30.0)
    feed(breaker, "ooo")
    assert [
        (t.from_state, t.to_state, t.trigger, t.failure_rate, t.window_calls, t.error_type, t.at)
        for t in transitions
    ] == [
        (CLOSED, OPEN, "failure_rate", 0.5, 20, "ConnectionError", start),
        (OPEN, HALF_OPEN, "break_elapsed", -1.0, 0, None, start + 30.0),
        (HALF_OPEN, CLOSED, "probe_succeeded", 0.0, 3, None, start + 30.0),
    ]
    assert {t.name for t in transitions} == {"redis"}


def test_force_open_rejects_until_reset() -> None:
    breaker, clock, transitions = make()
    breaker.force_open()
    clock.advance(10_000.0)
    assert not breaker.try_acquire()
    assert breaker.statistics().next_probe_at is None
    breaker.reset()
    assert breaker.try_acquire()
    assert [(t.from_state, t.to_state, t.trigger) for t in transitions] == [
        (CLOSED, FORCED_OPEN, "manual"),
        (FORCED_OPEN, CLOSED, "manual"),
    ]


def test_statistics_is_a_frozen_snapshot() -> None:
    breaker, _, _ = make()
    stats = breaker.statistics()
    with pytest.raises(AttributeError):
        stats.state = OPEN  # type: ignore[misc]


def test_bad_config_is_refused_with_the_offending_values() -> None:
    with pytest.raises(
        ConfigError, match=r"minimum_calls must be between 1 and window_size \(10\)"
    ):
        BreakerConfig(window_size=10, minimum_calls=20)
    with pytest.raises(ConfigError, match=r"failure_rate_threshold must be in \(0, 1\], got 1.5"):
        BreakerConfig(failure_rate_threshold=1.5)


# -- property: any interleaving of calls, outcomes and time --------------------------

PROPERTY_CONFIG = BreakerConfig(
    window_size=6,
    minimum_calls=3,
    half_open_permitted_calls=2,
    slow_call_duration=1.0,
    open_wait=10.0,
    max_open_wait=40.0,
    max_half_open_wait=25.0,
)
LEGAL = {
    (CLOSED, OPEN),
    (OPEN, HALF_OPEN),
    (HALF_OPEN, OPEN),
    (HALF_OPEN, CLOSED),
    *((s, FORCED_OPEN) for s in (CLOSED, OPEN, HALF_OPEN)),
    *((s, CLOSED) for s in (OPEN, HALF_OPEN, FORCED_OPEN)),
}


@dataclass
class _InFlight:
    outcome: str = "ok"
    probe_of: int | None = None  # the half-open period it was permitted in
    release: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


_start = st.just(("start",))
_finish = st.tuples(
    st.just("finish"),
    st.integers(0, 7),
    st.sampled_from(["ok", "fail", "fail", "slow", "ignored", "cancel"]),
)
_steps = st.lists(
    # Calls and outcomes dominate, so runs get through open into half-open often.
    st.one_of(
        _start,
        _finish,
        _start,
        _finish,
        st.tuples(st.just("advance"), st.floats(0.0, 45.0)),
        st.sampled_from([("force_open",), ("reset",), *[("start",)] * 8]),
    ),
    min_size=30,
    max_size=120,
)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(steps=_steps)
async def test_half_open_never_permits_more_than_its_probes_and_window_stays_bounded(
    steps: list[tuple[object, ...]],
) -> None:
    """Whatever happens, half-open has at most N probes out and the window at most its size."""
    clock = FakeClock()
    breaker = CircuitBreaker("prop", PROPERTY_CONFIG, clock=clock, rng=random.Random(3))
    period = 0  # counts entries into half-open
    transitions: list[BreakerTransition] = []

    def on_transition(t: BreakerTransition) -> None:
        nonlocal period
        transitions.append(t)
        period += t.to_state is HALF_OPEN

    breaker.add_listener(on_transition)
    in_flight: list[_InFlight] = []

    async def one_call(call: _InFlight, *, task_status: TaskStatus[bool]) -> None:
        async def work() -> None:
            task_status.started(True)
            await call.release.wait()
            if call.outcome == "slow":
                clock.advance(2.0)
            elif call.outcome == "fail":
                raise ConnectionError
            elif call.outcome == "ignored":
                raise InvalidEntryError("bad", "bad entry")

        with call.scope:
            try:
                await breaker.call(work)
            except CallNotPermittedError:
                task_status.started(False)
            except (ConnectionError, InvalidEntryError):
                pass
        call.done.set()

    async with anyio.create_task_group() as tg:
        for step in steps:
            if step[0] == "start":
                call = _InFlight()
                if await tg.start(one_call, call):
                    if breaker.statistics().state is HALF_OPEN:
                        call.probe_of = period
                    in_flight.append(call)
            elif step[0] == "finish" and in_flight:
                index, outcome = step[1], step[2]
                assert isinstance(index, int)
                assert isinstance(outcome, str)
                call = in_flight.pop(index % len(in_flight))
                if outcome == "cancel":
                    call.scope.cancel()
                else:
                    call.outcome = outcome
                    call.release.set()
                await call.done.wait()
            elif step[0] == "advance":
                assert isinstance(step[1], float)
                clock.advance(step[1])
            elif step[0] == "force_open":
                breaker.force_open()
            elif step[0] == "reset":
                breaker.reset()

            stats = breaker.statistics()
            assert stats.window_calls <= PROPERTY_CONFIG.window_size
            assert stats.failed_calls <= stats.window_calls
            assert stats.failure_rate == -1.0 or 0.0 <= stats.failure_rate <= 1.0
            if stats.state is HALF_OPEN:
                probes_out = sum(1 for c in in_flight if c.probe_of == period)
                assert probes_out + stats.window_calls <= PROPERTY_CONFIG.half_open_permitted_calls
            assert all((t.from_state, t.to_state) in LEGAL for t in transitions)
        tg.cancel_scope.cancel()
