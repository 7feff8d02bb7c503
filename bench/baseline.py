"""The seed-style pipeline, as a process: ``python -m bench.baseline --redis-url ...``.

What the seed does per event, on ctxd's own contextual workflow so the work is the same:
one XREADGROUP loop; for every entry ``ainvoke`` (thread id = workflow id) with
AsyncRedisSaver and durability ``sync`` (a checkpoint write after every super-step),
then XADD the output and XACK the entry — one event at a time, no batching.
It runs until SIGTERM (the bench reads its CPU and peak RSS before stopping it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import cast

import anyio
from redis.asyncio import Redis

from actors.runtime.redis_io import read_group
from actors.service.streams import ensure_group, output_fields
from actors.service.validation import decode_fields, parse_event
from graph.checkpointer import open_checkpointer
from graph.state import ContextState
from graph.work import LocalDispatch, WorkHandlers
from graph.workflow import build_contextual_workflow, thread_config

__all__ = ["main"]


async def _pipeline(redis_url: str, prefix: str) -> None:
    input_stream, output_stream, group = f"{prefix}:in", f"{prefix}:out", "ctxd"
    redis = Redis.from_url(redis_url)
    try:
        await ensure_group(redis, input_stream, group)
        async with open_checkpointer("redis", namespace=prefix, redis_url=redis_url) as saver:
            graph = build_contextual_workflow(LocalDispatch(WorkHandlers()), saver)
            print("baseline is running", flush=True)
            while True:
                entries = await read_group(
                    redis,
                    group=group,
                    consumer="baseline",
                    stream=input_stream,
                    cursor=">",
                    count=10,
                    block=1000,
                )
                for entry_id, raw in entries:
                    assert raw is not None
                    event = parse_event(entry_id, decode_fields(raw))
                    config = thread_config(event.workflow_id)
                    config["recursion_limit"] = 100
                    run_input = {
                        "workflow_id": event.workflow_id,
                        "inbox": [event.as_state()],
                        "event": None,
                        "base_checkpoint_id": None,
                    }
                    values = await graph.ainvoke(
                        cast(ContextState, run_input), config, durability="sync"
                    )
                    result = values["outbox"][event.event_id]
                    if isinstance(result, str):  # the lean outbox keeps JSON strings
                        result = json.loads(result)
                    fields = output_fields(result, trace_id="", checkpoint_id="")
                    await redis.xadd(output_stream, fields)  # type: ignore[arg-type]
                    await redis.xack(input_stream, group, entry_id)
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    """Run the seed-style pipeline until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    anyio.run(_pipeline, args.redis_url, args.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
