"""A circuit breaker around calls to one dependency, in the manner of resilience4j.

The breaker is a small synchronous state machine: asking for permission, reporting an
outcome and reading statistics never await, so no lock is held while the guarded call
runs and many calls can be in flight at once. :meth:`CircuitBreaker.call` wraps an
async callable with all three steps.

States and transitions::

    closed ──failure or slow-call rate ≥ threshold──► open ──wait elapsed──► half_open
    half_open ──all probes succeed──► closed      half_open ──a probe fails / stuck──► open
    any ──force_open()──► forced_open              any ──reset()──► closed

* **closed** records every outcome in a count-based sliding window (the last
  ``window_size`` calls). Once the window holds ``minimum_calls`` outcomes, a failure
  rate or slow-call rate at or above its threshold opens the breaker.
* **open** rejects calls. After the open wait (``open_wait``, doubled for every
  consecutive re-open up to ``max_open_wait``, with jitter) it moves to half-open.
* **half_open** lets exactly ``half_open_permitted_calls`` probe calls through and
  rejects the rest. When all probes have succeeded (and the slow-call rate over them
  stays below its threshold) the breaker closes, resetting the window and the
  open-wait doubling. Any failed probe re-opens it at once with a longer wait, without
  waiting for the outstanding probes; so does a slow-call rate over all probes that
  has reached its threshold whatever the outstanding probes return. A half-open state
  that does not settle within ``max_half_open_wait`` (probes that never report)
  re-opens too.
* **forced_open** rejects everything until :meth:`CircuitBreaker.reset`.

There is no background task: time-based transitions (open → half_open, the half-open
cap) are applied lazily, with the injected clock, whenever the breaker is asked for
permission, told an outcome, or read (:meth:`~CircuitBreaker.statistics`,
:attr:`~CircuitBreaker.state`). A metrics gauge that reads ``statistics()`` therefore
sees them on time.

What counts as a failure: an :class:`Exception` that is not one of
``BreakerConfig.ignore_exceptions`` (by default :class:`~graph.errors.InvalidEntryError`:
bad input says nothing about the dependency) and that ``BreakerConfig.record_error``
accepts (all, by default). Cancellation and other :class:`BaseException` never count;
ignored errors and cancelled calls give their permission back.

The config, states, records and sliding window live in :mod:`actors.runtime.breaker_config`
and are re-exported here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from actors.runtime.backoff import jittered_backoff
from actors.runtime.breaker_config import (
    BreakerCall,
    BreakerConfig,
    BreakerState,
    BreakerStatistics,
    BreakerTransition,
    CallNotPermittedError,
    CallOutcome,
    SlidingWindow,
    TransitionTrigger,
)

__all__ = [
    "BreakerCall",
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "BreakerTransition",
    "CallNotPermittedError",
    "CallOutcome",
    "CircuitBreaker",
    "TransitionTrigger",
]

T = TypeVar("T")


class CircuitBreaker:
    """A circuit breaker guarding one dependency (see the module docstring).

    Either wrap each call with :meth:`call`, or pair :meth:`try_acquire` with exactly
    one of :meth:`on_success`, :meth:`on_error` or :meth:`release` per permitted call.
    :meth:`call` also drops outcomes of calls permitted before the breaker last changed
    state; the manual pair cannot tell them apart and records them against the current
    state (in half-open only while a probe is outstanding).

    Listeners run synchronously, after the state has changed; they must not raise (an
    exception propagates to whoever triggered the change) and must not block.

    Args:
        name: the breaker's name in telemetry and error messages.
        config: thresholds and waits; the reference defaults if None.
        clock: monotonic clock in seconds (inject a fake one in tests).
        rng: source of jitter (seed one in tests).
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._name = name
        self._config = config if config is not None else BreakerConfig()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        cfg = self._config
        self._window = SlidingWindow(cfg.window_size, cfg.minimum_calls)
        self._probes = SlidingWindow(cfg.half_open_permitted_calls, 1)
        self._active = self._window  # the window statistics() reports
        self._state = BreakerState.CLOSED
        self._epoch = 0  # bumped on every state change; outcomes of older permits are stale
        self._probes_permitted = 0  # probe permissions handed out and not given back
        self._half_open_since = 0.0
        self._next_probe_at: float | None = None
        self._consecutive_opens = 0
        self._not_permitted = 0
        self._last_error_type: str | None = None
        self._last_trip: BreakerTransition | None = None
        self._listeners: list[Callable[[BreakerTransition], None]] = []
        self._call_listeners: list[Callable[[BreakerCall], None]] = []

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._name

    @property
    def config(self) -> BreakerConfig:
        """The breaker's configuration."""
        return self._config

    @property
    def state(self) -> BreakerState:
        """The current state, with time-based transitions applied."""
        self._refresh(self._clock())
        return self._state

    def add_listener(self, callback: Callable[[BreakerTransition], None]) -> None:
        """Call ``callback`` with every state transition from now on."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[BreakerTransition], None]) -> None:
        """Stop calling a transition listener added with :meth:`add_listener`."""
        self._listeners.remove(callback)

    def add_call_listener(self, callback: Callable[[BreakerCall], None]) -> None:
        """Call ``callback`` with every call outcome (including rejections) from now on."""
        self._call_listeners.append(callback)

    def remove_call_listener(self, callback: Callable[[BreakerCall], None]) -> None:
        """Stop calling a call listener added with :meth:`add_call_listener`."""
        self._call_listeners.remove(callback)

    def try_acquire(self) -> bool:
        """Ask for permission to make one call.

        Returns:
            True if the call may go ahead (then report it exactly once); False if the
            breaker rejects it, which is counted as not permitted.
        """
        return self._acquire() is not None

    def on_success(self, duration: float) -> None:
        """Report that a permitted call succeeded after ``duration`` seconds."""
        self._complete(None, duration, None)

    def on_error(self, duration: float, error: BaseException) -> None:
        """Report that a permitted call raised ``error`` after ``duration`` seconds.

        Errors that do not count (see :meth:`BreakerConfig.counts_as_failure`) are
        reported to call listeners as ``ignored`` and give the permission back.
        """
        self._complete(None, duration, error)

    def release(self) -> None:
        """Give back a permission without an outcome (the call was cancelled or not made)."""
        self._release(None)

    def force_open(self) -> None:
        """Reject every call until :meth:`reset` (an operator's switch)."""
        if self._state is not BreakerState.FORCED_OPEN:
            self._next_probe_at = None
            self._transition(self._clock(), BreakerState.FORCED_OPEN, "manual")

    def reset(self) -> None:
        """Close the breaker and forget its window, probes and open-wait doubling."""
        self._window.clear()
        self._probes.clear()
        self._active = self._window
        self._probes_permitted = 0
        self._consecutive_opens = 0
        self._next_probe_at = None
        self._last_error_type = None
        if self._state is BreakerState.CLOSED:
            self._epoch += 1
        else:
            self._transition(self._clock(), BreakerState.CLOSED, "manual")

    def statistics(self) -> BreakerStatistics:
        """A snapshot of the breaker, with time-based transitions applied."""
        self._refresh(self._clock())
        failure_rate, slow_call_rate = self._active.rates()
        return BreakerStatistics(
            name=self._name,
            state=self._state,
            failure_rate=failure_rate,
            slow_call_rate=slow_call_rate,
            window_calls=self._active.calls,
            failed_calls=self._active.failed,
            slow_calls=self._active.slow,
            not_permitted_calls=self._not_permitted,
            consecutive_opens=self._consecutive_opens,
            next_probe_at=self._next_probe_at,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - must fire inside the breaker to count
    ) -> T:
        """Make one call through the breaker.

        Args:
            fn: the call to make.
            timeout: seconds before the call is abandoned with :class:`TimeoutError`,
                which counts as a failure. Put timeouts here (or inside ``fn``), not
                around ``call()``: a cancel scope outside the breaker looks like
                cancellation, which is never recorded.

        Returns:
            What ``fn`` returned.

        Raises:
            CallNotPermittedError: the breaker rejected the call; ``fn`` was not called.
        """
        epoch = self._acquire()
        if epoch is None:
            raise self._rejection()
        start = self._clock()
        reported = False
        try:
            if timeout is None:
                result = await fn()
            else:
                with anyio.fail_after(timeout):
                    result = await fn()
        except Exception as error:
            reported = True
            self._complete(epoch, self._clock() - start, error)
            raise
        else:
            reported = True
            self._complete(epoch, self._clock() - start, None)
            return result
        finally:
            if not reported:
                # Cancelled (or another BaseException): no outcome to record.
                self._release(epoch)

    # -- the state machine ------------------------------------------------------------

    def _acquire(self) -> int | None:
        now = self._clock()
        self._refresh(now)
        if self._state is BreakerState.CLOSED:
            return self._epoch
        if (
            self._state is BreakerState.HALF_OPEN
            and self._probes_permitted < self._config.half_open_permitted_calls
        ):
            self._probes_permitted += 1
            return self._epoch
        self._not_permitted += 1
        self._emit_call(
            BreakerCall(self._name, "not_permitted", self._state, None, False, None, now)
        )
        return None

    def _release(self, epoch: int | None) -> None:
        self._refresh(self._clock())
        self._give_back(epoch)

    def _give_back(self, epoch: int | None) -> None:
        if epoch is not None and epoch != self._epoch:
            return
        if self._state is BreakerState.HALF_OPEN and self._probes_permitted > self._probes.calls:
            self._probes_permitted -= 1

    def _complete(self, epoch: int | None, duration: float, error: BaseException | None) -> None:
        now = self._clock()
        self._refresh(now)
        cfg = self._config
        slow = duration > cfg.slow_call_duration
        error_type = None if error is None else type(error).__name__
        if error is not None and not cfg.counts_as_failure(error):
            self._give_back(epoch)
            self._emit_call(
                BreakerCall(self._name, "ignored", self._state, duration, slow, error_type, now)
            )
            return
        failed = error is not None
        outcome: CallOutcome = "failure" if failed else "success"
        self._emit_call(
            BreakerCall(self._name, outcome, self._state, duration, slow, error_type, now)
        )
        if epoch is not None and epoch != self._epoch:
            return  # permitted before the last transition: says nothing about this state
        if self._state is BreakerState.CLOSED:
            self._window.record(failed=failed, slow=slow)
            if failed:
                self._last_error_type = error_type
            self._evaluate_closed(now)
        elif self._state is BreakerState.HALF_OPEN:
            if self._probes_permitted <= self._probes.calls:
                return  # no probe outstanding: a late outcome from before half-open
            self._probes.record(failed=failed, slow=slow)
            if failed:
                self._last_error_type = error_type
            self._evaluate_half_open(now)
        # open / forced_open: late outcomes of earlier calls change nothing

    def _evaluate_closed(self, now: float) -> None:
        cfg = self._config
        failure_rate, slow_rate = self._window.rates()
        if failure_rate >= cfg.failure_rate_threshold:
            self._open(now, "failure_rate", self._window)
        elif slow_rate >= cfg.slow_call_rate_threshold:
            self._open(now, "slow_call_rate", self._window)

    def _evaluate_half_open(self, now: float) -> None:
        cfg = self._config
        probes = cfg.half_open_permitted_calls
        # DESIGN: half-open closes only when the permitted probes succeed, so any failed
        # probe re-opens at once; slow probes re-open once their rate over all probes is
        # settled at or above the threshold.
        if self._probes.failed > 0 or self._probes.slow / probes >= cfg.slow_call_rate_threshold:
            self._open(now, "probe_failed", self._probes)
        elif self._probes.calls >= probes:
            self._window.clear()
            self._active = self._window
            self._probes_permitted = 0
            self._consecutive_opens = 0
            self._last_error_type = None
            self._transition(now, BreakerState.CLOSED, "probe_succeeded", self._probes)

    def _refresh(self, now: float) -> None:
        """Apply the time-based transitions that are due."""
        if self._state is BreakerState.OPEN:
            if self._next_probe_at is not None and now >= self._next_probe_at:
                self._probes.clear()
                self._active = self._probes
                self._probes_permitted = 0
                self._half_open_since = now
                self._next_probe_at = None
                self._last_error_type = None
                self._transition(now, BreakerState.HALF_OPEN, "break_elapsed")
        elif self._state is BreakerState.HALF_OPEN:
            limit = self._config.max_half_open_wait
            if limit is not None and now - self._half_open_since >= limit:
                self._last_error_type = None
                self._open(now, "half_open_timeout", None)

    def _open(self, now: float, trigger: TransitionTrigger, window: SlidingWindow | None) -> None:
        cfg = self._config
        self._consecutive_opens += 1
        attempt = self._consecutive_opens - 1
        wait = jittered_backoff(
            cfg.open_wait,
            cfg.open_wait_multiplier,
            attempt,
            cfg.max_open_wait,
            cfg.jitter,
            self._rng,
        )
        self._next_probe_at = now + wait
        self._last_trip = self._transition(now, BreakerState.OPEN, trigger, window)

    def _transition(
        self,
        now: float,
        to_state: BreakerState,
        trigger: TransitionTrigger,
        window: SlidingWindow | None = None,
    ) -> BreakerTransition:
        failure_rate, slow_rate = (-1.0, -1.0) if window is None else window.rates()
        record = BreakerTransition(
            name=self._name,
            from_state=self._state,
            to_state=to_state,
            trigger=trigger,
            failure_rate=failure_rate,
            slow_call_rate=slow_rate,
            window_calls=0 if window is None else window.calls,
            error_type=None if window is None else self._last_error_type,
            at=now,
        )
        self._state = to_state
        self._epoch += 1
        for listener in tuple(self._listeners):
            listener(record)
        return record

    def _emit_call(self, record: BreakerCall) -> None:
        for listener in tuple(self._call_listeners):
            listener(record)

    def _rejection(self) -> CallNotPermittedError:
        state, name = self._state, self._name
        next_probe_at = self._next_probe_at
        retry_after = None
        if state is BreakerState.FORCED_OPEN:
            detail = "forced_open by an operator; no call goes through until it is reset"
        elif state is BreakerState.HALF_OPEN:
            detail = (
                f"half_open and all {self._config.half_open_permitted_calls} probe calls are"
                " in flight; retry once they finish"
            )
        else:
            trip = self._last_trip
            detail = "open"
            if trip is not None and trip.window_calls:
                detail += (
                    f" (tripped by {trip.trigger}: {trip.failure_rate:.0%} failed,"
                    f" {trip.slow_call_rate:.0%} slow over {trip.window_calls} calls"
                    f"{f', last error {trip.error_type}' if trip.error_type else ''})"
                )
            if next_probe_at is not None:
                retry_after = max(0.0, next_probe_at - self._clock())
                detail += (
                    f"; it lets probe calls through at t={next_probe_at:.3f}, in"
                    f" {retry_after:.1f} s: retry then and leave the work pending meanwhile"
                )
        return CallNotPermittedError(
            f"circuit breaker {name!r} is {detail}; the call was not made",
            breaker=name,
            state=state,
            next_probe_at=next_probe_at,
            retry_after=retry_after,
        )
