"""Leases with fencing tokens, kept in Redis.

A lease is a key holding ``"{owner}|{token}"`` with a short TTL. The token comes from a
counter (``INCR`` on the lease's fence key) that only grows, so every new holder gets a
larger token than any holder before it. The holder renews the lease well within its TTL;
if it stops (SIGKILL, network cut, a long pause) the key expires and another process
acquires it with a new token. Every write that must come from the current holder only
checks, inside the same Lua script as the write, that the key still holds its value —
a holder that lost its lease (a "zombie") is fenced off instead of writing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from langgraph.checkpoint.base import BaseCheckpointSaver
from redis.asyncio import Redis
from redis.exceptions import ResponseError

__all__ = [
    "LeaseLostError",
    "Leases",
    "fence_check_lua",
    "fence_checkpoints",
    "fenced_pointer_writer",
]

_S = TypeVar("_S", bound=BaseCheckpointSaver[str])

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. '|' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def fence_check_lua(key_index: int, arg_index: int) -> str:
    """Lua that aborts the script (error ``FENCED``) unless the lease still holds our value."""
    return (
        f"if redis.call('GET', KEYS[{key_index}]) ~= ARGV[{arg_index}] then "
        "return redis.error_reply('FENCED the lease was lost to another instance') end\n"
    )


class LeaseLostError(Exception):
    """A fenced write was refused: this process no longer holds the lease."""


class Leases:
    """Acquire, renew and release leases for one owner.

    Args:
        redis: the client.
        owner: this process's stable name (the instance name).
        ttl: lease time to live in seconds; renew at a third of it.
    """

    def __init__(self, redis: Redis, owner: str, ttl: float) -> None:
        self._redis = redis
        self._owner = owner
        self._ttl_ms = max(1, int(ttl * 1000))
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, key: str, fence_key: str) -> str | None:
        """Take the lease if it is free; return its value (``owner|token``) or None."""
        value = await self._acquire(keys=[key, fence_key], args=[self._owner, self._ttl_ms])
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def renew(self, key: str, value: str) -> bool:
        """Extend the lease if it still holds ``value``; False means it was lost."""
        return bool(await self._renew(keys=[key], args=[value, self._ttl_ms]))

    async def renew_many(self, leases: list[tuple[str, str]]) -> list[bool]:
        """Renew several leases in one round trip; False where one was lost."""
        if not leases:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in leases:
                await self._renew(keys=[key], args=[value, self._ttl_ms], client=pipe)
            return [bool(x) for x in await pipe.execute()]

    async def release(self, key: str, value: str) -> bool:
        """Give the lease up (only if it still holds ``value``)."""
        return bool(await self._release(keys=[key], args=[value]))


def fence_checkpoints(saver: _S, check: Callable[[str], Awaitable[None]]) -> _S:
    """Make ``saver`` call ``check(thread_id)`` before every checkpoint write.

    ``check`` raises :class:`LeaseLostError` when this instance no longer owns the
    workflow, so a zombie (an instance whose lease expired) does not write state the new
    owner builds on. The check and the write are two steps (the savers offer no
    conditional write); the window between them is one round trip, and the output
    commit that follows is fenced atomically, so such a write never becomes an output.
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


_FENCED_POINTER = fence_check_lua(1, 1) + "return redis.call('SET', KEYS[2], ARGV[2])\n"
"""KEYS: lease, pointer; ARGV: the run's lease value, the checkpoint key."""


def fenced_pointer_writer(
    tenure: Callable[[], tuple[str, str] | None],
) -> Callable[[Redis, str, str], Awaitable[object]]:
    """A checkpoint pointer writer (:data:`graph.checkpointer.PointerWriter`) fenced by
    the lease the current run holds.

    :func:`fence_checkpoints` checks the lease before a write, but a process can pause
    between that check and the write (SIGSTOP, a long GC, a VM freeze) and lose its lease
    meanwhile. The pointer is what makes a checkpoint the workflow's state, so its write
    and the lease check are one script: a zombie's checkpoint may land, unreferenced, but
    never becomes what the next run starts from.

    Args:
        tenure: the ``(lease key, lease value)`` the current graph run was started under,
            or None outside a run (commands, tests), whose writes are not fenced.
    """
    holder: dict[int, Any] = {}

    async def write(redis: Redis, pointer_key: str, checkpoint_key: str) -> object:
        run = tenure()
        if run is None:
            return await redis.set(pointer_key, checkpoint_key)
        script = holder.get(id(redis))
        if script is None:
            script = holder[id(redis)] = redis.register_script(_FENCED_POINTER)
        lease_key, lease_value = run
        try:
            return await script(keys=[lease_key, pointer_key], args=[lease_value, checkpoint_key])
        except ResponseError as exc:
            if "FENCED" in str(exc):
                raise LeaseLostError(
                    f"checkpoint of {pointer_key!r} refused: lease {lease_key!r} was lost"
                ) from None
            raise

    return write
