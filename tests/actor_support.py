"""Helpers for the actor tests: an in-process actor system on the real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
from redis.asyncio import Redis

from actors.config import Settings
from actors.service.tree import ActorSystem
from actors.testing import aread_entries

RawEntries = list[tuple[bytes, dict[bytes, bytes]]]
"""XRANGE on a bytes client (redis-py's stubs cannot say which client decodes)."""

RawRead = list[tuple[bytes, RawEntries]]
"""XREAD on a bytes client: per stream, its entries."""

TextEntries = list[tuple[str, dict[str, str]]]
"""XRANGE on a decoding client."""

TextRead = list[tuple[str, TextEntries]]
"""XREAD on a decoding client."""


def actor_settings(settings: Settings, **changes: object) -> Settings:
    """Small, fast settings for actor tests."""
    base: dict[str, object] = {"actor_workers": 2, "ask_timeout": 5.0, "restart_backoff": 0.0}
    base.update(changes)
    return replace(settings, **base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(system: ActorSystem) -> AsyncIterator[ActorSystem]:
    """Run ``system`` for the duration of the block."""
    async with anyio.create_task_group() as tg:
        await tg.start(system.run)
        yield system
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    """An async bytes client on the test Redis."""
    assert settings.redis_url is not None
    client = Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def read_stream(
    redis: Redis, stream: str, count: int, *, within: float = 60.0
) -> list[tuple[str, dict[str, str]]]:
    """Wait until ``stream`` holds ``count`` entries (or ``within`` seconds pass), decoded.

    :func:`actors.testing.aread_entries` (shipped for users) with the suite's default wait.
    """
    return await aread_entries(redis, stream, count, within=within)
