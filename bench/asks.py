"""``python -m bench.asks``: what one actor ask and one LangGraph super-step cost here.

The two fixed costs under every event (docs/performance.md, "The floor"): each node
visit is a LangGraph super-step, and each node's work is an ask over Redis streams
(``XADD`` to the mailbox, a worker's ``XREADGROUP`` and reply script, the reply
reader's ``XREAD``). This measures both in one process on the embedded Redis Stack (or
``--redis-url``):

* **ask**: CPU microseconds per :class:`~actors.service.dispatch.ActorDispatch` call of the
  decision kind (the cheapest handler, measured alone too) and asks per wall-clock
  second, with 1 asker (an event arriving alone: its round trip), 16 (a drain at the
  default ``CTXD_CONCURRENCY``) and 64 concurrent askers, through a real
  :class:`~actors.service.tree.ActorSystem` in this process, as ``ctxd run`` has it;
* **super-step**: CPU microseconds per super-step of a two-node LangGraph loop with
  trivial nodes and no checkpointer.

CPU time is this process's (``time.process_time``): Redis's own work is not included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TypedDict

import anyio
from langgraph.graph import END, START, StateGraph
from redis.asyncio import Redis

from actors.config import load_settings
from actors.service.tree import ActorSystem
from bench.procs import bench_redis
from graph.state import JSON
from graph.work import WorkHandlers, WorkKind

__all__ = ["main"]

_DECISION: dict[str, JSON] = {
    "context": {
        "quality_score": 0.8,
        "performance_score": 1.0,
        "error_rate": 0.0,
        "resource_utilization": 0.1,
        "business_priority": "standard",
        "execution_deadline": None,
        "cost_constraints": {},
    },
    "iteration_count": 1,
}


async def _asks(redis_url: str, askers: int, count: int) -> tuple[float, float, float]:
    """CPU µs per ask with ``askers`` concurrent askers, per handler call alone, asks/s."""
    env = {**os.environ, "CTXD_REDIS_URL": redis_url, "CTXD_STREAM_PREFIX": _prefix()}
    settings = load_settings(env)
    redis = Redis.from_url(redis_url)
    handlers = WorkHandlers()
    system = ActorSystem(redis, settings, handlers)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(system.run)
            dispatch = system.dispatch
            assert dispatch is not None
            for _ in range(50):  # warm up: connections, scripts, groups
                await dispatch(WorkKind.DECISION, _DECISION)
            per_asker = max(1, count // askers)

            async def asker() -> None:
                for _ in range(per_asker):
                    await dispatch(WorkKind.DECISION, _DECISION)

            started, wall = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(askers):
                    group.start_soon(asker)
            ask_cpu = (time.process_time() - started) / (per_asker * askers)
            rate = per_asker * askers / (time.perf_counter() - wall)
            started = time.process_time()
            for _ in range(per_asker * askers):
                await handlers.handle(WorkKind.DECISION, _DECISION)
            handler_cpu = (time.process_time() - started) / (per_asker * askers)
            tg.cancel_scope.cancel()
    finally:
        await redis.aclose()
    return ask_cpu * 1e6, handler_cpu * 1e6, rate


class _Loop(TypedDict, total=False):
    n: int
    left: int


async def _super_steps(steps_per_run: int, runs: int) -> float:
    """CPU µs per super-step of a trivial two-node loop, no checkpointer."""

    async def count(state: _Loop) -> _Loop:
        return {"n": state.get("n", 0) + 1}

    async def spend(state: _Loop) -> _Loop:
        return {"left": state.get("left", 0) - 1}

    async def route(state: _Loop) -> str:
        return "spend" if state.get("left", 0) > 0 else END

    builder = StateGraph(_Loop)
    builder.add_node("count", count)
    builder.add_node("spend", spend)
    builder.add_edge(START, "count")
    builder.add_conditional_edges("count", route, ["spend", END])
    builder.add_edge("spend", "count")
    loop = builder.compile()
    started = time.process_time()
    for _ in range(runs):
        await loop.ainvoke({"n": 0, "left": steps_per_run // 2}, {"recursion_limit": 10**6})
    return (time.process_time() - started) / (runs * steps_per_run) * 1e6


def _prefix() -> str:
    return f"asks{uuid.uuid4().hex[:8]}"


def main(argv: list[str] | None = None) -> int:
    """Print the per-ask and per-super-step CPU cost."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.asks",
        description="CPU cost of one actor ask over Redis streams and of one LangGraph "
        "super-step, in this process.",
    )
    parser.add_argument("--asks", type=int, default=3000, help="asks per measurement (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is kept (3)")
    parser.add_argument("--redis-url", help="use this Redis, not the embedded one")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="ctxd-asks-") as tmp,
        bench_redis(args.redis_url, Path(tmp)) as url,
    ):
        for askers in (1, 16, 64):
            cpu, handler, rate = min(
                (anyio.run(_asks, url, askers, args.asks) for _ in range(args.rounds)),
                key=lambda figures: figures[0],
            )
            print(
                f"ask, {askers:2d} asker(s): {cpu:5.0f} us CPU per ask (handler alone "
                f"{handler:.0f} us), {rate:5.0f} asks/s ({1000 / rate * askers:.2f} ms each)",
                flush=True,
            )
    step = min(anyio.run(_super_steps, 20, 500) for _ in range(args.rounds))
    print(f"LangGraph super-step (trivial nodes, no checkpointer): {step:6.0f} us CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
