"""Changing the partition count under load, exactly as docs/operations.md says to.

Two ``ctxd run`` instances and a ``ctxd worker`` on an own Redis Stack, 16 partitions,
a producer appending to ``ctxd:in`` at a steady rate the whole time. In the middle:
``ctxd partitions resize 64``; the instances stop by themselves once the count flips
and are started again with ``CTXD_PARTITIONS=64`` (what a service manager does with the
changed configuration). Every event must come out exactly once, in its workflow's order.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from actor_support import TextEntries
from redis import Redis
from redis_helpers import free_port, start_redis

from actors.service.partitions import partition_of
from actors.testing import check_history
from tests_support import ServiceProcess, run_ctxd

WORKFLOWS = 24
RATE = 25.0  # events per second appended to ctxd:in
BEFORE = 8.0  # seconds of load before the resize
AFTER = 8.0  # seconds of load after the instances run with the new count
BURST = 300  # events appended at once just before the resize
PREFIX = "rz"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start_redis(tmp_path / "redis", port, modules=True)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Producer:
    """Appends events to ``ctxd:in`` at :data:`RATE` per second in a thread, round-robin
    over the workflows, recording ``(workflow, event id)`` in append order."""

    def __init__(self, url: str) -> None:
        self.inputs: list[tuple[str, str]] = []
        self._redis = Redis.from_url(url, decode_responses=True)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._redis.close()

    def burst(self, count: int) -> None:
        """Append ``count`` events at once (a backlog for the old partitions to drain)."""
        for _ in range(count):
            self._append()

    def _append(self) -> None:
        with self._lock:
            i = len(self.inputs)
            wf, event_id = f"wf-{i % WORKFLOWS:02d}", f"ev-{i:05d}"
            self._redis.xadd(
                f"{PREFIX}:in",
                {"workflow_id": wf, "event_id": event_id, "content": f"step {i} of {wf} ok"},
            )
            self.inputs.append((wf, event_id))

    def _run(self) -> None:
        sent = 0
        start = time.monotonic()
        # Pacing a steady load: the wait is the schedule itself, not a stand-in for an event.
        while not self._stop.wait(max(0.0, start + sent / RATE - time.monotonic())):
            self._append()
            sent += 1


def _moved(workflow_id: str) -> bool:
    """Whether the workflow's partition changes from 16 to 64 partitions."""
    return partition_of(workflow_id, 16) != partition_of(workflow_id, 64)


def _wait_for_outputs(redis: Redis, target: int, timeout: float) -> int:
    """Block on ctxd:out (XREAD BLOCK) until it holds ``target`` entries."""
    deadline = time.monotonic() + timeout
    while (done := int(redis.xlen(f"{PREFIX}:out"))) < target and time.monotonic() < deadline:
        redis.xread({f"{PREFIX}:out": "$"}, block=500)
    return done


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_resize_16_to_64_under_load_loses_doubles_and_reorders_nothing(
    own_redis: str, tmp_path: Path
) -> None:
    env = {
        "CTXD_REDIS_URL": own_redis,
        "CTXD_STREAM_PREFIX": PREFIX,
        "CTXD_STATE_DIR": str(tmp_path / "state"),
        "CTXD_BLOCK_MS": "100",
        "CTXD_EVENT_TIMEOUT": "5",
        "CTXD_LEASE_TTL": "3",
        "CTXD_PARTITIONS": "16",
    }
    redis = Redis.from_url(own_redis, decode_responses=True)
    everyone: list[ServiceProcess] = []

    def start(*args: str, **extra: str) -> ServiceProcess:
        process = ServiceProcess(list(args), {**env, **extra})
        everyone.append(process)
        return process

    try:
        worker = start("worker")
        old = [start("run"), start("run")]
        for instance in old:
            instance.wait_ready()
        with Producer(own_redis) as producer:
            _wait_for_outputs(redis, int(RATE * BEFORE / 2), timeout=60)
            time.sleep(BEFORE / 2)  # load keeps coming while the old count runs
            producer.burst(BURST)  # the old partitions have work left when the resize begins
            resized_at = len(producer.inputs)
            began = time.monotonic()
            resize = start("partitions", "resize", "64", "--timeout", "120")
            resize.wait_for_line(lambda x: "draining the old partitions" in x)
            # An instance started with the new count meanwhile waits for the flip; it
            # runs beside the old ones until they are gone (routing stays paused).
            early = start("run", CTXD_PARTITIONS="64")
            early.wait_for_line(lambda x: "waiting for the partition count change" in x)
            # The old instances notice the flip, stop with one line and exit 1 ...
            codes = [instance.wait(timeout=150) for instance in old]
            stopped = time.monotonic()
            assert codes == [1, 1]
            for instance in old:
                line = instance.lines[-1]
                assert "partition count changed to 64 (epoch 2)" in line, line
                assert "CTXD_PARTITIONS=64" in line
            # ... and are started again with the new count, as a service manager would;
            # the resize ends once no instance runs the old count.
            assert resize.wait(timeout=60) == 0, "\n".join(resize.lines)
            flipped = time.monotonic()
            early.wait_ready()
            late = start("run", CTXD_PARTITIONS="64")
            late.wait_ready()
            restarted = time.monotonic()
            # Event ids sent again after the change are still recognised (the dedupe
            # keys followed their workflows to the new partitions): no second output.
            resent = [(wf, e) for wf, e in producer.inputs[:resized_at] if _moved(wf)][:20]
            for wf, event_id in resent:
                redis.xadd(
                    f"{PREFIX}:in", {"workflow_id": wf, "event_id": event_id, "content": "again"}
                )
            _wait_for_outputs(redis, len(producer.inputs), timeout=60)
            time.sleep(AFTER)  # load goes on under the new count
            producer.stop()
            inputs = list(producer.inputs)
        done = _wait_for_outputs(redis, len(inputs), timeout=120)
        out = cast(TextEntries, redis.xrange(f"{PREFIX}:out"))
        outputs = [(f["workflow_id"], f["event_id"]) for _, f in out]
        dead = [f.get("event_id", "") for _, f in cast(TextEntries, redis.xrange(f"{PREFIX}:dlq"))]
        verdict = check_history(inputs, outputs, dead)
        print(
            f"resize 16→64 under {RATE:g} events/s: {len(inputs)} events "
            f"({resized_at} before the resize); old instances stopped "
            f"{stopped - began:.1f}s after the command started, which ended "
            f"{flipped - began:.1f}s after it; a restarted instance was ready "
            f"{restarted - flipped:.1f}s later; outputs {done}, dlq {len(dead)}"
        )
        print("\n".join(line for line in resize.lines if line.startswith("resize")))
        assert verdict.ok, verdict
        assert len(outputs) == len(inputs)
        assert not dead
        assert redis.hgetall(f"{PREFIX}:partitions") == {
            "count": "64",
            "epoch": "2",
            "state": "active",
        }
        for n in range(64):
            stream = f"{PREFIX}:{{p{n}}}:stream"
            if redis.exists(stream):
                assert redis.xpending(stream, "ctxd")["pending"] == 0
            assert not redis.exists(f"{PREFIX}:{{p{n}}}:barrier")  # the resize's fence is gone
        # The resize really waited for a backlog, and really moved workflows.
        assert any("entries unfinished in" in x and " 0 entries" not in x for x in resize.lines)
        assert len(resent) == 20
        # The idle-workflow index followed the workflows too.
        for n in range(64):
            indexed = cast(list[str], redis.zrange(f"{PREFIX}:{{p{n}}}:workflows", 0, -1))
            assert [wf for wf in indexed if partition_of(wf, 64) != n] == []
        assert worker.proc.poll() is None  # the worker does not use the count: unaffected
    finally:
        for process in everyone:
            process.stop()
        redis.close()


def test_an_instance_configured_with_another_count_refuses_to_start_in_one_line(
    start_service: Callable[..., ServiceProcess], service_env: dict[str, str], prefix: str
) -> None:
    """The first ``ctxd run`` records its count; one with another count exits 2 with one
    line naming the record and what to do; ``ctxd partitions`` shows the record."""
    shown = run_ctxd({**service_env, "CTXD_PARTITIONS": "4"}, "partitions")
    assert "none recorded" in shown.stdout, shown.stderr
    first = start_service("run", env={"CTXD_PARTITIONS": "4"})
    first.wait_ready()
    other = start_service("run", env={"CTXD_PARTITIONS": "8"})
    assert other.wait(timeout=60) == 2
    errors = [x for x in other.lines if x.startswith("ctxd:")]
    assert errors == [
        f"ctxd: CTXD_PARTITIONS=8, but {prefix}:partitions records 4 partitions (epoch 1): "
        "start with CTXD_PARTITIONS=4, or change the count of every instance with "
        '`ctxd partitions resize 8` (docs/operations.md, "Changing the partition count")'
    ]
    shown = run_ctxd({**service_env, "CTXD_PARTITIONS": "8"}, "partitions")
    assert shown.stdout.splitlines()[:3] == ["partitions: 4", "epoch: 1", "state: active"]
    assert "would refuse to start" in shown.stdout


def test_a_resize_that_cannot_drain_is_undone_on_timeout_and_on_ctrl_c(
    start_service: Callable[..., ServiceProcess], service_env: dict[str, str], prefix: str
) -> None:
    """With no instance to finish an old partition's entry, the resize waits; past its
    ``--timeout``, or on SIGINT, it puts the record back to active at the old count."""
    redis = Redis.from_url(service_env["CTXD_REDIS_URL"], decode_responses=True)
    try:
        redis.hset(f"{prefix}:partitions", mapping={"count": 4, "epoch": 1, "state": "active"})
        stream = f"{prefix}:{{p2}}:stream"
        redis.xgroup_create(stream, "ctxd", id="$", mkstream=True)
        redis.xadd(stream, {"workflow_id": "wf", "content": "waits"})
        timed_out = run_ctxd(service_env, "partitions", "resize", "8", "--timeout", "1")
        assert timed_out.returncode == 1
        said = " ".join(timed_out.stderr.split())
        assert "did not drain within 1 s (1 entries unfinished, 0 parked)" in said
        assert "the resize was undone" in said
        assert "1 entries unfinished in 1 partitions" in timed_out.stdout
        assert redis.hgetall(f"{prefix}:partitions") == {
            "count": "4",
            "epoch": "1",
            "state": "active",
        }
        resize = start_service("partitions", "resize", "8")
        resize.wait_for_line(lambda x: "entries unfinished" in x)
        assert redis.hget(f"{prefix}:partitions", "state") == "resizing"
        resize.signal(signal.SIGINT)
        resize.wait(timeout=30)
        assert redis.hgetall(f"{prefix}:partitions") == {
            "count": "4",
            "epoch": "1",
            "state": "active",
        }
        # Moving can resume at once: no barrier is left in any partition's slot.
        assert not [n for n in range(8) if redis.exists(f"{prefix}:{{p{n}}}:barrier")]
    finally:
        redis.close()
