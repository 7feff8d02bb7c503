"""What a circuit breaker is told and what it tells: its config, states and records.

The vocabulary of :mod:`actors.runtime.breaker`, apart from its state machine: the
validated :class:`BreakerConfig` (and what counts as a failure), the states, the records
handed to listeners and returned by ``statistics()``, the refusal error, and the
count-based :class:`SlidingWindow` the rates are computed over. Import these names from
:mod:`actors.runtime.breaker`, which re-exports them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from graph.errors import ConfigError, CtxdError, InvalidEntryError

__all__ = [
    "BreakerCall",
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "BreakerTransition",
    "CallNotPermittedError",
    "CallOutcome",
    "SlidingWindow",
    "TransitionTrigger",
]

TransitionTrigger = Literal[
    "failure_rate",
    "slow_call_rate",
    "break_elapsed",
    "probe_succeeded",
    "probe_failed",
    "half_open_timeout",
    "manual",
]
"""Why a breaker changed state."""

CallOutcome = Literal["success", "failure", "ignored", "not_permitted"]
"""How one call went, as the breaker saw it."""


class BreakerState(StrEnum):
    """The state of a circuit breaker; the values are the names used in telemetry."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """How a breaker decides; the defaults are ctxd's reference defaults.

    Attributes:
        window_size: outcomes kept in the count-based sliding window.
        minimum_calls: outcomes needed in the window before rates are computed.
        failure_rate_threshold: failure rate in (0, 1] at or above which the breaker opens.
        slow_call_rate_threshold: slow-call rate in (0, 1] at or above which it opens.
        slow_call_duration: seconds; a call that takes longer is slow (the call timeout).
        open_wait: seconds in open before the first probe.
        open_wait_multiplier: factor applied to the wait for every consecutive re-open.
        max_open_wait: cap on the open wait, jitter included.
        jitter: relative spread of the open wait: the wait is drawn from
            ``[wait·(1 - jitter), wait·(1 + jitter)]``, then capped.
        half_open_permitted_calls: probe calls let through in half-open.
        max_half_open_wait: seconds half-open may last before it re-opens; ``None``
            for no cap.
        ignore_exceptions: errors that are neither successes nor failures.
        record_error: optional predicate deciding whether a (non-ignored)
            :class:`Exception` counts as a failure.
    """

    window_size: int = 50
    minimum_calls: int = 20
    failure_rate_threshold: float = 0.5
    slow_call_rate_threshold: float = 0.8
    slow_call_duration: float = 5.0
    open_wait: float = 30.0
    open_wait_multiplier: float = 2.0
    max_open_wait: float = 300.0
    jitter: float = 0.2
    half_open_permitted_calls: int = 3
    max_half_open_wait: float | None = 60.0
    ignore_exceptions: tuple[type[BaseException], ...] = (InvalidEntryError,)
    record_error: Callable[[BaseException], bool] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.window_size < 1:
            problems.append(f"window_size must be >= 1, got {self.window_size}")
        if not 1 <= self.minimum_calls <= self.window_size:
            problems.append(
                f"minimum_calls must be between 1 and window_size ({self.window_size}),"
                f" got {self.minimum_calls}"
            )
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                problems.append(f"{name} must be in (0, 1], got {value!r}")
        for name in ("slow_call_duration", "open_wait"):
            value = getattr(self, name)
            if not 0.0 < value < math.inf:
                problems.append(f"{name} must be a positive number of seconds, got {value!r}")
        if not self.open_wait_multiplier >= 1.0:
            problems.append(f"open_wait_multiplier must be >= 1, got {self.open_wait_multiplier!r}")
        if not self.open_wait <= self.max_open_wait < math.inf:
            problems.append(
                f"max_open_wait must be finite and >= open_wait ({self.open_wait!r}),"
                f" got {self.max_open_wait!r}"
            )
        if not 0.0 <= self.jitter < 1.0:
            problems.append(f"jitter must be in [0, 1), got {self.jitter!r}")
        if self.half_open_permitted_calls < 1:
            problems.append(
                f"half_open_permitted_calls must be >= 1, got {self.half_open_permitted_calls}"
            )
        if self.max_half_open_wait is not None and not self.max_half_open_wait > 0.0:
            problems.append(
                f"max_half_open_wait must be > 0 seconds or None, got {self.max_half_open_wait!r}"
            )
        if problems:
            raise ConfigError("invalid circuit breaker config: " + "; ".join(problems))

    def counts_as_failure(self, error: BaseException) -> bool:
        """Tell whether ``error`` counts as a failure of the guarded dependency.

        Args:
            error: what the call raised.

        Returns:
            False for cancellation and any other non-:class:`Exception`, for
            ``ignore_exceptions``, and where ``record_error`` says no; True otherwise.
        """
        if not isinstance(error, Exception) or isinstance(error, self.ignore_exceptions):
            return False
        return self.record_error is None or self.record_error(error)


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One change of state, as handed to transition listeners.

    Attributes:
        name: the breaker's name.
        from_state: the state before.
        to_state: the state after.
        trigger: why it changed.
        failure_rate: the failure rate the trigger evaluated, in [0, 1]; -1.0 when the
            trigger evaluates none (``break_elapsed``, ``half_open_timeout``, ``manual``).
        slow_call_rate: the slow-call rate alongside, -1.0 likewise.
        window_calls: outcomes behind those rates (window or probes).
        error_type: class name of the most recent counted error, when a failure or
            slow-call rate tripped the breaker or a probe failed; otherwise None.
        at: clock time of the transition.
    """

    name: str
    from_state: BreakerState
    to_state: BreakerState
    trigger: TransitionTrigger
    failure_rate: float
    slow_call_rate: float
    window_calls: int
    error_type: str | None
    at: float


@dataclass(frozen=True, slots=True)
class BreakerCall:
    """One call as the breaker saw it, as handed to call listeners (metrics).

    Attributes:
        name: the breaker's name.
        outcome: ``success``, ``failure`` (counted), ``ignored`` (an error that does not
            count) or ``not_permitted`` (rejected, not made).
        state: the breaker's state when the outcome was reported.
        duration: seconds the call took; None when it was not permitted.
        slow: whether it took longer than ``slow_call_duration``.
        error_type: class name of the error, if any.
        at: clock time of the report.
    """

    name: str
    outcome: CallOutcome
    state: BreakerState
    duration: float | None
    slow: bool
    error_type: str | None
    at: float


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a breaker.

    Attributes:
        name: the breaker's name.
        state: its state (time-based transitions applied).
        failure_rate: failure rate over ``window_calls``; -1.0 below ``minimum_calls``
            in the closed window, or before the first probe finishes in half-open.
        slow_call_rate: slow-call rate over the same calls, -1.0 likewise.
        window_calls: outcomes behind the rates: the sliding window in closed (and in
            open, frozen as it tripped), the finished probes in half-open.
        failed_calls: failures among them.
        slow_calls: slow calls among them.
        not_permitted_calls: calls rejected since the breaker was created.
        consecutive_opens: openings since it last closed; drives the open-wait doubling.
        next_probe_at: clock time at which open turns half-open; None in other states.
    """

    name: str
    state: BreakerState
    failure_rate: float
    slow_call_rate: float
    window_calls: int
    failed_calls: int
    slow_calls: int
    not_permitted_calls: int
    consecutive_opens: int
    next_probe_at: float | None


class CallNotPermittedError(CtxdError):
    """A breaker refused a call; the call was not made.

    The guarded work did not fail: leave the message pending and retry after
    ``retry_after`` seconds; never acknowledge or dead-letter it for this reason.

    Attributes:
        breaker: the breaker's name.
        state: its state when it refused.
        next_probe_at: clock time of the next probe, if one is scheduled.
        retry_after: seconds from the refusal to ``next_probe_at``, if scheduled.
    """

    def __init__(
        self,
        message: str,
        *,
        breaker: str,
        state: BreakerState,
        next_probe_at: float | None,
        retry_after: float | None,
    ) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.state = state
        self.next_probe_at = next_probe_at
        self.retry_after = retry_after


class SlidingWindow:
    """Count-based sliding window of (failed, slow) outcomes with running totals.

    The closed state's window of the last ``window_size`` calls, and the half-open
    state's probes; rates are -1.0 until ``minimum`` outcomes are in.
    """

    __slots__ = ("failed", "minimum", "outcomes", "slow")

    def __init__(self, size: int, minimum: int) -> None:
        self.outcomes: deque[tuple[bool, bool]] = deque(maxlen=size)
        self.minimum = minimum
        self.failed = 0
        self.slow = 0

    @property
    def calls(self) -> int:
        """Outcomes in the window."""
        return len(self.outcomes)

    def record(self, *, failed: bool, slow: bool) -> None:
        """Add one outcome, evicting the oldest when full."""
        if len(self.outcomes) == self.outcomes.maxlen:
            old_failed, old_slow = self.outcomes[0]  # the append below evicts it
            self.failed -= old_failed
            self.slow -= old_slow
        self.outcomes.append((failed, slow))
        self.failed += failed
        self.slow += slow

    def rates(self) -> tuple[float, float]:
        """Failure and slow-call rates, or (-1.0, -1.0) below the minimum."""
        calls = len(self.outcomes)
        if calls == 0 or calls < self.minimum:
            return -1.0, -1.0
        return self.failed / calls, self.slow / calls

    def clear(self) -> None:
        """Forget every outcome."""
        self.outcomes.clear()
        self.failed = 0
        self.slow = 0
