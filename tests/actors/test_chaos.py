"""Jepsen-style chaos: two ``ctxd run`` instances, SIGKILLed and restarted at random
moments, plus SIGSTOP pauses that turn an instance into a zombie past its leases.

Every input id and every output/DLQ id is recorded; the checker reports lost,
duplicated and reordered events (and is itself tested on bad histories). The final
state of every workflow must count each of its events exactly once: two instances
advancing one workflow at once would lose or double an update there.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import cast

import pytest
from actor_support import TextEntries, TextRead
from redis import Redis

from actors.config import Settings
from actors.service.partitions import partition_stream
from actors.testing import check_history
from graph.checkpointer import open_checkpointer
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow, thread_config
from tests_support import ServiceProcess, unmoved_input

EVENTS = 2000
WORKFLOWS = 50
KILLS = 10
PAUSES = 2
LEASE_TTL = 1.5


def test_checker_reports_lost_duplicated_and_reordered() -> None:
    """The checker can fail: each kind of bad history is reported, a good one passes."""
    inputs = [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4")]
    assert check_history(inputs, [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4")], []).ok
    assert check_history(inputs, [("a", "1"), ("b", "2"), ("a", "3")], ["4"]).ok
    assert check_history(inputs, [("a", "1"), ("b", "2"), ("a", "4")], []).lost == ["3"]
    dup = check_history(inputs, [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4"), ("a", "3")], [])
    assert dup.duplicated == ["3"]
    assert check_history(inputs, [("a", "1"), ("b", "2"), ("a", "3")], ["3", "4"]).duplicated == [
        "3"
    ]
    swapped = check_history(inputs, [("a", "1"), ("a", "4"), ("b", "2"), ("a", "3")], [])
    assert swapped.reordered == ["3"]
    # Interleaving across workflows is not a reordering.
    assert check_history(inputs, [("b", "2"), ("a", "1"), ("a", "3"), ("a", "4")], []).ok


def _count(redis: Redis, prefix: str) -> int:
    return int(redis.xlen(f"{prefix}:out")) + int(redis.xlen(f"{prefix}:dlq"))


def _wait_for_progress(redis: Redis, prefix: str, target: int, timeout: float) -> int:
    """Block on the output stream (XREAD BLOCK) until ``target`` results exist."""
    deadline = time.monotonic() + timeout
    last = "$"
    while (done := _count(redis, prefix)) < target and time.monotonic() < deadline:
        reply = cast(TextRead, redis.xread({f"{prefix}:out": last}, block=500, count=1000))
        if reply:
            last = reply[0][1][-1][0]
    return done


def _owned(redis: Redis, prefix: str, instance: str) -> int:
    body = redis.get(f"{prefix}:instance:{instance}")
    return len(__import__("json").loads(body)["partitions"]) if body else 0


async def _events_processed(settings: Settings, workflow_ids: Sequence[str]) -> dict[str, int]:
    async with open_checkpointer(
        "redis", namespace=settings.stream_prefix, redis_url=settings.redis_url
    ) as saver:
        graph = build_contextual_workflow(LocalDispatch(), saver)
        counts = {}
        for wf in workflow_ids:
            snapshot = await graph.aget_state(thread_config(wf))
            counts[wf] = int(snapshot.values.get("events_processed") or 0)
        return counts


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sigkill_chaos_keeps_every_guarantee(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
    settings: Settings,
) -> None:
    """2,000 events over 50 workflows; two instances SIGKILLed and restarted >= 10 times
    and SIGSTOPped past their leases: no event lost, none twice, per-workflow order kept,
    every workflow's state counts each of its events once, nothing left pending."""
    rng = random.Random(20261123)
    env = {
        "CTXD_LEASE_TTL": str(LEASE_TTL),
        "CTXD_PARTITIONS": "8",
        "CTXD_BATCH_SIZE": "4",
        "CTXD_CONCURRENCY": "8",
        "CTXD_READ_COUNT": "64",
    }
    instances = [start_service("run", env=env) for _ in range(2)]
    everyone = list(instances)
    for instance in instances:
        instance.wait_ready()
    inputs: list[tuple[str, str]] = []
    with redis.pipeline(transaction=False) as pipe:
        for i in range(EVENTS):
            wf, event_id = f"{prefix}-wf-{i % WORKFLOWS:02d}", f"ev-{i:04d}"
            inputs.append((wf, event_id))
            pipe.xadd(
                f"{prefix}:in",
                {"workflow_id": wf, "event_id": event_id, "content": f"step {i} of {wf} ok"},
            )
        pipe.execute()
    started = time.monotonic()

    kills = pauses = 0
    done = 0
    while (kills < KILLS or pauses < PAUSES) and done < EVENTS - 100:
        done = _wait_for_progress(redis, prefix, done + rng.randint(20, 120), timeout=60)
        slot = rng.randrange(2)
        victim = instances[slot]
        if pauses < PAUSES and kills in (3, 7):
            # A zombie: stopped until the peer owns every partition, then resumed; its
            # leases are gone, so its commits and checkpoint writes must be fenced off.
            peer = instances[1 - slot]
            peer_name = f"{os.uname().nodename}:{peer.proc.pid}"
            os.kill(victim.proc.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while _owned(redis, prefix, peer_name) < 8 and time.monotonic() < deadline:
                redis.xread({f"{prefix}:out": "$"}, block=200)  # wait, not sleep-poll
            os.kill(victim.proc.pid, signal.SIGCONT)
            pauses += 1
            continue
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        kills += 1
        instances[slot] = start_service("run", env=env)
        everyone.append(instances[slot])

    done = _wait_for_progress(redis, prefix, EVENTS, timeout=150)
    elapsed = time.monotonic() - started
    out = cast(TextEntries, redis.xrange(f"{prefix}:out"))
    outputs = [(f["workflow_id"], f["event_id"]) for _, f in out]
    dead = [f.get("event_id", "") for _, f in cast(TextEntries, redis.xrange(f"{prefix}:dlq"))]
    verdict = check_history(inputs, outputs, dead)
    lines = [line for p in everyone for line in p.lines]
    print(
        "acquired", sum("partition acquired" in x for x in lines),
        "lost", sum("lease lost" in x for x in lines),
        "fenced", sum("fenced" in x for x in lines),
        "failed", sum("run failed" in x for x in lines),
    )  # fmt: skip
    print(
        f"chaos: {EVENTS} events, {kills} SIGKILLs, {pauses} SIGSTOP pauses, "
        f"{elapsed:.1f}s, {EVENTS / elapsed:.1f} events/s, dlq={len(dead)}"
    )
    assert kills >= KILLS
    assert pauses == PAUSES
    assert verdict.ok, verdict
    assert len(outputs) + len(dead) == EVENTS
    expected: dict[str, int] = defaultdict(int)
    for wf, _ in outputs:
        expected[wf] += 1
    actual = await _events_processed(settings, sorted(expected))
    assert {wf: (actual[wf], n) for wf, n in expected.items() if actual[wf] != n} == {}
    for n in range(8):
        stream = partition_stream(Settings(stream_prefix=prefix, partitions=8), n)
        assert redis.xpending(stream, "ctxd")["pending"] == 0
    assert unmoved_input(redis, prefix, 8) == 0
