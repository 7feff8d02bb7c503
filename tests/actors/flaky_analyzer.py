"""An analysis plug-in for the process tests, steered through a Redis key.

``{CTXD_STREAM_PREFIX}:test:analyzer`` = ``fail`` makes it raise, ``hang`` makes it
announce itself on ``{prefix}:test:started`` and never return; otherwise it is the
heuristic analyzer.
"""

from __future__ import annotations

import os

import anyio
from redis.asyncio import Redis

from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer

_client: Redis | None = None


async def analyze(request: AnalysisRequest) -> AnalysisResult:
    """The heuristic analyzer, unless the test's key says otherwise."""
    global _client
    if _client is None:
        _client = Redis.from_url(os.environ["CTXD_REDIS_URL"])
    prefix = os.environ["CTXD_STREAM_PREFIX"]
    mode = await _client.get(f"{prefix}:test:analyzer")
    if mode == b"fail":
        raise ConnectionError("analysis backend unreachable (test flag set)")
    if mode == b"hang":
        await _client.xadd(f"{prefix}:test:started", {"pid": str(os.getpid())})
        await anyio.sleep_forever()
    return await heuristic_analyzer(request)
