"""Leases with fencing tokens on the real Redis: acquire, renew, expire, release, fencing.

Expiry is Redis's own: a test sets a lease's TTL to zero (where a holder that stopped
renewing ends up) instead of waiting out a real TTL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from actor_support import open_redis
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from redis.asyncio import Redis

from actors.config import Settings
from actors.runtime import scripts
from actors.runtime.scripts import call_script
from actors.service.lease import Leases, fence_checkpoints
from actors.service.partitions import partition_lease
from graph.errors import FencedError

TTL = 10.0


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Redis]:
    async with open_redis(settings) as redis:
        yield redis


@pytest.fixture
def keys(settings: Settings) -> tuple[str, str]:
    return partition_lease(settings, 0)


def token(value: str) -> int:
    owner, _, fence = value.rpartition("|")
    assert owner
    return int(fence)


async def expire_now(redis: Redis, key: str) -> None:
    """Let the lease lapse as if its holder had stopped renewing: a TTL of 0 ends it at once."""
    assert await redis.pexpire(key, 0)
    assert not await redis.exists(key)


async def test_a_free_lease_is_taken_with_owner_and_token_and_held_against_others(
    client: Redis, keys: tuple[str, str]
) -> None:
    a, b = Leases(client, "inst-a", TTL), Leases(client, "inst-b", TTL)
    value = await a.acquire(*keys)
    assert value is not None
    assert value.startswith("inst-a|")
    assert await b.acquire(*keys) is None
    assert await client.get(keys[0]) == value.encode()
    assert 9000 < await client.pttl(keys[0]) <= 10_000


async def test_renewing_extends_the_ttl_only_for_the_holder(
    client: Redis, keys: tuple[str, str]
) -> None:
    leases = Leases(client, "inst-a", TTL)
    value = await leases.acquire(*keys)
    assert value is not None
    await client.pexpire(keys[0], 50)  # most of the TTL has passed
    assert await leases.renew(keys[0], value)
    assert await client.pttl(keys[0]) > 9000
    assert not await leases.renew(keys[0], "inst-a|999999")  # not the value it holds
    assert not await leases.renew("no-such-lease", value)


async def test_an_expired_lease_goes_to_the_next_owner_with_a_larger_token(
    client: Redis, keys: tuple[str, str]
) -> None:
    a, b = Leases(client, "inst-a", TTL), Leases(client, "inst-b", TTL)
    first = await a.acquire(*keys)
    assert first is not None
    await expire_now(client, keys[0])
    second = await b.acquire(*keys)
    assert second is not None
    assert second.startswith("inst-b|")
    assert token(second) > token(first)
    # The zombie learns it lost the lease when it renews, and cannot take it back.
    assert not await a.renew(keys[0], first)
    assert not await a.release(keys[0], first)
    assert await client.get(keys[0]) == second.encode()


async def test_fencing_tokens_only_grow_across_owners_releases_and_expiries(
    client: Redis, keys: tuple[str, str]
) -> None:
    owners = [Leases(client, f"inst-{n}", TTL) for n in range(3)]
    tokens: list[int] = []
    for round_ in range(6):
        leases = owners[round_ % 3]
        value = await leases.acquire(*keys)
        assert value is not None
        tokens.append(token(value))
        if round_ % 2:
            assert await leases.release(keys[0], value)
        else:
            await expire_now(client, keys[0])
    assert tokens == sorted(set(tokens))  # strictly increasing
    assert not await client.exists(keys[0])


async def test_release_gives_the_lease_up_for_the_next_acquirer(
    client: Redis, keys: tuple[str, str]
) -> None:
    a, b = Leases(client, "inst-a", TTL), Leases(client, "inst-b", TTL)
    value = await a.acquire(*keys)
    assert value is not None
    assert await a.release(keys[0], value)
    assert not await a.release(keys[0], value)  # twice: nothing left to release
    assert await b.acquire(*keys) is not None


async def test_renew_many_reports_each_lost_lease(client: Redis, settings: Settings) -> None:
    leases = Leases(client, "inst-a", TTL)
    held = [partition_lease(settings, n) for n in range(3)]
    values = [await leases.acquire(*k) for k in held]
    assert all(v is not None for v in values)
    await expire_now(client, held[1][0])
    pairs = [(k[0], str(v)) for k, v in zip(held, values, strict=True)]
    assert await leases.renew_many(pairs) == [True, False, True]
    assert await leases.renew_many([]) == []


async def test_a_fenced_write_is_refused_once_the_lease_is_lost(
    client: Redis, keys: tuple[str, str], settings: Settings
) -> None:
    """The check runs inside the writing script: a zombie's write never lands."""

    async def write(*, keys: list[str], args: list[str]) -> object:
        return await call_script(client, scripts.FENCED_POINTER, keys=keys, args=args)

    target = settings.key("fenced-target")
    a, b = Leases(client, "inst-a", TTL), Leases(client, "inst-b", TTL)
    old = await a.acquire(*keys)
    assert old is not None
    await write(keys=[keys[0], target], args=[old, "from a"])
    assert await client.get(target) == b"from a"
    await expire_now(client, keys[0])
    new = await b.acquire(*keys)
    assert new is not None
    with pytest.raises(FencedError):
        await write(keys=[keys[0], target], args=[old, "from the zombie"])
    assert await client.get(target) == b"from a"
    await write(keys=[keys[0], target], args=[new, "from b"])
    assert await client.get(target) == b"from b"


async def test_fenced_checkpoints_are_not_written_by_an_instance_that_lost_the_workflow() -> None:
    lost = {"w-lost"}

    async def check(thread_id: str) -> None:
        if thread_id in lost:
            raise FencedError

    saver = fence_checkpoints(InMemorySaver(), check)
    for thread_id in ("w-kept", "w-lost"):
        config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        if thread_id in lost:
            with pytest.raises(FencedError):
                await saver.aput(config, empty_checkpoint(), {}, {})  # type: ignore[arg-type]
            with pytest.raises(FencedError):
                await saver.aput_writes(config, [("x", 1)], "task")  # type: ignore[arg-type]
        else:
            await saver.aput(config, empty_checkpoint(), {}, {})  # type: ignore[arg-type]
    kept = [c.config["configurable"]["thread_id"] async for c in saver.alist(None)]
    assert kept == ["w-kept"]
