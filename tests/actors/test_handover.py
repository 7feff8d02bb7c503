"""Partitions handed over mid-drain: every event still gets exactly one output."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import cast

from actor_support import TextEntries
from redis import Redis

from tests_support import ServiceProcess, read_outputs

_EVENTS = 1200
_WORKFLOWS = 60


def test_a_second_instance_joining_mid_drain_dead_letters_nothing(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """A backlog arrives in one burst, so the router fills many partition streams in the
    same millisecond and their entries share ids (``ms-0``, ``ms-1``... in each stream).
    The second instance takes half the partitions over and re-reads their pending
    entries with their run counts: a count kept by entry id alone mixed up the entries
    of different partitions and dead-lettered healthy events as poison."""
    env = {"CTXD_MAX_DELIVERIES": "2", "CTXD_LEASE_TTL": "2"}
    first = start_service("run", env={**env, "CTXD_INSTANCE": f"{prefix}-a"})
    first.wait_ready()
    pipe = redis.pipeline(transaction=False)
    for i in range(_EVENTS):
        pipe.xadd(
            f"{prefix}:in",
            {
                "workflow_id": f"wf-{i % _WORKFLOWS:03d}",
                "event_id": f"e{i:05d}",
                "content": f"checkout latency rose after deploy {i}",
            },
        )
    pipe.execute()
    read_outputs(redis, f"{prefix}:out", 100)  # the first instance is well into it
    second = start_service("run", env={**env, "CTXD_INSTANCE": f"{prefix}-b"})
    second.wait_ready()
    outputs = read_outputs(redis, f"{prefix}:out", _EVENTS, timeout_ms=90_000)
    dead = cast(TextEntries, redis.xrange(f"{prefix}:dlq"))
    assert dead == [], f"healthy events dead-lettered: {dead[:3]}"
    counts = Counter(fields["event_id"] for _, fields in outputs)
    assert len(counts) == _EVENTS
    assert max(counts.values()) == 1
    assert first.wait_for_line(lambda line: "partition handed over" in line)
