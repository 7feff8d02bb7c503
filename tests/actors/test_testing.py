"""actors.testing, the helpers ctxd ships for users' tests: fake time and stream readers."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from actor_support import open_redis
from redis import Redis

from actors.config import Settings
from actors.testing import (
    FakeClock,
    FakeSleep,
    aread_entries,
    read_dead_letters,
    read_entries,
    wait_for_output,
)


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[Redis]:
    """A client that answers bytes, as ctxd's own clients do."""
    client = Redis.from_url(redis_url)
    yield client
    client.close()


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == clock() == 1000.0
    clock.advance(2.5)
    clock.now += 1
    assert clock() == 1003.5


async def test_fake_sleep_records_returns_at_once_and_lets_other_tasks_run() -> None:
    sleep, ran = FakeSleep(), anyio.Event()

    async def other_task() -> None:
        ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other_task)
        with anyio.fail_after(1):
            await sleep(3600.0)
        assert ran.is_set()  # the sleep yielded to the event loop
        await sleep(0.5)
    assert sleep.delays == [3600.0, 0.5]


async def test_fake_sleep_bound_to_a_clock_advances_it() -> None:
    clock = FakeClock(now=0.0)
    sleep = FakeSleep(clock)
    await sleep(2.0)
    await sleep(3.0)
    assert clock() == 5.0


def test_read_entries_returns_every_entry_decoded_once_enough_arrived(
    raw_redis: Redis, settings: Settings
) -> None:
    stream = settings.output_stream
    ids = [raw_redis.xadd(stream, {"event_id": str(n), "body": "é"}) for n in range(3)]
    entries = read_entries(raw_redis, stream, 2)
    assert [i.encode() for i, _ in entries] == ids
    assert entries[0][1] == {"event_id": "0", "body": "é"}


def test_read_entries_gives_what_arrived_when_time_runs_out(
    redis: Redis, settings: Settings
) -> None:
    redis.xadd(settings.output_stream, {"event_id": "only"})
    entries = read_entries(redis, settings.output_stream, 5, within=0.05)
    assert [f["event_id"] for _, f in entries] == ["only"]


def test_wait_for_output_finds_the_events_output_of_its_workflow(
    redis: Redis, settings: Settings
) -> None:
    out = settings.output_stream
    redis.xadd(out, {"workflow_id": "w1", "event_id": "e", "status": "ok"})
    redis.xadd(out, {"workflow_id": "w2", "event_id": "e", "status": "escalated"})
    assert wait_for_output(redis, "e", stream=out)["workflow_id"] == "w1"
    assert wait_for_output(redis, "e", stream=out, workflow_id="w2")["status"] == "escalated"


def test_wait_for_output_names_the_event_when_none_arrives(
    redis: Redis, settings: Settings
) -> None:
    redis.xadd(settings.output_stream, {"workflow_id": "w", "event_id": "other"})
    with pytest.raises(TimeoutError, match=r"no output for event_id 'e-9' .*\(1 other outputs"):
        wait_for_output(redis, "e-9", stream=settings.output_stream, within=0.05)


def test_read_dead_letters_decodes_the_dlq(raw_redis: Redis, settings: Settings) -> None:
    raw_redis.xadd(settings.dlq_stream, {"reason": "missing_workflow_id", "blob": b"\xff"})
    [(_, fields)] = read_dead_letters(raw_redis, settings.dlq_stream)
    assert fields == {"reason": "missing_workflow_id", "blob": "\ufffd"}


async def test_aread_entries_waits_for_entries_appended_after_it_started(
    settings: Settings,
) -> None:
    async with open_redis(settings) as client:
        got: list[list[tuple[str, dict[str, str]]]] = []

        async def reader() -> None:
            got.append(await aread_entries(client, settings.output_stream, 2, within=5))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await client.xadd(settings.output_stream, {"event_id": "a"})
            await client.xadd(settings.output_stream, {"event_id": "b"})
    assert [f["event_id"] for _, f in got[0]] == ["a", "b"]
