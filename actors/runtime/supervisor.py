"""Supervision of anyio tasks in the manner of Erlang/OTP.

A :class:`Supervisor` starts its children in order, each synchronously (the next one
starts only once the previous one has called ``task_status.started()``, like OTP's
``init``), reports itself started once all are up, and then keeps them running:

* **one_for_one**: a child that crashes is restarted on its own, after a backoff; its
  siblings keep running undisturbed.
* **one_for_all**: a crash stops every other child (in reverse start order), and after
  the backoff all of them start again in order. Temporary children stopped this way
  are not restarted; children that had already ended for good stay ended.

A crash is an :class:`Exception` escaping the child. Cancellation is never a crash: it
is re-raised, and it is how a supervisor stops its children. What happens when a child
returns depends on its restart type: ``permanent`` children are restarted (and that
counts towards the intensity), ``transient`` ones only after a crash, ``temporary`` ones
never.

Backoff: ``backoff_initial·backoff_multiplier^n`` capped at ``backoff_max``, spread by
±``jitter`` and capped again, where *n* counts the restarts within the last ``period``
seconds (of that child under one_for_one, of the supervisor under one_for_all), so a
child that crashes rarely always comes back quickly.

Intensity: more than ``intensity`` restarts within a sliding ``period`` (per supervisor,
injected clock) make the supervisor stop all children and raise
:class:`SupervisorEscalation` from :meth:`Supervisor.run`. A supervisor nested in
another (:meth:`Supervisor.as_child`) thereby crashes as its parent's child, and the
parent applies its own policy; at the root, the daemon exits non-zero.

Shutdown: anyio has one stop signal, cancellation, so stopping a child cancels the
child's own cancel scope at once. ``ChildSpec.shutdown`` is the time the supervisor then
waits for the child to finish its cleanup (``finally`` blocks, shielded final acks)
before it moves on to stop the next child; children run in shielded scopes so that a
supervisor being cancelled stops them one by one, in reverse start order, each within
its budget, instead of all at once. Nothing can interrupt a shielded scope, so a child's
own shielded cleanup must carry a time limit below its ``shutdown``; a child that
overruns is left to finish (the task group still waits for it) while the others are
stopped. Nested supervisors get ``shutdown=inf`` by default (OTP's ``infinity``): they
bound their own children.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.runtime.backoff import jittered_backoff
from graph.errors import ConfigError, CtxdError

__all__ = [
    "ChildSpec",
    "ChildStatistics",
    "RestartEvent",
    "RestartType",
    "Strategy",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorEscalation",
    "SupervisorStatistics",
    "crash_unwrapped",
]

RestartType = Literal["permanent", "transient", "temporary"]
"""When a child that ended is started again: always, after a crash only, never."""

Strategy = Literal["one_for_one", "one_for_all"]
"""Which children a crash restarts: the crashed one, or all of them."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to start and keep one child.

    Attributes:
        name: unique among the supervisor's children; used in events and errors.
        start: async callable that calls ``task_status.started()`` once it is ready,
            then runs until it is done (or cancelled).
        restart: ``permanent``, ``transient`` or ``temporary`` (see :data:`RestartType`).
        shutdown: seconds the supervisor waits for the child to finish once cancelled.
    """

    name: str
    start: Callable[[TaskStatus[None]], Awaitable[None]]
    restart: RestartType = "permanent"
    shutdown: float = 5.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a child needs a non-empty name")
        if self.restart not in ("permanent", "transient", "temporary"):
            raise ConfigError(
                f"child {self.name!r}: restart must be permanent, transient or temporary,"
                f" got {self.restart!r}"
            )
        if not self.shutdown >= 0.0:
            raise ConfigError(
                f"child {self.name!r}: shutdown must be >= 0 seconds, got {self.shutdown!r}"
            )


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """Restart policy of one supervisor; the defaults are ctxd's reference defaults.

    Attributes:
        strategy: ``one_for_one`` or ``one_for_all``.
        intensity: restarts allowed within ``period``; one more escalates.
        period: seconds of the sliding window the intensity is counted over.
        backoff_initial: seconds before the first restart.
        backoff_max: cap on the backoff, jitter included.
        backoff_multiplier: factor per further restart within the period.
        jitter: relative spread of each backoff, in [0, 1).
    """

    strategy: Strategy = "one_for_one"
    intensity: int = 5
    period: float = 30.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.strategy not in ("one_for_one", "one_for_all"):
            problems.append(f"strategy must be one_for_one or one_for_all, got {self.strategy!r}")
        if self.intensity < 0:
            problems.append(f"intensity must be >= 0, got {self.intensity}")
        if not 0.0 < self.period < math.inf:
            problems.append(f"period must be a positive number of seconds, got {self.period!r}")
        if not 0.0 <= self.backoff_initial <= self.backoff_max < math.inf:
            problems.append(
                "need 0 <= backoff_initial <= backoff_max < inf, got"
                f" {self.backoff_initial!r} and {self.backoff_max!r}"
            )
        if not self.backoff_multiplier >= 1.0:
            problems.append(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier!r}")
        if not 0.0 <= self.jitter < 1.0:
            problems.append(f"jitter must be in [0, 1), got {self.jitter!r}")
        if problems:
            raise ConfigError("invalid supervisor config: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class RestartEvent:
    """A restart the supervisor decided on, as handed to ``on_restart``.

    Attributes:
        supervisor: the supervisor's name.
        child: the child that ended.
        error_type: class name of its error; None when it returned normally.
        restart_count: restarts of that child in this run, this one included.
        backoff: seconds before it (one_for_all: all children) starts again.
    """

    supervisor: str
    child: str
    error_type: str | None
    restart_count: int
    backoff: float


@dataclass(frozen=True, slots=True)
class ChildStatistics:
    """One child in a :class:`SupervisorStatistics` snapshot.

    Attributes:
        name: the child's name.
        running: started and not yet ended.
        restarts: times it was restarted in the current (or last) run.
        last_error_type: class name of the last error it ended with (also while being
            stopped), if any.
    """

    name: str
    running: bool
    restarts: int
    last_error_type: str | None


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    """A snapshot of a supervisor.

    Attributes:
        name: the supervisor's name.
        strategy: its restart strategy.
        children: one record per child, in start order.
    """

    name: str
    strategy: Strategy
    children: tuple[ChildStatistics, ...]

    @property
    def running(self) -> tuple[str, ...]:
        """Names of the children running now, in start order."""
        return tuple(child.name for child in self.children if child.running)

    @property
    def restarts(self) -> dict[str, int]:
        """Restart count per child name."""
        return {child.name: child.restarts for child in self.children}


class SupervisorEscalation(CtxdError):
    """A supervisor exceeded its restart intensity, stopped its children and gave up.

    The error that ended the last child is the ``__cause__``.

    Attributes:
        supervisor: the supervisor's name.
        child: the child whose exit went over the limit.
    """

    def __init__(self, supervisor: str, child: str, message: str) -> None:
        super().__init__(message)
        self.supervisor = supervisor
        self.child = child


class _Incarnation:
    """One start of a child, from launch to its end."""

    __slots__ = ("done", "error", "scope", "settled", "started", "stopping")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope(shield=True)  # only the supervisor cancels it
        self.started = False
        self.settled = anyio.Event()  # started, or ended before it started
        self.done = anyio.Event()
        self.stopping = False
        self.error: Exception | None = None

    @property
    def running(self) -> bool:
        return self.started and not self.done.is_set()


class _ChildStatus(TaskStatus[None]):
    """The ``task_status`` a child gets: ``started()`` lets the supervisor go on."""

    def __init__(self, incarnation: _Incarnation) -> None:
        self._incarnation = incarnation

    def started(self, value: None = None) -> None:
        incarnation = self._incarnation
        if incarnation.started:
            raise RuntimeError("task_status.started() was already called for this child")
        incarnation.started = True
        incarnation.settled.set()


class _Child:
    """The supervisor's bookkeeping for one child spec."""

    __slots__ = ("current", "last_error_type", "restart_times", "restarts", "retired", "spec")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.current: _Incarnation | None = None
        self.restarts = 0
        self.restart_times: deque[float] = deque()
        self.retired = False  # ended and not to be started again in this run
        self.last_error_type: str | None = None


@dataclass(frozen=True, slots=True)
class _Exit:
    child: _Child
    incarnation: _Incarnation


class Supervisor:
    """Starts children, restarts them by policy, escalates beyond its intensity.

    Args:
        name: the supervisor's name in events and errors (and as a child of another).
        children: child specs, or supervisors (nested with :meth:`as_child` defaults),
            in start order.
        config: restart policy; the reference defaults if None.
        clock: monotonic clock for the intensity window (inject a fake one in tests).
        sleep: awaited with each backoff (inject a fake one in tests).
        rng: source of jitter (seed one in tests).
        on_restart: called synchronously with each restart decided; must not raise.
    """

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec | Supervisor],
        config: SupervisorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
        on_restart: Callable[[RestartEvent], None] | None = None,
    ) -> None:
        specs = [c.as_child() if isinstance(c, Supervisor) else c for c in children]
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"supervisor {name!r}: child names must be unique, {duplicates} appear twice"
            )
        self._name = name
        self._config = config if config is not None else SupervisorConfig()
        self._children = [_Child(spec) for spec in specs]
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._on_restart = on_restart
        self._restart_times: deque[float] = deque()
        self._active = False
        self._closing = False
        self._tg: TaskGroup | None = None
        self._exits: MemoryObjectSendStream[_Exit | SupervisorEscalation] | None = None

    @property
    def name(self) -> str:
        """The supervisor's name."""
        return self._name

    def as_child(
        self, *, restart: RestartType = "permanent", shutdown: float = math.inf
    ) -> ChildSpec:
        """This supervisor as a child of another one.

        Its :class:`SupervisorEscalation` is then that child's crash.

        Args:
            restart: its restart type in the parent.
            shutdown: seconds the parent waits for it to stop its own children.
        """

        async def start(task_status: TaskStatus[None]) -> None:
            await self.run(task_status=task_status)

        return ChildSpec(self._name, start, restart, shutdown)

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the children: running or not, and restart counts."""
        return SupervisorStatistics(
            name=self._name,
            strategy=self._config.strategy,
            children=tuple(
                ChildStatistics(
                    name=child.spec.name,
                    running=child.current is not None and child.current.running,
                    restarts=child.restarts,
                    last_error_type=child.last_error_type,
                )
                for child in self._children
            ),
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, then supervise them until cancelled.

        Args:
            task_status: told ``started()`` once every child has started.

        Raises:
            SupervisorEscalation: the restart intensity was exceeded; every child has
                been stopped.
            RuntimeError: the supervisor is already running.
        """
        if self._active:
            raise RuntimeError(f"supervisor {self._name!r} is already running")
        self._active = True
        self._closing = False
        self._restart_times.clear()
        for child in self._children:
            child.current, child.restarts, child.retired = None, 0, False
            child.last_error_type = None
            child.restart_times.clear()
        send, receive = anyio.create_memory_object_stream[_Exit | SupervisorEscalation](math.inf)
        escalation: SupervisorEscalation | None = None
        try:
            with send, receive:
                async with anyio.create_task_group() as tg:
                    self._tg, self._exits = tg, send
                    try:
                        await self._supervise(receive, task_status)
                    except SupervisorEscalation as exc:
                        escalation = exc
                    finally:
                        self._closing = True
                        with anyio.CancelScope(shield=True):
                            await self._stop(reversed(self._children))
                        tg.cancel_scope.cancel()  # pending restarts
        finally:
            self._active = False
            self._tg = self._exits = None
        if escalation is not None:
            raise escalation

    # -- internals ----------------------------------------------------------------------

    async def _supervise(
        self,
        exits: MemoryObjectReceiveStream[_Exit | SupervisorEscalation],
        task_status: TaskStatus[None],
    ) -> None:
        for child in self._children:
            await self._bring_up(child)
        task_status.started()
        async for item in exits:
            if isinstance(item, SupervisorEscalation):
                raise item
            await self._handle_exit(item)

    async def _bring_up(self, child: _Child) -> None:
        """Start ``child`` and wait until it is up, retrying early exits by policy."""
        while not self._closing:
            incarnation = self._launch(child)
            await incarnation.settled.wait()
            if incarnation.started or self._closing:
                return
            # Ended before it was up: the same rules as for any other end.
            backoff = self._decide(child, incarnation.error)
            if backoff is None:
                return
            await self._sleep(backoff)

    def _launch(self, child: _Child) -> _Incarnation:
        assert self._tg is not None
        incarnation = _Incarnation()
        child.current = incarnation
        self._tg.start_soon(
            self._run_child, child, incarnation, name=f"{self._name}/{child.spec.name}"
        )
        return incarnation

    async def _run_child(self, child: _Child, incarnation: _Incarnation) -> None:
        try:
            with incarnation.scope:
                try:
                    await child.spec.start(_ChildStatus(incarnation))
                except Exception as error:  # noqa: BLE001 - a crash is what we supervise
                    incarnation.error = error
                    child.last_error_type = type(error).__name__
        finally:
            incarnation.done.set()
            incarnation.settled.set()
        if incarnation.started and not incarnation.stopping:
            assert self._exits is not None
            self._exits.send_nowait(_Exit(child, incarnation))

    async def _handle_exit(self, ended: _Exit) -> None:
        child = ended.child
        if ended.incarnation is not child.current:
            return  # a sibling's end already restarted it (one_for_all)
        backoff = self._decide(child, ended.incarnation.error)
        if backoff is None:
            return
        if self._config.strategy == "one_for_one":
            assert self._tg is not None
            self._tg.start_soon(self._restart_after, child, backoff)
            return
        restarting = []
        for sibling in self._children:
            if sibling is not child and sibling.spec.restart == "temporary" and not sibling.retired:
                sibling.retired = True
            if not sibling.retired:
                restarting.append(sibling)
        await self._stop(reversed(self._children))
        await self._sleep(backoff)
        for sibling in restarting:
            if sibling is not child:
                sibling.restarts += 1
            await self._bring_up(sibling)

    async def _restart_after(self, child: _Child, backoff: float) -> None:
        await self._sleep(backoff)
        try:
            await self._bring_up(child)
        except SupervisorEscalation as escalation:
            assert self._exits is not None
            self._exits.send_nowait(escalation)

    def _decide(self, child: _Child, error: Exception | None) -> float | None:
        """Restart backoff for ``child``'s end, or None if it stays down.

        Raises:
            SupervisorEscalation: this restart would exceed the intensity.
        """
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and error is None):
            child.retired = True
            return None
        cfg = self._config
        now = self._clock()
        horizon = now - cfg.period
        for times in (self._restart_times, child.restart_times):
            while times and times[0] <= horizon:
                times.popleft()
        if len(self._restart_times) >= cfg.intensity:
            raise self._escalation(child, error)
        recent = self._restart_times if cfg.strategy == "one_for_all" else child.restart_times
        backoff = jittered_backoff(
            cfg.backoff_initial,
            cfg.backoff_multiplier,
            len(recent),
            cfg.backoff_max,
            cfg.jitter,
            self._rng,
        )
        self._restart_times.append(now)
        child.restart_times.append(now)
        child.restarts += 1
        if self._on_restart is not None:
            error_type = None if error is None else type(error).__name__
            self._on_restart(
                RestartEvent(self._name, child.spec.name, error_type, child.restarts, backoff)
            )
        return backoff

    def _escalation(self, child: _Child, error: Exception | None) -> SupervisorEscalation:
        cfg = self._config
        how = "returned" if error is None else f"failed with {type(error).__name__}: {error}"
        escalation = SupervisorEscalation(
            self._name,
            child.spec.name,
            f"supervisor {self._name!r} gave up: child {child.spec.name!r} {how}, which would"
            f" be more than {cfg.intensity} restarts within {cfg.period:g} s; all its children"
            " are stopped and the parent supervisor decides what happens next (at the root,"
            " ctxd exits non-zero). Fix the cause, or raise intensity/period if such bursts"
            " are expected",
        )
        escalation.__cause__ = error
        escalation.__suppress_context__ = True
        return escalation

    async def _stop(self, children: Iterable[_Child]) -> None:
        """Cancel each running child in turn and wait up to its shutdown budget."""
        for child in children:
            incarnation = child.current
            if incarnation is None or incarnation.done.is_set():
                continue
            incarnation.stopping = True
            incarnation.scope.cancel()
            with anyio.move_on_after(child.spec.shutdown):
                await incarnation.done.wait()


@contextlib.contextmanager
def crash_unwrapped() -> Iterator[None]:
    """Let a child's task group crash as its first error, not as an ExceptionGroup.

    A child that runs tasks of its own (readers, drains) would otherwise always crash
    with ``ExceptionGroup``, and its restarts would be logged and counted under that
    name instead of the error that happened; the group stays the error's context.
    """
    try:
        yield
    except ExceptionGroup as group:
        first: Exception = group
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise first  # noqa: B904 - the group is kept as __context__
