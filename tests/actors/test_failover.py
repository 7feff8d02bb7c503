"""Fail-over in seconds with the default settings: a SIGKILLed ``ctxd run``'s partitions
give output again within 3 s, nothing lost, nothing twice, per-workflow order kept.

Two ``ctxd run`` and one ``ctxd worker`` subprocesses on a real Redis, a producer thread
appending a steady stream of events to ``ctxd:in``. Once both instances own their
balanced share, the one holding the router lease (the worst case: its death also stops
routing, where a router lease exists) is SIGKILLed. The time from the kill to the first
output of a partition it owned is printed and must be at most 3 s.
"""

from __future__ import annotations

import contextlib
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

from actors.config import Settings
from actors.service.partitions import lease_key, partition_of
from actors.testing import check_history
from tests_support import ServiceProcess

_RATE = 10.0  # events per second, over _WORKFLOWS workflows (well below one loaded instance)
_WORKFLOWS = 40
_AFTER_KILL = 6.0  # seconds of input after the kill
_BOUND = 3.0

# The defaults, not the test suite's faster ones: the claim is about defaults.
_DEFAULTS = {"CTXD_BLOCK_MS": "1000", "CTXD_EVENT_TIMEOUT": "30"}


class _Producer(threading.Thread):
    """Appends one event every 1/_RATE s to ``ctxd:in`` until stopped; keeps the order."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self._redis = Redis.from_url(redis_url, decode_responses=True)
        self._prefix = prefix
        self.inputs: list[tuple[str, str]] = []
        self.stopped = threading.Event()
        self.reached = threading.Event()
        """Set once ``target`` events were appended."""
        self.target = 0

    def run(self) -> None:
        started = time.monotonic()
        i = 0
        while not self.stopped.wait(max(0.0, started + i / _RATE - time.monotonic())):
            wf, event_id = f"{self._prefix}-wf-{i % _WORKFLOWS:02d}", f"ev-{i:05d}"
            self._redis.xadd(
                f"{self._prefix}:in",
                {"workflow_id": wf, "event_id": event_id, "content": f"step {i} of {wf} ok"},
            )
            self.inputs.append((wf, event_id))
            i += 1
            if self.target and i >= self.target:
                self.reached.set()
        self._redis.close()


def _partitions_of(redis: Redis, prefix: str, instance: str) -> list[int]:
    body = redis.get(f"{prefix}:instance:{instance}")
    return list(json.loads(body)["partitions"]) if body else []


def _ms(entry_id: str) -> float:
    """The time (s since the epoch) Redis added an entry, from its id."""
    return int(entry_id.split("-")[0]) / 1000


def _logged_after(process: ServiceProcess, since: float, events: tuple[str, ...]) -> list[float]:
    """Seconds after ``since`` at which ``process`` logged one of ``events`` (JSON lines)."""
    times = []
    for line in process.lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            record = json.loads(line)
            if record["event"] in events:
                at = datetime.fromisoformat(record["timestamp"]).timestamp() - since
                if at > 0:
                    times.append(at)
    return sorted(times)


def _wait_outputs(redis: Redis, stream: str, until: Callable[[], bool], timeout: float) -> None:
    """Block on the output stream (XREAD BLOCK) until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    last = "$"
    while not until():
        assert time.monotonic() < deadline, "timed out"
        reply = cast(TextRead, redis.xread({stream: last}, block=200, count=1000))
        if reply:
            last = reply[0][1][-1][0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_sigkilled_instance_s_partitions_give_output_within_3_seconds(
    start_service: Callable[..., ServiceProcess],
    redis: Redis,
    redis_url: str,
    prefix: str,
    settings: Settings,
) -> None:
    partitions = settings.partitions  # the default count
    names = [f"{prefix}-a", f"{prefix}-b"]
    runs = {n: start_service("run", env={**_DEFAULTS, "CTXD_INSTANCE": n}) for n in names}
    worker = start_service("worker", env=_DEFAULTS)
    for process in (*runs.values(), worker):
        process.wait_ready()
    out = f"{prefix}:out"
    producer = _Producer(redis_url, prefix)
    producer.start()
    try:
        # Steady state: both own their balanced share and output flows.
        def balanced() -> bool:
            owned = [_partitions_of(redis, prefix, n) for n in names]
            return sorted(len(o) for o in owned) == [partitions // 2, partitions - partitions // 2]

        _wait_outputs(redis, out, lambda: balanced() and redis.xlen(out) >= 50, timeout=90)
        router = cast(str | None, redis.get(lease_key(settings, "router")[0]))
        holder = next((n for n in names if router and router.startswith(f"{n}|")), None)
        victim = holder or names[1]
        survivor = next(n for n in names if n != victim)
        owned = set(_partitions_of(redis, prefix, victim))
        killed_at = time.time()
        os.kill(runs[victim].proc.pid, signal.SIGKILL)
        runs[victim].proc.wait(timeout=10)
        producer.target = len(producer.inputs) + int(_RATE * _AFTER_KILL)  # input goes on
        assert producer.reached.wait(timeout=_AFTER_KILL * 3)
    finally:
        producer.stopped.set()
        producer.join(timeout=10)
    inputs = producer.inputs
    _wait_outputs(redis, out, lambda: redis.xlen(out) >= len(inputs), timeout=90)

    entries = cast(TextEntries, redis.xrange(out))
    outputs = [(f["workflow_id"], f["event_id"]) for _, f in entries]
    dead = [f.get("event_id", "") for _, f in cast(TextEntries, redis.xrange(f"{prefix}:dlq"))]
    after = [(_ms(e) - killed_at, f["workflow_id"]) for e, f in entries if _ms(e) > killed_at]
    first_owned = min(t for t, wf in after if partition_of(wf, partitions) in owned)
    others = [t for t, wf in after if partition_of(wf, partitions) not in owned]
    first_other = min(others, default=0.0)
    beat = json.loads(str(redis.get(f"{prefix}:instance:{survivor}")))
    lease = beat["lease"]
    leases = ("partition acquired", "router lease acquired")
    taken = _logged_after(runs[survivor], killed_at, leases)
    latency = sorted(_ms(e) - _ms(f["source_id"]) for e, f in entries if _ms(e) < killed_at)
    print(
        f"\nfail-over: SIGKILL of {'the router holder' if holder else 'an instance'} owning "
        f"{len(owned)}/{partitions} partitions: first output of its partitions "
        f"{first_owned:.2f} s after the kill (survivor's own partitions: {first_other:.2f} s); "
        f"{len(inputs)} events, dlq={len(dead)}; survivor lease ttl {lease['ttl']} s, "
        f"renewal every {lease['renew_every']} s, longest renewal gap {lease['renew_gap_max']} s; "
        f"event latency before the kill: median {latency[len(latency) // 2]:.2f} s; "
        f"survivor took the leases at {', '.join(f'{t:.2f}' for t in taken)} s"
    )
    verdict = check_history(inputs, outputs, dead)
    assert verdict.ok, verdict
    assert dead == []
    assert len(outputs) == len(inputs)
    assert first_owned <= _BOUND
    assert sorted(_partitions_of(redis, prefix, survivor)) == list(range(partitions))
