"""Leases with fencing tokens, kept in Redis, and the fence of checkpoint writes.

A lease is a key holding ``"{owner}|{token}"`` with a short TTL. The token comes from a
counter (``INCR`` on the lease's fence key) that only grows, so every new holder gets a
larger token than any holder before it. The holder renews the lease well within its TTL;
if it stops (SIGKILL, network cut, a long pause) the key expires and another process
acquires it with a new token. Every write that must come from the current holder only
checks, inside the same Lua script as the write, that the key still holds its value —
a holder that lost its lease (a "zombie") is fenced off instead of writing
(:mod:`actors.service.gateway`).

The timing (:func:`renew_period`, :data:`ACQUIRE_POLL`) decides how fast a SIGKILLed
instance's partitions move: its leases lapse at most one TTL after its last renewal, and
the survivors, which watch the live set every :data:`ACQUIRE_POLL`, take them then. The
default TTL (1.5 s) with a renewal every TTL/4 (0.375 s) gives fail-over in about 2-3 s
and leaves a renewal about 1.1 s of slack for a stalled event loop (GC, a CPU-starved
host) before its lease lapses; docs/operations.md, "Fail-over and the lease TTL", has the
measurements.

Checkpoint writes cannot be scripted (the saver writes them), so they are fenced by a
check just before each write: a batch runs its graph inside :meth:`CheckpointFence.tenure`
with the partition lease it was read under, and the saver asks
:meth:`CheckpointFence.check` before every write (:func:`fence_checkpoints`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

from langgraph.checkpoint.base import BaseCheckpointSaver
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.redis_io import is_cluster_client, text
from actors.runtime.scripts import call_script
from actors.service.partitions import partition_lease, partition_of
from graph.errors import FencedError

__all__ = [
    "ACQUIRE_POLL",
    "RENEWALS_PER_TTL",
    "CheckpointFence",
    "Leases",
    "fence_checkpoints",
    "fenced_pointer_writer",
    "renew_period",
]

RENEWALS_PER_TTL = 4
"""Renewals per lease TTL: a renewal may come up to ``TTL - TTL/4`` late (a stalled event
loop, a slow Redis) before the lease lapses."""

ACQUIRE_POLL = 0.2
"""Seconds between looks for a lease to take (a lapsed one, or one being handed over):
how long a free lease may wait for its next holder, on top of the TTL."""


def renew_period(ttl: float) -> float:
    """Seconds between renewals of a lease of ``ttl`` seconds (heartbeats beat as often)."""
    return ttl / RENEWALS_PER_TTL


_S = TypeVar("_S", bound=BaseCheckpointSaver[str])


class Leases:
    """Acquire, renew and release leases for one owner.

    Args:
        redis: the client.
        owner: this process's stable name (the instance name).
        ttl: lease time to live in seconds; renew every :func:`renew_period`.
    """

    def __init__(self, redis: Redis, owner: str, ttl: float) -> None:
        self._redis = redis
        self._owner = owner
        self._ttl_ms = max(1, int(ttl * 1000))

    async def acquire(self, key: str, fence_key: str) -> str | None:
        """Take the lease if it is free; return its value (``owner|token``) or None."""
        value = await call_script(
            self._redis,
            scripts.LEASE_ACQUIRE,
            keys=[key, fence_key],
            args=[self._owner, self._ttl_ms],
        )
        if value is None:
            return None
        return text(cast(bytes | str, value))

    async def acquire_many(self, leases: list[tuple[str, str]]) -> list[str | None]:
        """Try to take several free leases in one round trip (a dead instance's whole
        share at once, not one round trip each while the partitions wait); the value of
        each lease taken, None where someone holds it."""
        if not leases:
            return []
        if is_cluster_client(self._redis):  # no scripts in a cluster pipeline (renew_many)
            return [await self.acquire(key, fence_key) for key, fence_key in leases]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, fence_key in leases:
                await call_script(
                    self._redis,
                    scripts.LEASE_ACQUIRE,
                    keys=[key, fence_key],
                    args=[self._owner, self._ttl_ms],
                    client=pipe,
                )
            return [None if x is None else text(cast(bytes | str, x)) for x in await pipe.execute()]

    async def renew(self, key: str, value: str) -> bool:
        """Extend the lease if it still holds ``value``; False means it was lost."""
        return bool(
            await call_script(
                self._redis, scripts.LEASE_RENEW, keys=[key], args=[value, self._ttl_ms]
            )
        )

    async def renew_many(self, leases: list[tuple[str, str]]) -> list[bool]:
        """Renew several leases in one round trip; False where one was lost."""
        if not leases:
            return []
        if is_cluster_client(self._redis):
            # redis-py refuses EVALSHA in a cluster pipeline, and each partition's lease
            # is in its own slot anyway: one script call per lease.
            return [await self.renew(key, value) for key, value in leases]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in leases:
                await call_script(
                    self._redis,
                    scripts.LEASE_RENEW,
                    keys=[key],
                    args=[value, self._ttl_ms],
                    client=pipe,
                )
            return [bool(x) for x in await pipe.execute()]

    async def release(self, key: str, value: str) -> bool:
        """Give the lease up (only if it still holds ``value``)."""
        return bool(await call_script(self._redis, scripts.LEASE_RELEASE, keys=[key], args=[value]))


_TENURE: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "ctxd_tenure", default=None
)
"""The partition lease (key, value) the running graph run was started under. A context
variable because the saver is called deep inside LangGraph, which copies the context
into the tasks it starts, and offers no other way to say which run writes."""


class CheckpointFence:
    """Refuses checkpoint writes of a run whose partition lease tenure is over.

    Args:
        redis: the client.
        settings: the partition count and key prefix (which lease guards a workflow).
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    @staticmethod
    @contextlib.contextmanager
    def tenure(lease: tuple[str, str]) -> Iterator[None]:
        """Checkpoint writes inside this block are fenced by ``lease`` (key, value)."""
        token = _TENURE.set(lease)
        try:
            yield
        finally:
            _TENURE.reset(token)

    @staticmethod
    def current() -> tuple[str, str] | None:
        """The lease (key, value) of the running tenure; None outside any."""
        return _TENURE.get()

    async def check(self, workflow_id: str) -> None:
        """Return if the running tenure's lease is still ours and guards ``workflow_id``.

        Raises:
            FencedError: the lease moved, guards another partition, or the write comes
                from outside any tenure (only a partition owner's runs write state).
        """
        n = partition_of(workflow_id, self._settings.partitions)
        key, _ = partition_lease(self._settings, n)
        tenure = _TENURE.get()
        if tenure is None or tenure[0] != key:
            raise FencedError(
                f"checkpoint write of workflow {workflow_id!r} outside a run of its "
                f"partition {n}: only the partition owner's runs write its state"
            )
        current = await self._redis.get(key)
        if current is None or text(current) != tenure[1]:
            raise FencedError(f"partition {n} of workflow {workflow_id!r} is not ours any more")


def fence_checkpoints(saver: _S, check: Callable[[str], Awaitable[None]]) -> _S:
    """Make ``saver`` call ``check(thread_id)`` before every checkpoint write.

    ``check`` (:meth:`CheckpointFence.check`) raises :class:`~graph.errors.FencedError`
    when this instance no longer owns the workflow, so a zombie (an instance whose lease
    expired) does not write state the new owner builds on. The check and the write are
    two steps (the savers offer no conditional write); the window between them is one
    round trip, and the output commit that follows is fenced atomically, so such a write
    never becomes an output.
    """
    put, put_writes = saver.aput, saver.aput_writes

    async def aput(config: Any, *args: Any, **kwargs: Any) -> Any:
        await check(str(config["configurable"]["thread_id"]))
        return await put(config, *args, **kwargs)

    async def aput_writes(config: Any, *args: Any, **kwargs: Any) -> Any:
        await check(str(config["configurable"]["thread_id"]))
        return await put_writes(config, *args, **kwargs)

    saver.aput = aput  # type: ignore[method-assign]
    saver.aput_writes = aput_writes  # type: ignore[method-assign]
    return saver


def fenced_pointer_writer(
    tenure: Callable[[], tuple[str, str] | None],
) -> Callable[[Redis, str, str], Awaitable[object]]:
    """A checkpoint pointer writer (:data:`graph.checkpointer.PointerWriter`) fenced by
    the lease the current run holds.

    :func:`fence_checkpoints` checks the lease before a write, but a process can pause
    between that check and the write (SIGSTOP, a long GC, a VM freeze) and lose its lease
    meanwhile. The pointer is what makes a checkpoint the workflow's state, so its write
    and the lease check are one script (:data:`~actors.runtime.scripts.FENCED_POINTER`):
    a zombie's checkpoint may land, unreferenced, but never becomes what the next run
    starts from.

    Args:
        tenure: the ``(lease key, lease value)`` the current graph run was started under
            (:meth:`CheckpointFence.current`), or None outside a run (commands, tests),
            whose writes are not fenced.

    The writer raises :class:`~graph.errors.FencedError` when the lease moved.
    """

    async def write(redis: Redis, pointer_key: str, checkpoint_key: str) -> object:
        run = tenure()
        if run is None:
            return await redis.set(pointer_key, checkpoint_key)
        lease_key, lease_value = run
        return await call_script(
            redis,
            scripts.FENCED_POINTER,
            keys=[lease_key, pointer_key],
            args=[lease_value, checkpoint_key],
        )

    return write
