"""The ingress's loops are supervised children: a crash restarts one, beyond the
intensity the ``stream`` supervisor escalates.

The ingress runs in-process on the real Redis with the real graph (memory
checkpointer); only the fault is injected, through the partition readers' test hook.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import anyio
import pytest
from actor_support import open_redis, read_stream
from redis import Redis as SyncRedis

from actors.config import Settings
from actors.runtime.redis_io import Entry
from actors.runtime.supervisor import RestartEvent, SupervisorEscalation
from actors.service.ingress import Ingress
from actors.service.partitions import partition_lease, partition_stream
from graph.checkpointer import open_checkpointer
from graph.work import LocalDispatch
from graph.workflow import build_contextual_workflow
from tests_support import unmoved_input

_EVENTS = 24
_WORKFLOWS = 3


def feed(redis: SyncRedis, settings: Settings) -> list[tuple[str, str]]:
    """Append the events; return (workflow id, event id) in input order."""
    sent = []
    for i in range(_EVENTS):
        workflow, event = f"wf-{i % _WORKFLOWS}", f"e{i:03d}"
        content = f"event {i}: checkout latency rose after the deploy"
        redis.xadd(
            settings.input_stream, {"workflow_id": workflow, "event_id": event, "content": content}
        )
        sent.append((workflow, event))
    return sent


def unacknowledged(redis: SyncRedis, settings: Settings) -> int:
    """Entries pending in a partition, plus ``ctxd:in`` entries not routed yet."""
    streams = [partition_stream(settings, n) for n in range(settings.partitions)]
    pending = sum(
        int(redis.xpending(s, settings.group)["pending"]) for s in streams if redis.exists(s)
    )
    return pending + unmoved_input(redis, settings.stream_prefix, settings.partitions)


async def test_a_crash_inside_a_partition_reader_restarts_it_losing_and_duplicating_nothing(
    settings: Settings, redis: SyncRedis
) -> None:
    settings = replace(settings, partitions=4, restart_backoff=0.0)
    sent = feed(redis, settings)
    restarts: list[RestartEvent] = []
    crashed: list[tuple[int, list[str]]] = []

    async def crash_once(n: int, entries: list[Entry]) -> None:
        if not crashed:  # read, not yet admitted: the entries stay pending
            crashed.append((n, [entry_id for entry_id, _ in entries]))
            raise RuntimeError("injected fault in the partition reader")

    async with (
        open_redis(settings) as client,
        open_checkpointer("memory", namespace=settings.stream_prefix) as saver,
    ):
        graph = build_contextual_workflow(LocalDispatch(), saver)
        ingress = Ingress(client, settings, graph, on_restart=restarts.append, read_hook=crash_once)
        async with anyio.create_task_group() as tg:
            await tg.start(ingress.run)
            outputs = await read_stream(client, settings.output_stream, _EVENTS)
            ingress.stop()
            with anyio.fail_after(30):
                await ingress.stopped.wait()
        assert ingress.supervisor is not None
        supervised = ingress.supervisor.statistics()
    assert len(crashed) == 1
    assert crashed[0][1]  # the fault hit a read that had entries
    assert [(e.supervisor, e.child, e.error_type) for e in restarts] == [
        ("stream", "readers", "RuntimeError")
    ]
    assert supervised.restarts["readers"] == 1
    assert redis.xlen(settings.output_stream) == _EVENTS  # none came late either
    got = [(fields["workflow_id"], fields["event_id"]) for _, fields in outputs]
    assert sorted(got) == sorted(sent)  # every event exactly once
    order: dict[str, list[str]] = defaultdict(list)
    for workflow, event in got:
        order[workflow].append(event)
    for workflow, events in order.items():
        assert events == [e for w, e in sent if w == workflow]  # input order kept
    assert redis.xlen(settings.dlq_stream) == 0
    assert unacknowledged(redis, settings) == 0
    stats = ingress.statistics()
    assert (stats.processed, stats.duplicates, stats.in_flight) == (_EVENTS, 0, 0)


async def test_a_reader_crashing_beyond_the_intensity_escalates_and_leaves_its_leases(
    settings: Settings, redis: SyncRedis
) -> None:
    settings = replace(settings, partitions=2, restart_backoff=0.0, restart_intensity=2)
    feed(redis, settings)
    restarts: list[RestartEvent] = []

    async def always_crash(n: int, entries: list[Entry]) -> None:
        raise RuntimeError("the reader cannot read this")

    async with (
        open_redis(settings) as client,
        open_checkpointer("memory", namespace=settings.stream_prefix) as saver,
    ):
        graph = build_contextual_workflow(LocalDispatch(), saver)
        ingress = Ingress(
            client, settings, graph, on_restart=restarts.append, read_hook=always_crash
        )
        with anyio.fail_after(30), pytest.raises(SupervisorEscalation) as raised:
            await ingress.run()
    assert (raised.value.supervisor, raised.value.child) == ("stream", "readers")
    assert [e.child for e in restarts] == ["readers", "readers"]
    assert not ingress.stopped.is_set()  # a crash, not a stop: the root restarts it
    for n in range(settings.partitions):
        assert redis.get(partition_lease(settings, n)[0]) is None
    assert redis.xlen(settings.output_stream) == 0
