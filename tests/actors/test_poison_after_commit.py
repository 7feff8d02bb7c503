"""An event whose output was committed is never dead-lettered as poison as well.

A run can commit (output written, input acknowledged) and still look failed to the
process: the reply of the commit script was lost to a time-out or a dropped
connection. Its in-memory retries then count up to ``CTXD_MAX_DELIVERIES`` and the
poison path would append a DLQ entry for an event that already has its output — two
results for one input. The DLQ write checks the event's dedupe key in the same script.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
from redis import Redis

from actors.config import Settings
from actors.service.partitions import attempts_key, partition_of, partition_stream
from actors.service.streams import done_key
from tests_support import ServiceProcess, read_outputs

pytestmark = pytest.mark.slow

PARTITIONS = 2


def test_a_committed_event_past_its_delivery_limit_is_acknowledged_not_dead_lettered(
    start_service: Callable[..., ServiceProcess], redis: Redis, prefix: str
) -> None:
    """The state a lost commit reply leaves: the done key is there, the entry is still
    pending and its run count is past the limit. It is acknowledged, with no DLQ entry,
    and the workflow's next event gets its output."""
    wf = "wf-committed"
    layout = Settings(stream_prefix=prefix, partitions=PARTITIONS)
    n = partition_of(wf, PARTITIONS)
    stream = partition_stream(layout, n)
    redis.xgroup_create(stream, "ctxd", id="0", mkstream=True)
    entry_id = cast(
        str,
        redis.xadd(
            stream,
            {
                "workflow_id": wf,
                "event_id": "e1",
                "content": "done already",
                "ctxd_source_id": "1-1",
            },
        ),
    )  # a decoding client
    redis.xreadgroup("ctxd", "owner", {stream: ">"})  # pending, as a crashed owner left it
    redis.hset(attempts_key(layout, n), f"{n}/{entry_id}", 5)  # the limit (CTXD_MAX_DELIVERIES)
    redis.set(done_key(layout, wf, "e1"), "1-0")  # its output was committed
    redis.xadd(f"{prefix}:in", {"workflow_id": wf, "event_id": "e2", "content": "the next one"})

    service = start_service("run", env={"CTXD_PARTITIONS": str(PARTITIONS)})
    service.wait_ready()
    outputs = read_outputs(redis, f"{prefix}:out", 1)
    assert [f["event_id"] for _, f in outputs] == ["e2"]
    assert redis.xrange(f"{prefix}:dlq") == []
    assert redis.xpending(stream, "ctxd")["pending"] == 0
