"""The benchmark's workload: deterministic events over a number of workflows."""

from __future__ import annotations

from collections.abc import Sequence

from redis import Redis

__all__ = ["TEMPLATES", "load", "make_events"]

# Texts in the style of the demo stream: they exercise research fan-out (technical,
# market, competitive), context shifts and plain monitoring.
TEMPLATES: tuple[str, ...] = (
    "Customer reports the checkout API latency rose to 900 ms after the last deploy. "
    "Evidence: p99 graphs and three tickets.",
    "Further analysis: the database connection pool is exhausted during peak traffic; "
    "therefore requests queue.",
    "Payments are failing for all customers in the EU region.",
    "How does our pricing compare with competitor offerings in the SMB market segment? "
    "Customers mention a rival alternative that is cheaper.",
    "Unrelated: the office coffee machine order for next quarter needs approval from facilities.",
    "The cache hit rate dropped after the schema migration; the server logs show retries.",
    "Sales asks for revenue numbers by market segment and the growth forecast.",
    "A status update: the incident is mitigated and monitoring continues.",
)
_PRIORITIES = ("standard", "standard", "high", "low", "critical", "standard")


def make_events(count: int, workflows: int, tag: str) -> list[dict[str, str]]:
    """``count`` input entries spread round-robin over ``workflows`` workflows.

    Workflow and event ids start with ``tag`` (the scenario's prefix): checkpoints are
    keyed by thread id alone, so every scenario needs workflows of its own.

    Event ``i`` belongs to workflow ``i % workflows``; its text cycles through
    :data:`TEMPLATES` with a per-workflow offset so neighbouring workflows differ.
    """
    events: list[dict[str, str]] = []
    for i in range(count):
        flow, nth = i % workflows, i // workflows
        text = TEMPLATES[(nth + flow) % len(TEMPLATES)]
        events.append(
            {
                "workflow_id": f"{tag}-wf-{flow:04d}",
                "content": f"{text} (event {nth} of flow {flow})",
                "event_id": f"{tag}-{i:07d}",
                "priority": _PRIORITIES[(nth + flow) % len(_PRIORITIES)],
            }
        )
    return events


def load(redis: Redis, stream: str, events: Sequence[dict[str, str]], chunk: int = 500) -> None:
    """Append ``events`` to ``stream`` in pipelined chunks (a backlog arrives at once)."""
    for start in range(0, len(events), chunk):
        pipe = redis.pipeline(transaction=False)
        for fields in events[start : start + chunk]:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute()
