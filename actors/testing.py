"""Test helpers for code that runs ctxd or runs beside it, as structlog ships ``structlog.testing``.

* :class:`FakeClock` and :class:`FakeSleep`: a monotonic clock that moves only when the
  test moves it, and a sleep that records its delay and returns at once. ctxd's
  supervisors, breakers and actor systems take ``clock=`` and ``sleep=`` arguments, so a
  test drives backoff, breaker waits and restart windows without waiting for them.
* :func:`read_entries`, :func:`wait_for_output`, :func:`read_dead_letters`: read what a
  running ctxd wrote to ``ctxd:out`` and the DLQ, waiting on ``XREAD BLOCK`` (Redis says
  when an entry arrives) rather than sleeping; :func:`aread_entries` is the async form
  for tests that run ctxd in their own event loop.
* :func:`check_history`: after a run with faults (kills, restarts, outages), check
  ctxd's guarantees Jepsen-style: every input came out once (an output or a dead
  letter), none twice, and each workflow's outputs in input order.

Entries come back decoded, as ``(entry_id, {field: value})`` with text names and values,
whether the client decodes responses or not.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import anyio
import anyio.lowlevel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

__all__ = [
    "FakeClock",
    "FakeSleep",
    "HistoryVerdict",
    "StreamEntry",
    "aread_entries",
    "check_history",
    "read_dead_letters",
    "read_entries",
    "wait_for_output",
]

StreamEntry = tuple[str, dict[str, str]]
"""One stream entry, decoded: its id and its fields."""

_BLOCK_MS = 1000
"""The longest single XREAD BLOCK: short, so a client's socket timeout never fires first."""


class FakeClock:
    """A monotonic clock (a ``() -> float``) that moves only when the test moves it.

    Args:
        now: the reading to start from; far from zero, as a real monotonic clock is,
            so nothing can mistake a reading for "never".

    Attributes:
        now: the current reading in seconds; set it or call :meth:`advance`.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds


class FakeSleep:
    """An ``async (seconds) -> None`` sleep that records each delay and returns at once.

    It still yields to the event loop (one checkpoint), as a real sleep does, so other
    tasks run and a cancellation is seen.

    Args:
        clock: when given, each sleep also advances it by the delay, for code that
            sleeps and then reads the clock; by default the clock and the sleep are
            independent and the test moves the clock itself.

    Attributes:
        delays: every requested delay, in order.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.delays: list[float] = []
        self._clock = clock

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self._clock is not None:
            self._clock.advance(seconds)
        await anyio.lowlevel.checkpoint()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_RawEntries = list[tuple[bytes | str | None, dict[bytes | str, bytes | str] | None]]
"""Entries as redis-py returns them (fields None only for XREADGROUP's deleted ones)."""


def _decoded(raw: _RawEntries | None) -> list[StreamEntry]:
    return [
        (_text(i), {_text(k): _text(v) for k, v in f.items()})
        for i, f in raw or []
        if i is not None and f is not None
    ]


def _replies(reply: object) -> list[_RawEntries]:
    """The entry lists of an XREAD reply: ``[(stream, entries), ...]`` or None."""
    return [cast("_RawEntries", new) for _, new in cast("list[tuple[object, object]]", reply or [])]


def read_entries(
    redis: Redis, stream: str, count: int, *, within: float = 30.0
) -> list[StreamEntry]:
    """Wait until ``stream`` holds at least ``count`` entries, or ``within`` seconds pass.

    Returns every entry of the stream (possibly fewer than ``count`` when the time ran
    out, so the test's assertion shows what did arrive).
    """
    deadline = time.monotonic() + within
    entries = _decoded(redis.xrange(stream))
    last = entries[-1][0] if entries else "0-0"
    while len(entries) < count:
        remaining = int((deadline - time.monotonic()) * 1000)
        if remaining <= 0:
            break
        reply = redis.xread({stream: last}, block=min(remaining, _BLOCK_MS), count=1000)
        for new in _replies(reply):
            entries.extend(_decoded(new))
            last = entries[-1][0]
    return entries


def wait_for_output(
    redis: Redis,
    event_id: str,
    *,
    stream: str = "ctxd:out",
    workflow_id: str | None = None,
    within: float = 30.0,
) -> dict[str, str]:
    """Wait for the ``ctxd:out`` entry of ``event_id`` and return its fields.

    Args:
        redis: a client on ctxd's Redis.
        event_id: the event's ``event_id`` (the ``ctxd:in`` entry id when the producer
            sent none).
        stream: the output stream (``{CTXD_STREAM_PREFIX}:out``).
        workflow_id: when given, only an output of this workflow matches (event ids are
            unique per workflow only).
        within: seconds to wait.

    Raises:
        TimeoutError: no such output arrived in time; the message counts what did.
    """
    deadline = time.monotonic() + within
    last = "0-0"
    seen = 0
    while True:
        # XREAD BLOCK answers at once when entries after ``last`` exist already.
        remaining = int((deadline - time.monotonic()) * 1000)
        reply = redis.xread({stream: last}, block=min(max(remaining, 1), _BLOCK_MS), count=1000)
        for new in _replies(reply):
            for entry_id, fields in _decoded(new):
                last, seen = entry_id, seen + 1
                same_workflow = workflow_id is None or fields.get("workflow_id") == workflow_id
                if fields.get("event_id") == event_id and same_workflow:
                    return fields
        if remaining <= 0:
            raise TimeoutError(
                f"no output for event_id {event_id!r} in {stream} within {within:g}s "
                f"({seen} other outputs seen)"
            )


def read_dead_letters(redis: Redis, stream: str = "ctxd:dlq") -> list[StreamEntry]:
    """Every entry of the DLQ, oldest first, decoded (``reason``, ``error``,
    ``attempts``, ``source_id`` and the entry's own fields, cut to the DLQ bounds)."""
    return _decoded(redis.xrange(stream))


async def aread_entries(
    redis: AsyncRedis, stream: str, count: int, *, within: float = 30.0
) -> list[StreamEntry]:
    """The async form of :func:`read_entries`: the event loop keeps running meanwhile."""
    entries = _decoded(await redis.xrange(stream))
    last = entries[-1][0] if entries else "0-0"
    with anyio.move_on_after(within):
        while len(entries) < count:
            reply = await redis.xread({stream: last}, block=_BLOCK_MS, count=1000)
            for new in _replies(reply):
                entries.extend(_decoded(new))
                last = entries[-1][0]
    return entries


@dataclass(frozen=True)
class HistoryVerdict:
    """What :func:`check_history` found; each list holds event ids.

    Attributes:
        lost: inputs with neither an output nor a dead letter.
        duplicated: events that came out more than once (outputs and dead letters).
        reordered: outputs that came before an earlier input of their workflow.
    """

    lost: list[str]
    duplicated: list[str]
    reordered: list[str]

    @property
    def ok(self) -> bool:
        """True when nothing was lost, duplicated or reordered."""
        return not (self.lost or self.duplicated or self.reordered)


def check_history(
    inputs: Sequence[tuple[str, str]],
    outputs: Sequence[tuple[str, str]],
    dead: Sequence[str],
) -> HistoryVerdict:
    """Check a run's history against ctxd's delivery guarantees.

    Args:
        inputs: ``(workflow_id, event_id)`` in the order they were appended to ``ctxd:in``.
        outputs: ``(workflow_id, event_id)`` in ``ctxd:out`` order.
        dead: the event ids in the DLQ.
    """
    seen: dict[str, int] = defaultdict(int)
    for _, event_id in outputs:
        seen[event_id] += 1
    for event_id in dead:
        seen[event_id] += 1
    position = {event_id: i for i, (_, event_id) in enumerate(inputs)}
    lost = [e for _, e in inputs if seen[e] == 0]
    duplicated = sorted(e for e, count in seen.items() if count > 1)
    reordered: list[str] = []
    last: dict[str, int] = {}
    for workflow_id, event_id in outputs:
        here = position.get(event_id, -1)
        if here < last.get(workflow_id, -1):
            reordered.append(event_id)
        last[workflow_id] = max(here, last.get(workflow_id, -1))
    return HistoryVerdict(lost=lost, duplicated=duplicated, reordered=reordered)
