"""No single point on the hot path: two ``ctxd run`` instances route ``ctxd:in`` between
them (each its own partitions); one is SIGKILLed while a producer keeps appending to
``ctxd:in``. Output goes on (the survivor's partitions at once, the victim's once their
leases are taken over: both gaps measured and printed), and every event comes out once,
in its workflow's order.

Also a producer appending straight to the partition streams (the producer API and
``ctxd send``), mixed with ``ctxd:in`` traffic, on a running service.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import cast

import pytest
from actor_support import TextEntries, TextRead
from redis import Redis

from actors.producer import Producer, partition_for
from actors.testing import check_history
from tests_support import ServiceProcess, read_outputs, run_ctxd, unmoved_input

PARTITIONS = 8
LEASE_TTL = 1.5
WORKFLOWS = 24
EVENTS = 600
RATE = 60.0  # events per second into ctxd:in


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def _owned(redis: Redis, prefix: str, instance: str) -> list[int]:
    body = redis.get(f"{prefix}:instance:{instance}")
    return list(json.loads(body)["partitions"]) if body else []


def _wait_for_outputs(redis: Redis, prefix: str, count: int, timeout: float) -> int:
    """Block on the output stream (XREAD BLOCK) until ``count`` results exist."""
    deadline = time.monotonic() + timeout
    last = "0-0"
    seen = 0
    while seen < count and time.monotonic() < deadline:
        reply = cast(TextRead, redis.xread({f"{prefix}:out": last}, block=500, count=1000))
        if reply:
            seen += len(reply[0][1])
            last = reply[0][1][-1][0]
    return seen + int(redis.xlen(f"{prefix}:dlq"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_of_one_router_does_not_stop_the_output(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    redis_url: str,
    prefix: str,
) -> None:
    env = {
        "CTXD_PARTITIONS": str(PARTITIONS),
        "CTXD_LEASE_TTL": str(LEASE_TTL),
        "CTXD_TRIM_INTERVAL": "0",  # partition streams kept whole: the move times are read
        # Node work in-process: what is measured is routing and leases, not the reclaim
        # of actor requests a killed instance's pool workers held (2 x the event timeout).
        "CTXD_DISPATCH": "local",
    }
    instances = [start_service("run", env=env) for _ in range(2)]
    for instance in instances:
        instance.wait_ready()
    names = [f"{os.uname().nodename}:{p.proc.pid}" for p in instances]
    deadline = time.monotonic() + 30
    while sorted(_owned(redis, prefix, names[0]) + _owned(redis, prefix, names[1])) != list(
        range(PARTITIONS)
    ):  # both own their share before the test starts
        assert time.monotonic() < deadline, "the two instances never split the partitions"
        redis.xread({f"{prefix}:out": "$"}, block=200)  # a bounded wait, not a busy loop

    inputs = [(f"{prefix}-wf-{i % WORKFLOWS:02d}", f"ev-{i:04d}") for i in range(EVENTS)]

    def produce() -> None:
        with Redis.from_url(redis_url) as client:
            start = time.monotonic()
            for i, (wf, event_id) in enumerate(inputs):
                client.xadd(
                    f"{prefix}:in",
                    {"workflow_id": wf, "event_id": event_id, "content": f"step {i} of {wf}"},
                )
                ahead = start + (i + 1) / RATE - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # the producer's pace, not a wait for the service

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert _wait_for_outputs(redis, prefix, EVENTS // 4, timeout=60) >= EVENTS // 4
    victim, survivor = instances
    victims_partitions = set(_owned(redis, prefix, names[0]))
    assert victims_partitions
    killed_at = time.time()
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    producer.join(timeout=EVENTS / RATE + 30)
    done = _wait_for_outputs(redis, prefix, EVENTS, timeout=120)

    out = cast(TextEntries, redis.xrange(f"{prefix}:out"))
    dead = [f.get("event_id", "") for _, f in cast(TextEntries, redis.xrange(f"{prefix}:dlq"))]
    verdict = check_history(inputs, [(f["workflow_id"], f["event_id"]) for _, f in out], dead)
    after = [(entry_id, f) for entry_id, f in out if _ms(entry_id) >= killed_at * 1000]
    first_any = _ms(after[0][0]) / 1000 - killed_at
    first_victims = next(
        _ms(entry_id) / 1000 - killed_at
        for entry_id, f in after
        if partition_for(f["workflow_id"], PARTITIONS) in victims_partitions
    )
    gaps = [
        (_ms(b[0]) - _ms(a[0])) / 1000
        for a, b in itertools.pairwise(out)
        if _ms(b[0]) >= killed_at * 1000
    ]
    acquired = [
        datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp() - killed_at
        for line in survivor.lines
        if '"partition acquired"' in line
        and json.loads(line).get("partition") in victims_partitions
    ]
    routing = [
        datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp() - killed_at
        for line in survivor.lines
        if '"routing partition"' in line and json.loads(line).get("partition") in victims_partitions
    ]
    moved = [
        _ms(entry_id) / 1000 - killed_at
        for n in victims_partitions
        for entry_id, _ in cast(TextEntries, redis.xrange(f"{prefix}:{{p{n}}}:stream"))
        if _ms(entry_id) >= killed_at * 1000
    ]
    taken_over = min(a for a in acquired if a > 0)
    routed_from = min(a for a in routing if a > 0)
    print(
        f"routing fail-over: killed instance's partitions acquired after {taken_over:.2f}s, "
        f"routed from {routed_from:.2f}s, first entry moved into them after {min(moved):.2f}s"
    )
    print(
        f"routing fail-over: SIGKILL of 1 of 2 instances (CTXD_LEASE_TTL={LEASE_TTL}s): "
        f"first output after the kill {first_any:.2f}s, first output of the killed "
        f"instance's partitions {first_victims:.2f}s, longest gap in the output "
        f"{max(gaps):.2f}s; {len(out)} outputs, {len(dead)} dead letters"
    )
    assert done >= EVENTS
    assert verdict.ok, verdict
    assert len(out) + len(dead) == EVENTS
    assert first_any < 1.0  # the survivor's partitions never stopped
    assert min(moved) - taken_over < 1.0  # their routing moved with their leases, at once
    # From the kill to their output: the lease TTL, the pick-up, their backlog (a loose
    # bound: the machine is shared; wt-balance's test holds the fail-over time itself).
    assert first_victims < 2 * LEASE_TTL + 5.0
    assert unmoved_input(redis, prefix, PARTITIONS) == 0
    assert survivor.proc.poll() is None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_events_appended_straight_to_partitions_are_processed_like_routed_ones(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    """With the partition count recorded, the producer API and ``ctxd send`` append to
    the workflow's partition stream; the service treats those entries as routed ones:
    one output each, ``source_id`` the partition entry id, an ``event_id`` sent twice
    suppressed, an invalid one dead-lettered with its partition entry id; traffic through
    ``ctxd:in`` goes on next to it."""
    env = {"CTXD_PARTITIONS": str(PARTITIONS)}
    redis.hset(f"{prefix}:partitions", mapping={"count": PARTITIONS, "epoch": 1, "state": "active"})
    service = start_service("run", env=env)
    service.wait_ready()
    producer = Producer(redis, prefix=prefix)
    a = producer.send("wf-a", "first", event_id="a-1")
    b = producer.send("wf-a", "second", event_id="a-2")
    again = producer.send("wf-a", "first again", event_id="a-1")  # a retried send
    bad = producer.send("wf-b", "x", event_id="b-1", priority="p9")  # invalid priority
    routed = producer.send("wf-c", "via ctxd:in", event_id="c-1", via_input=True)
    sent = run_ctxd({**service_env, **env}, "send", "wf-a", "third", "--event-id", "a-3")
    assert sent.returncode == 0, sent.stderr
    n = partition_for("wf-a", PARTITIONS)
    assert (a.stream, a.partition) == (f"{prefix}:{{p{n}}}:stream", n)
    assert routed.stream == f"{prefix}:in"
    assert routed.partition is None
    third = sent.stdout.strip()
    assert [e for e, _ in cast(TextEntries, redis.xrange(a.stream))][-1] == third

    outputs = read_outputs(redis, f"{prefix}:out", 4)
    dead = read_outputs(redis, f"{prefix}:dlq", 1)
    by_event = {f["event_id"]: f for _, f in outputs}
    in_order = [f["event_id"] for _, f in outputs if f["workflow_id"] == "wf-a"]
    assert in_order == ["a-1", "a-2", "a-3"]
    assert by_event["a-1"]["source_id"] == a.entry_id
    assert by_event["a-2"]["source_id"] == b.entry_id
    assert by_event["a-3"]["source_id"] == third
    assert by_event["c-1"]["source_id"] == routed.entry_id
    assert [(f["source_id"], f["reason"]) for _, f in dead] == [(bad.entry_id, "invalid_priority")]
    # The retried send was settled as a duplicate: nothing of it is left pending.
    groups = {g["name"]: g for g in redis.xinfo_groups(again.stream)}
    deadline = time.monotonic() + 10
    while groups["ctxd"]["pending"] or groups["ctxd"]["lag"]:
        assert time.monotonic() < deadline, groups
        redis.xread({f"{prefix}:out": "$"}, block=200)  # a bounded wait for the commit
        groups = {g["name"]: g for g in redis.xinfo_groups(again.stream)}
    assert int(redis.xlen(f"{prefix}:out")) == 4
    # While a resize is in progress, events go to ctxd:in.
    redis.hset(f"{prefix}:partitions", "state", "resizing")
    assert producer.send("wf-a", "later", event_id="a-4").stream == f"{prefix}:in"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_first_start_after_the_single_router_loses_and_doubles_nothing(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    prefix: str,
) -> None:
    """A deployment of the old version: its router moved some entries (appended to their
    partition and acknowledged), had read others (pending in group ``ctxd``) and never
    read the rest; its lease is still held when the new version starts. The new version
    waits for the lease, then every event comes out once, in its workflow's order."""
    partitions = 4
    source = "ctxd_source_id"
    inputs = [(f"wf-{i % 5}", f"ev-{i:02d}") for i in range(30)]
    stream = f"{prefix}:in"
    redis.xgroup_create(stream, "ctxd", id="0", mkstream=True)
    ids = [
        redis.xadd(stream, {"workflow_id": wf, "event_id": ev, "content": f"{ev} of {wf}"})
        for wf, ev in inputs
    ]
    redis.xreadgroup("ctxd", "router", {stream: ">"}, count=20)  # 20 read by the old router
    for (wf, ev), entry_id in list(zip(inputs, ids, strict=True))[:10]:  # 10 of them moved
        n = partition_for(wf, partitions)
        redis.xadd(
            f"{prefix}:{{p{n}}}:stream",
            {"workflow_id": wf, "event_id": ev, "content": f"{ev} of {wf}", source: entry_id},
        )
        redis.xack(stream, "ctxd", entry_id)
    redis.set(f"{prefix}:lease:router", "old-instance|7", px=6000)  # the old router, dying

    service = start_service("run", env={"CTXD_PARTITIONS": str(partitions)})
    service.wait_ready()
    service.wait_for_line(lambda line: "old-version router holds the router lease" in line)
    outputs = read_outputs(redis, f"{prefix}:out", len(inputs))
    service.wait_for_line(lambda line: "upgraded from the single router" in line)
    dead = [f.get("event_id", "") for _, f in cast(TextEntries, redis.xrange(f"{prefix}:dlq"))]
    verdict = check_history(inputs, [(f["workflow_id"], f["event_id"]) for _, f in outputs], dead)
    assert verdict.ok, verdict
    assert len(outputs) == len(inputs)
    assert not redis.xinfo_groups(stream)  # the old group is gone
    assert str(redis.get(f"{prefix}:lease:router")).startswith("retired")
    assert unmoved_input(redis, prefix, partitions) == 0
