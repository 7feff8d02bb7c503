"""Whether Redis is there: one per-process monitor every loop reports outages to.

Redis goes away in ordinary production life: a restart, a Sentinel or cluster
fail-over (10 to 30 s), a server still loading its AOF, or ``maxmemory`` reached with
``noeviction``. None of that is a failure of ctxd's actors or of an event, so no loop
crashes, no supervisor counts a restart, no breaker counts a failure and no event
counts a delivery attempt. Instead every loop that meets such an error reports it to
the process's :class:`RedisAvailability` and waits until Redis is back; the first
waiter probes (``PING``, or a small write while Redis is out of memory) with
:func:`~actors.runtime.backoff.jittered_backoff`, the others wait on it. One log line when
Redis becomes unavailable (with the cause) and one when it is back (with the outage's
length), however many loops noticed.

Authentication and ACL errors are not outages: redis-py's ``AuthenticationError``
derives from ``ConnectionError``, so it is excluded by name; those stay fatal.

``CTXD_REDIS_MAX_OUTAGE`` (seconds, 0 = wait forever) bounds an outage for operators
who prefer exit-and-restart: :meth:`RedisAvailability.watch` raises
:class:`RedisOutageError` once an outage has lasted that long.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    ExternalAuthProviderError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.runtime.backoff import jittered_backoff
from actors.runtime.redis_io import is_cluster_client
from graph.errors import CtxdError, exception_chain

__all__ = [
    "AvailabilitySettings",
    "OutageKind",
    "OutageStatistics",
    "RedisAvailability",
    "RedisOutageError",
    "RedisUnavailableError",
    "is_out_of_memory",
    "is_outage",
    "is_transient",
    "quiet_library_outage_logs",
]

_log = structlog.get_logger("ctxd.redis")
_T = TypeVar("_T")

OutageKind = Literal["unavailable", "out_of_memory"]
"""Why Redis cannot be used: it does not answer, or it refuses writes (maxmemory)."""

_FATAL = (AuthenticationError, AuthorizationError, ExternalAuthProviderError, NoPermissionError)
_FAILOVER_PREFIXES = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED")
# UNBLOCKED: a blocked read on a master that was just demoted to a replica (a fail-over).
_OOM_TEXT = "OOM command not allowed"
_REDIS_ASYNC_CONNECTION = os.path.join("redis", "asyncio", "connection.py")
_MIN_HEADROOM = 256 * 1024  # bytes below maxmemory before writes are tried again
_MAX_HEADROOM = 64 * 1024 * 1024


class RedisOutageError(CtxdError):
    """Redis stayed away longer than ``CTXD_REDIS_MAX_OUTAGE``; the process exits."""


class RedisUnavailableError(CtxdError):
    """An operation gave up because Redis went away meanwhile (an outage, not a failure).

    Raised, for instance, by an actor ask whose reply could not come back during an
    outage; :func:`is_transient` recognises it, so it is retried, never counted.
    """


def _is_fatal(error: BaseException) -> bool:
    if isinstance(error, _FATAL):
        return True
    if isinstance(error, ResponseError) and str(error).startswith(("NOAUTH", "WRONGPASS")):
        return True
    # TLS refused (certificate not verified, TLS against a plain port): no wait helps.
    # redis-py wraps it in a ConnectionError whose message keeps the SSL reason.
    if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLZeroReturnError):
        return True
    return isinstance(error, RedisConnectionError) and "[SSL" in str(error)


def _closed_connection_race(error: BaseException) -> bool:
    """redis-py's asyncio connection used while it is being closed.

    redis-py 8.1 lets a write on a connection that another task or the peer is closing
    fail with ``AttributeError``/``TypeError`` about ``None`` from inside
    ``redis/asyncio/connection.py`` instead of its ``ConnectionError`` (redis-py issues
    #3546 and #4287). The cluster client meets it after a fail-over, when refreshing
    the topology closes the old nodes' connections under running commands. It is a
    lost connection: classified as one, nothing else with those types is.
    """
    if not isinstance(error, AttributeError | TypeError) or "NoneType" not in str(error):
        return False
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.endswith(_REDIS_ASYNC_CONNECTION):
            return True
        frame = frame.tb_next
    return False


def _transient_one(error: BaseException) -> bool:
    if isinstance(error, RedisUnavailableError) or _closed_connection_race(error):
        return True
    if isinstance(error, ReadOnlyError | TryAgainError | ClusterDownError):
        return True
    if isinstance(error, ResponseError):
        return str(error).startswith(_FAILOVER_PREFIXES)
    # Connection refused/reset, timeouts, BusyLoadingError, MaxConnectionsError: all
    # redis-py ConnectionError/TimeoutError. A bare TimeoutError/OSError is not: an
    # event timeout is the event's own.
    return isinstance(error, RedisConnectionError | RedisTimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means Redis is away for a while.

    Connection refused or reset, timeouts, ``LOADING``, fail-over errors (``READONLY``,
    ``MASTERDOWN``, ``TRYAGAIN``, ``CLUSTERDOWN``, ``UNBLOCKED``), an exhausted
    connection pool, redis-py's asyncio connection closed under a running command.
    Authentication, ACL and TLS verification errors never are, wherever they sit in
    the chain.
    """
    chain = list(exception_chain(exc))
    if any(_is_fatal(error) for error in chain):
        return False
    return any(_transient_one(error) for error in chain)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is Redis refusing a write at ``maxmemory``."""
    return any(
        isinstance(error, OutOfMemoryError)
        or (isinstance(error, RedisError) and _OOM_TEXT in str(error))
        for error in list(exception_chain(exc))
    )


def is_outage(exc: BaseException) -> bool:
    """Transient or out of memory: wait for Redis, do not count a failure."""
    return is_out_of_memory(exc) or is_transient(exc)


class _OutageRecords(logging.Filter):
    """Drops a library's log record whose exception is an outage."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not is_outage(error)


_LIBRARY_LOGGERS = ("redisvl.index.index",)
"""Libraries that log every failed write with a traceback (redisvl: each checkpoint)."""


def quiet_library_outage_logs() -> None:
    """Keep the log to one line per outage: drop the libraries' own tracebacks of the
    errors the monitor already reports (other errors still pass)."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OutageRecords) for f in logger.filters):
            logger.addFilter(_OutageRecords())


@dataclass(frozen=True, slots=True)
class OutageStatistics:
    """What the heartbeat publishes about Redis outages (``ctxd status`` prints it).

    Attributes:
        available: Redis answers (and accepts writes) now.
        outages: outages since this process started (the current one included).
        kind: the current or last outage's kind, if any.
        cause: the error that began the current or last outage (bounded).
        last_started: epoch seconds when the current or last outage began.
        last_seconds: how long the last finished outage lasted.
    """

    available: bool
    outages: int
    kind: OutageKind | None
    cause: str
    last_started: float | None
    last_seconds: float | None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for the heartbeat."""
        return {
            "available": self.available,
            "outages": self.outages,
            "kind": self.kind,
            "cause": self.cause,
            "last_started": self.last_started,
            "last_seconds": None if self.last_seconds is None else round(self.last_seconds, 3),
        }


class AvailabilitySettings(Protocol):
    """What :meth:`RedisAvailability.for_settings` reads (``actors.config.Settings`` has it)."""

    @property
    def redis_max_outage(self) -> float:
        """Seconds an outage may last before the process gives up; 0 = forever."""
        ...

    def key(self, *parts: str) -> str:
        """A key under the deployment's prefix."""
        ...


class RedisAvailability:
    """The process's view of Redis: available, or in an outage being waited out.

    Args:
        redis: the client to probe with (the one the loops use).
        probe_key: a key of ctxd's own to probe writes with while out of memory.
        max_outage: seconds an outage may last before :meth:`watch` raises; 0 = forever.
        clock: monotonic clock (inject one in tests).
        rng: jitter source (seed one in tests).
        backoff_base: first wait between probes, in seconds.
        backoff_cap: longest wait between probes.
        also: other servers the process cannot work without (a separate checkpoint
            store): an outage reported from any of them pauses reading like one of
            ``redis``, and it is over only when every one answers the probe.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        probe_key: str,
        max_outage: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        backoff_base: float = 0.1,
        backoff_cap: float = 2.0,
        also: Sequence[Redis] = (),
    ) -> None:
        self._servers = (redis, *also)
        self._probe_key = probe_key
        self._max_outage = max_outage
        self._clock = clock
        self._rng = rng or random.Random()
        self._base = backoff_base
        self._cap = backoff_cap
        self._lock = anyio.Lock()
        self._available = True
        self._kind: OutageKind | None = None
        self._cause = ""
        self._started_at = 0.0  # monotonic start of the current outage
        self._started_wall: float | None = None
        self._last_seconds: float | None = None
        self._outages = 0
        self._back = anyio.Event()
        self._back.set()
        self._down = anyio.Event()

    @classmethod
    def for_settings(
        cls, redis: Redis, settings: AvailabilitySettings, *, also: Sequence[Redis] = ()
    ) -> RedisAvailability:
        """The monitor of ``settings`` (probe key under the prefix, the max outage)."""
        return cls(
            redis,
            probe_key=settings.key("probe"),
            max_outage=settings.redis_max_outage,
            also=also,
        )

    def probe_with(self, redis: Redis) -> None:
        """Probe with ``redis`` from now on: start-up waits for Redis with a plain client
        and, when the server turns out to be a cluster node, goes on with the cluster
        client (the outages counted so far stay counted)."""
        self._servers = (redis, *self._servers[1:])

    def watch_also(self, redis: Redis) -> None:
        """Count ``redis`` among the servers the process cannot work without (a separate
        checkpoint store found once the service Redis answered)."""
        self._servers = (*self._servers, redis)

    @property
    def available(self) -> bool:
        """True unless an outage is being waited out."""
        return self._available

    @property
    def generation(self) -> int:
        """Outages begun so far; compare with :meth:`disturbed_since`."""
        return self._outages

    def disturbed_since(self, generation: int) -> bool:
        """Whether an outage began after ``generation`` was read, or one is on now."""
        return not self._available or self._outages != generation

    def statistics(self) -> OutageStatistics:
        """A snapshot, for the heartbeat and ``ctxd status``."""
        return OutageStatistics(
            available=self._available,
            outages=self._outages,
            kind=self._kind,
            cause=self._cause,
            last_started=self._started_wall,
            last_seconds=self._last_seconds,
        )

    def report(self, exc: BaseException) -> None:
        """Tell the monitor an operation met ``exc`` (an outage; see :func:`is_outage`).

        The first report of an outage logs it; later ones (other loops, retries) do not.
        """
        if not self._available:
            return
        observed = [
            e for e in list(exception_chain(exc)) if isinstance(e, RedisError) and is_outage(e)
        ]
        if not observed:
            return  # derived (RedisUnavailableError after an outage already over): no news
        exc = observed[0]
        oom = is_out_of_memory(exc)
        self._available = False
        self._outages += 1
        self._kind = "out_of_memory" if oom else "unavailable"
        self._cause = f"{type(exc).__name__}: {exc}"[:300]
        self._started_at = self._clock()
        self._started_wall = time.time()
        self._back = anyio.Event()
        self._down.set()
        self._down = anyio.Event()
        if oom:
            _log.error(
                "Redis is out of memory (maxmemory reached with a noeviction policy): "
                "reading is paused and resumes by itself once writes succeed; raise "
                "maxmemory, free memory or trim streams",
                cause=self._cause,
            )
        else:
            _log.warning(
                "Redis unavailable; reading paused, waiting for it to come back",
                cause=self._cause,
                max_outage=self._max_outage or "forever",
            )

    async def wait_available(self) -> None:
        """Return once Redis is available; the first waiter probes, the others wait."""
        while not self._available:
            async with self._lock:
                if self._available:
                    return
                await self._probe_until_back()

    async def wait_available_or(self, stop: anyio.Event) -> None:
        """Like :meth:`wait_available`, but return early once ``stop`` is set (a stop
        signal during an outage)."""
        if self._available or stop.is_set():
            return
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                await self.wait_available()
                tg.cancel_scope.cancel()

            tg.start_soon(wait)
            await stop.wait()
            tg.cancel_scope.cancel()

    async def wait_unavailable(self) -> None:
        """Return once an outage is on (at once if one is); for watchers and tests."""
        while self._available:
            await self._down.wait()

    async def call(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``operation()``, waiting out outages and trying again after each."""
        while True:
            await self.wait_available()
            try:
                return await operation()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.report(exc)

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Raise :class:`RedisOutageError` once an outage outlasts the maximum.

        Runs until cancelled; with no maximum it only waits.
        """
        task_status.started()
        while True:
            if self._available or not self._max_outage:
                await self._down.wait()
                continue
            remaining = self._started_at + self._max_outage - self._clock()
            if remaining <= 0:
                raise self._too_long()
            with anyio.move_on_after(remaining):
                await self._back.wait()

    def _too_long(self) -> RedisOutageError:
        return RedisOutageError(
            f"Redis has been unavailable for more than CTXD_REDIS_MAX_OUTAGE="
            f"{self._max_outage:g} s (cause: {self._cause}); exiting so the service manager "
            "restarts ctxd; set CTXD_REDIS_MAX_OUTAGE=0 to wait for Redis instead"
        )

    async def _probe_until_back(self) -> None:
        attempt = 0
        while True:
            await anyio.sleep(jittered_backoff(self._base, 2.0, attempt, self._cap, 0.2, self._rng))
            attempt += 1
            try:
                await self._probe()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if is_out_of_memory(exc):
                    self._kind = "out_of_memory"
                continue
            self._mark_back()
            return

    async def _probe(self) -> None:
        for server in self._servers:
            if self._kind != "out_of_memory":
                if is_cluster_client(server):
                    # Back only when every shard answers: one node's PONG says nothing of
                    # the shard whose master just died (its replica is not promoted yet).
                    await server.ping(target_nodes=RedisCluster.PRIMARIES)
                else:
                    await server.ping()
                continue
            # Back only with some headroom below maxmemory: right at the limit, a small
            # write succeeds and the next one fails, and the state would flap.
            memory = await server.info("memory")
            limit, used = int(memory.get("maxmemory") or 0), int(memory.get("used_memory") or 0)
            if limit and used > limit - min(max(limit // 50, _MIN_HEADROOM), _MAX_HEADROOM):
                raise OutOfMemoryError(f"used memory {used} is still near maxmemory {limit}")
            await server.set(self._probe_key, b"1", px=10_000)  # refused at maxmemory

    def _mark_back(self) -> None:
        seconds = self._clock() - self._started_at
        self._last_seconds = seconds
        self._available = True
        self._back.set()
        _log.warning(
            "Redis available again; reading resumes",
            outage_seconds=round(seconds, 3),
            kind=self._kind,
            outages=self._outages,
        )
