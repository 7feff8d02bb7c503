"""The demo stream behind ``ctxd run --demo`` (and so ``make run``).

A handful of events over three workflows: a support case whose topic shifts, a
critical incident, and a market question that calls for research. The results are
printed as they arrive; the service keeps running afterwards.
"""

from __future__ import annotations

from typing import Any, cast

import anyio
from redis.asyncio import Redis

from actors.config import Settings

__all__ = ["DEMO_EVENTS", "feed_demo"]

DEMO_EVENTS: tuple[dict[str, str], ...] = (
    {
        "workflow_id": "support-42",
        "content": "Customer reports the checkout API latency rose to 900 ms after the "
        "last deploy. Evidence: p99 graphs and three tickets.",
    },
    {
        "workflow_id": "support-42",
        "content": "Further analysis: the database connection pool is exhausted during "
        "peak traffic; therefore requests queue.",
        "priority": "high",
    },
    {
        "workflow_id": "incident-7",
        "content": "Payments are failing for all customers in the EU region.",
        "priority": "critical",
        "deadline": "2020-01-01T00:00:00Z",
    },
    {
        "workflow_id": "market-q3",
        "content": "How does our pricing compare with competitor offerings in the SMB "
        "market segment? Customers mention a rival alternative that is cheaper.",
        "max_cost": "20",
    },
    {
        "workflow_id": "support-42",
        "content": "Unrelated: the office coffee machine order for next quarter needs "
        "approval from facilities.",
    },
)


async def feed_demo(settings: Settings, redis_url: str) -> None:
    """Append the demo events, then print each result as it arrives."""
    from actors.app.cli.events import format_output

    async with Redis.from_url(redis_url, decode_responses=True) as redis:
        last = cast(Any, await redis.xrevrange(settings.output_stream, count=1))
        cursor: str = last[0][0] if last else "0-0"
        sent = set()
        for event in DEMO_EVENTS:
            sent.add(await redis.xadd(settings.input_stream, dict(event)))  # type: ignore[arg-type]
        print(f"demo: sent {len(sent)} events to {settings.input_stream}; results:", flush=True)
        seen = 0
        with anyio.move_on_after(120):
            while seen < len(sent):
                reply = cast(Any, await redis.xread({settings.output_stream: cursor}, block=1000))
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        cursor = entry_id
                        if fields.get("source_id") in sent:
                            seen += 1
                            print(format_output(entry_id, fields), flush=True)
        print(
            f"demo: {seen}/{len(sent)} results. The service keeps running: try "
            "`.venv/bin/ctxd send my-flow 'some text'` and `.venv/bin/ctxd tail -f` "
            "in another terminal; Ctrl-C stops it.",
            flush=True,
        )
