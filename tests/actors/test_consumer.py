"""The one consumer-group read loop (actors/runtime/consumer.py) on a real Redis."""

from __future__ import annotations

import anyio
import pytest
from actor_support import open_redis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from actors.config import Settings
from actors.runtime.availability import RedisAvailability
from actors.runtime.consumer import GroupSource, PlainGroupSource, consume_group
from actors.runtime.redis_io import Entry, ensure_group, text

_GROUP = "g"


def source(client: Redis, stream: str) -> PlainGroupSource:
    return PlainGroupSource(client, stream=stream, group=_GROUP, consumer="c", block_ms=20)


class Recorder:
    """A batch handler recording (ids, redelivered), stopping after ``until`` entries."""

    def __init__(self, until: int) -> None:
        self.calls: list[tuple[list[str], bool]] = []
        self.until = until
        self.first = anyio.Event()
        self.done = anyio.Event()

    async def __call__(self, entries: list[Entry], redelivered: bool) -> None:
        self.calls.append(([entry_id for entry_id, _ in entries], redelivered))
        self.first.set()
        if sum(len(ids) for ids, _ in self.calls) >= self.until:
            self.done.set()


async def test_pending_entries_come_first_then_new_ones(settings: Settings) -> None:
    stream = settings.key("consumer-test")
    async with open_redis(settings) as client:
        await ensure_group(client, stream, _GROUP)
        old = [text(await client.xadd(stream, {"n": str(i)})) for i in range(3)]
        await client.xreadgroup(_GROUP, "c", {stream: ">"})  # read, never acknowledged
        new = [text(await client.xadd(stream, {"n": str(i)})) for i in range(3, 5)]
        record = Recorder(until=5)
        await consume_group(
            source(client, stream), record, count=10, stop=record.done
        )  # returns once stop is set
    assert record.calls == [
        (old, True),
        (new, False),
    ]


async def test_a_deleted_group_is_created_again_and_reading_goes_on(settings: Settings) -> None:
    stream = settings.key("consumer-test")
    async with open_redis(settings) as client:
        await ensure_group(client, stream, _GROUP)
        first = text(await client.xadd(stream, {"n": "1"}))
        record = Recorder(until=3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: consume_group(source(client, stream), record, count=10, stop=record.done)
            )
            with anyio.fail_after(10):
                await record.first.wait()
                await client.xgroup_destroy(stream, _GROUP)
                second = text(await client.xadd(stream, {"n": "2"}))
                await record.done.wait()
        groups = await client.xinfo_groups(stream)
    # Recreated from the start of the stream: the first entry is delivered again.
    assert [ids for ids, _ in record.calls] == [[first], [first, second]]
    assert [g["name"] for g in groups] == [_GROUP.encode()]


class FaultOnce:
    """A source whose second read fails as if the connection dropped (the fault is
    fake, the reads are real); every cursor read is recorded."""

    def __init__(self, inner: PlainGroupSource) -> None:
        self.inner = inner
        self.cursors: list[str] = []
        self.failed = False

    @property
    def stream(self) -> str:
        return self.inner.stream

    async def read(self, cursor: str, count: int) -> tuple[list[Entry], str]:
        self.cursors.append(cursor)
        if len(self.cursors) == 2 and not self.failed:
            self.failed = True
            raise RedisConnectionError("connection reset by peer (injected)")
        return await self.inner.read(cursor, count)

    async def wait(self, after: str) -> None:
        await self.inner.wait(after)

    async def recreate_group(self) -> None:
        await self.inner.recreate_group()


async def test_an_outage_is_waited_out_and_the_pending_list_read_again(
    settings: Settings,
) -> None:
    stream = settings.key("consumer-test")
    async with open_redis(settings) as client:
        await ensure_group(client, stream, _GROUP)
        entry = text(await client.xadd(stream, {"n": "1"}))
        await client.xreadgroup(_GROUP, "c", {stream: ">"})
        flaky = FaultOnce(source(client, stream))
        checked: GroupSource = flaky
        availability = RedisAvailability.for_settings(client, settings)
        record = Recorder(until=2)
        with anyio.fail_after(10):
            await consume_group(
                checked, record, count=1, availability=availability, stop=record.done
            )
    assert flaky.failed
    # read 0 → the entry; read after it fails; once Redis answers: 0 again.
    assert flaky.cursors[:3] == ["0", entry, "0"]
    assert record.calls == [([entry], True), ([entry], True)]
    assert availability.statistics().outages == 1


async def test_ready_bounds_each_read_and_none_ends_the_loop(settings: Settings) -> None:
    stream = settings.key("consumer-test")
    asked: list[int] = []
    async with open_redis(settings) as client:
        await ensure_group(client, stream, _GROUP)
        for i in range(5):
            await client.xadd(stream, {"n": str(i)})
        record = Recorder(until=99)

        async def ready() -> int | None:
            asked.append(1)
            return None if len(asked) > 3 else 2

        await consume_group(source(client, stream), record, count=10, ready=ready)
    assert [len(ids) for ids, _ in record.calls] == [2, 2]
    assert len(asked) == 4


@pytest.mark.parametrize("availability", [False, True])
async def test_other_errors_are_raised_to_the_supervisor(
    settings: Settings, availability: bool
) -> None:
    stream = settings.key("consumer-test")
    async with open_redis(settings) as client:
        await ensure_group(client, stream, _GROUP)
        await client.xadd(stream, {"n": "1"})

        async def broken(entries: list[Entry], redelivered: bool) -> None:
            raise ValueError("a bug in the handler")

        monitor = RedisAvailability.for_settings(client, settings) if availability else None
        with pytest.raises(ValueError, match="a bug"):
            await consume_group(source(client, stream), broken, count=10, availability=monitor)
