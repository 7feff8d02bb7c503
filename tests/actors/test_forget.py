"""``ctxd forget``: one workflow's state, parked events and dedupe keys go, nothing of
any other workflow does; refused while the workflow is being processed unless --force."""

from __future__ import annotations

import signal
from collections.abc import Callable

from redis import Redis

from actors.config import Settings
from actors.service.parking import parked_stream
from actors.service.partitions import partition_key, partition_stream, workflow_partition
from actors.service.retention import workflows_key
from actors.service.streams import done_key, done_key_pattern
from tests_support import MARKET, TECH, ServiceProcess, read_outputs, run_ctxd


def _keys_of(redis: Redis, prefix: str, workflow_id: str) -> set[str]:
    """Every key that belongs to the workflow (exact id, not a prefix of another)."""
    found = set()
    for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        kind, _, tail = key.removeprefix(f"{prefix}:").partition(":")
        if kind.startswith("{p"):  # a partition's key: {p<n>}:<kind>:...
            kind, _, tail = tail.partition(":")
        checkpoint = kind.startswith("checkpoint") or kind == "write_keys_zset"
        if (
            (checkpoint and tail.startswith(f"{workflow_id}:__empty__"))
            or (kind == "done" and tail.startswith(f"{workflow_id}/"))
            or (kind == "parked" and tail == workflow_id)
        ):
            found.add(key)
    return found


def test_forget_deletes_one_workflow_and_nothing_else(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    redis: Redis,
    prefix: str,
) -> None:
    env = {**service_env, "CTXD_ESCALATION_PAUSES": "true"}
    service = start_service("run", env=env)
    service.wait_ready()
    target, other = "acct", "acct:2"  # the other id starts with the target's
    for i, text in enumerate([TECH, MARKET, TECH]):
        for workflow_id in (target, other):
            redis.xadd(
                f"{prefix}:in", {"workflow_id": workflow_id, "event_id": f"e{i}", "content": text}
            )
    # a pause and a parked event for the target
    redis.xadd(
        f"{prefix}:in",
        {"workflow_id": target, "event_id": "esc", "content": "ok", "priority": "critical"},
    )
    redis.xadd(f"{prefix}:in", {"workflow_id": target, "event_id": "late", "content": TECH})
    read_outputs(redis, f"{prefix}:out", 7)
    layout = Settings(stream_prefix=prefix)
    assert len(read_outputs(redis, parked_stream(layout, target), 1)) == 1
    service.signal(signal.SIGTERM)
    assert service.wait() == 0
    # dedupe keys are per workflow: {prefix}:{p<n>}:done:{workflow_id}/{event_id}
    done = len(list(redis.scan_iter(match=done_key_pattern(layout, target))))
    assert done == 4  # e0, e1, e2 and esc (the parked event has no output yet)
    mine, theirs = _keys_of(redis, prefix, target), _keys_of(redis, prefix, other)
    assert any(":checkpoint:" in k for k in mine)
    assert any(":checkpoint_write:" in k for k in mine)  # the pause's writes
    assert len(theirs) >= 4
    docs = int(redis.ft(f"{prefix}:checkpoint").info()["num_docs"])  # type: ignore[no-untyped-call]
    checkpoints = sum(":checkpoint:" in k for k in mine)

    forgot = run_ctxd(env, "forget", target)
    assert forgot.returncode == 0, forgot.stderr + forgot.stdout
    assert (
        f"forgot {target}: {checkpoints} checkpoint(s), {done} dedupe key(s), 1 parked event(s)"
        in forgot.stdout
    )
    assert _keys_of(redis, prefix, target) == set()
    assert _keys_of(redis, prefix, other) == theirs
    index = redis.ft(f"{prefix}:checkpoint")
    assert int(index.info()["num_docs"]) == docs - checkpoints  # type: ignore[no-untyped-call]
    layout = Settings(stream_prefix=prefix)
    assert redis.zscore(workflows_key(layout, workflow_partition(layout, target)), target) is None
    state = run_ctxd(env, "state", target)
    assert state.returncode == 1
    assert "has no state yet" in state.stderr
    assert run_ctxd(env, "state", other).returncode == 0


def test_forget_refuses_while_the_workflow_is_being_processed(
    service_env: dict[str, str], redis: Redis, prefix: str
) -> None:
    """An entry pending in its partition (in flight) or not yet routed: refused; --force
    deletes all the same."""
    layout = Settings(stream_prefix=prefix)
    partition = partition_stream(layout, workflow_partition(layout, "busy"))
    redis.xgroup_create(partition, "ctxd", id="0", mkstream=True)
    redis.xadd(partition, {"workflow_id": "busy", "content": TECH})
    redis.xreadgroup("ctxd", "owner", {partition: ">"})  # read, not committed: in flight
    redis.set(done_key(layout, "busy", "e1"), "1-0")
    refused = run_ctxd(service_env, "forget", "busy")
    assert refused.returncode == 1
    assert "'busy' is being processed: 1 of its entries" in refused.stderr
    assert redis.exists(done_key(layout, "busy", "e1"))

    moved = redis.xadd(f"{prefix}:in", {"workflow_id": "idle", "content": TECH})
    redis.set(partition_key(layout, workflow_partition(layout, "idle"), "cursor"), moved)
    redis.xadd(f"{prefix}:in", {"workflow_id": "queued", "content": TECH})  # not routed yet
    refused = run_ctxd(service_env, "forget", "queued")
    assert refused.returncode == 1
    assert "'queued' is being processed" in refused.stderr
    assert run_ctxd(service_env, "forget", "idle").returncode == 0  # nothing of it queued

    forced = run_ctxd(service_env, "forget", "busy", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "1 dedupe key(s)" in forced.stdout
    assert not redis.exists(done_key(layout, "busy", "e1"))
    bad = run_ctxd(service_env, "forget", "no such id")
    assert bad.returncode == 1
    assert "is not a workflow id" in bad.stderr
