"""Measure ask throughput and round-trip latency over real Redis streams.

    .venv/bin/python tests/actors/bench_asks.py [asks] [concurrency]

Uses CTXD_REDIS_URL if set, else starts the embedded Redis in a temporary directory.
One process asks and serves (all four kinds, default worker counts), as `ctxd run` does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import anyio
from redis.asyncio import Redis

from actors.config import load_settings
from actors.redis_server import open_embedded_redis
from actors.tree import ActorSystem
from graph.work import WorkHandlers, WorkKind

_PAYLOAD = {"window": ["checkout latency rose after the deploy"]}


async def _bench(url: str, asks: int, concurrency: int) -> None:
    settings = replace(
        load_settings({}), redis_url=url, stream_prefix=f"bench{uuid.uuid4().hex[:6]}"
    )
    redis = Redis.from_url(url)
    system = ActorSystem(redis, settings, WorkHandlers())
    dispatch = system.dispatch
    assert dispatch is not None
    async with anyio.create_task_group() as tg:
        await tg.start(system.run)
        for _ in range(200):  # warm up
            await dispatch(WorkKind.UPDATE, _PAYLOAD)
        started = time.perf_counter()
        for _ in range(500):
            await dispatch(WorkKind.UPDATE, _PAYLOAD)
        sequential = (time.perf_counter() - started) / 500
        left = asks

        async def asker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await dispatch(WorkKind.UPDATE, _PAYLOAD)

        started = time.perf_counter()
        async with anyio.create_task_group() as inner:
            for _ in range(concurrency):
                inner.start_soon(asker)
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    for key in await redis.keys(f"{settings.stream_prefix}:*"):
        await redis.delete(key)
    await redis.aclose()
    print(f"sequential round trip: {sequential * 1000:.2f} ms ({1 / sequential:.0f} asks/s)")
    print(f"{asks} asks, {concurrency} concurrent: {asks / elapsed:.0f} asks/s")


def main() -> None:
    """Run the benchmark and print asks/s."""
    asks = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    with contextlib.ExitStack() as stack:
        url = os.environ.get("CTXD_REDIS_URL")
        if not url:
            state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url = stack.enter_context(open_embedded_redis(state)).url
        anyio.run(_bench, url, asks, concurrency)


if __name__ == "__main__":
    main()
