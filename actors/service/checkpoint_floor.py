"""The fence of checkpoint writes when checkpoints live in a separate store.

With checkpoints in the service Redis, moving a workflow's latest-checkpoint pointer and
checking the run's partition lease are one script
(:func:`actors.service.lease.fenced_pointer_writer`). On a Redis Cluster checkpoints go
to another server (``CTXD_CHECKPOINT_URL``): the lease lives in the service Redis and
the pointer in the checkpoint store, and no script can read both.

The fencing token carries the guarantee across. Every lease value ends with a token
that only grows (``owner|token``, :class:`~actors.service.lease.Leases`). The checkpoint
store keeps, per lease, a *floor*: the highest token that took the lease. A new owner
raises the floor to its token before it reads the partition
(:meth:`CheckpointFloor.raise_to`, called by :class:`~actors.service.ownership.Ownership`
after each acquisition), and the pointer script refuses a write whose token is below
the floor. A zombie (an owner paused past its lease) holds an older token, so once the
new owner has taken the partition its pointer moves are refused, as with the atomic
lease check: its checkpoint may land, unreferenced, but never becomes the state the
new owner reads.

A zombie's write between the new owner's acquisition and its floor raise still lands;
the new owner has read nothing yet then, so it starts from that state as it would from
the zombie's last write before its lease expired.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.scripts import call_script

__all__ = ["CheckpointFloor", "floor_fenced_pointer_writer", "floor_key", "lease_token"]


def floor_key(settings: Settings) -> str:
    """The hash in the checkpoint store: lease key → highest fencing token that took it."""
    return settings.key("fence_floor")


def lease_token(lease_value: str) -> int:
    """The fencing token of a lease value ``owner|token`` (owner names may hold ``|``)."""
    return int(lease_value.rpartition("|")[2])


class CheckpointFloor:
    """Raises fencing-token floors in the checkpoint store.

    Args:
        store: a client of the checkpoint store (not the service Redis).
        settings: the key prefix.
    """

    def __init__(self, store: Redis, settings: Settings) -> None:
        self._store = store
        self._key = floor_key(settings)

    async def raise_to(self, lease_key: str, lease_value: str) -> int:
        """Raise ``lease_key``'s floor to the token of ``lease_value`` (never lower it).

        Call it after taking the lease and before reading anything it guards: from then
        on a pointer write under an older token is refused.

        Returns:
            The floor now: the token, or a higher one a later holder already set (then
            this lease is already lost, which its next renewal finds).
        """
        floor = await call_script(
            self._store,
            scripts.FLOOR_RAISE,
            keys=[self._key],
            args=[lease_key, lease_token(lease_value)],
        )
        return int(str(floor))

    async def floor(self, lease_key: str) -> int:
        """``lease_key``'s floor now (0 if no holder raised it yet)."""
        value = await self._store.hget(self._key, lease_key)
        return 0 if value is None else int(value)


def floor_fenced_pointer_writer(
    tenure: Callable[[], tuple[str, str] | None],
    settings: Settings,
) -> Callable[[Redis, str, str], Awaitable[object]]:
    """A checkpoint pointer writer (:data:`graph.checkpointer.PointerWriter`) for a
    separate checkpoint store, fenced by the floor of the run's lease.

    Args:
        tenure: the ``(lease key, lease value)`` the current graph run was started under
            (:meth:`~actors.service.lease.CheckpointFence.current`), or None outside a
            run (commands, tests), whose writes are not fenced.
        settings: the key prefix (where the floors are).

    The writer raises :class:`~graph.errors.FencedError` when a newer holder took the lease.
    """
    key = floor_key(settings)

    async def write(store: Redis, pointer_key: str, checkpoint_key: str) -> object:
        run = tenure()
        if run is None:
            return await store.set(pointer_key, checkpoint_key)
        lease_key, lease_value = run
        return await call_script(
            store,
            scripts.FLOOR_POINTER,
            keys=[key, pointer_key],
            args=[lease_key, lease_token(lease_value), checkpoint_key],
        )

    return write
