"""Garbage appended straight to an actor mailbox, against a running ``ctxd run`` (found
by the adversary review of issue 11): a request whose fields are not UTF-8, or whose
``reply_to`` names a key that is not a stream, crashed its worker on every delivery
(UnicodeDecodeError; WRONGTYPE in the reply script, failing the whole batch), the pool
supervisor escalated to the root, and two such entries within 30 s stopped the service.
Now the first is dead-lettered as ``invalid_request`` and the second is answered
nowhere but acknowledged, without a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import cast

import pytest
from actor_support import RawEntries
from redis import Redis

from tests_support import TECH, ServiceProcess, read_outputs

pytestmark = pytest.mark.slow


def test_garbage_in_a_mailbox_neither_restarts_workers_nor_stops_the_service(
    start_service: Callable[..., ServiceProcess], redis_url: str, prefix: str
) -> None:
    raw = Redis.from_url(redis_url, socket_timeout=60)
    service = start_service("run")
    service.wait_ready()
    mailbox = f"{prefix}:actor:analysis"
    payload = json.dumps({"workflow_id": "w", "window": ["some text"], "pass_number": 0})
    later = str(time.time() + 600)
    raw.set(f"{prefix}:not-a-stream", "x")
    binary = raw.xadd(
        mailbox, {b"id": b"\xff\xfe", b"kind": b"analysis", b"payload": b"\xff", b"deadline": later}
    )
    wrong = raw.xadd(
        mailbox,
        {
            "id": "r1",
            "kind": "analysis",
            "payload": payload,
            "reply_to": f"{prefix}:not-a-stream",
            "deadline": later,
        },
    )
    raw.xadd(
        mailbox,
        {
            "id": "r2",
            "kind": "analysis",
            "payload": payload,
            "reply_to": f"{prefix}:r",
            "deadline": later,
        },
    )
    replies = cast(
        RawEntries, read_outputs(raw, f"{prefix}:r", 1, timeout_ms=30_000)
    )  # a bytes client
    assert [f[b"id"] for _, f in replies] == [b"r2"]
    dead = cast(
        RawEntries, read_outputs(raw, f"{prefix}:dlq", 1, timeout_ms=30_000)
    )  # a bytes client
    assert [(f[b"source_id"], f[b"reason"]) for _, f in dead] == [(binary, b"invalid_request")]
    assert b"UTF-8" in dead[0][1][b"error"]
    for i in range(3):
        raw.xadd(f"{prefix}:in", {"workflow_id": f"after-{i}", "content": TECH})
    outputs = cast(
        RawEntries, read_outputs(raw, f"{prefix}:out", 3, timeout_ms=60_000)
    )  # a bytes client
    assert [f[b"error"] for _, f in outputs] == [b""] * 3
    assert raw.xpending(mailbox, "ctxd")["pending"] == 0
    assert wrong not in {eid for eid, _ in cast(RawEntries, raw.xrange(mailbox))}
    assert not any('"actor restarted"' in line for line in service.lines)
    assert service.proc.poll() is None
    raw.close()


@pytest.mark.parametrize(
    "garbage",
    [{b"id": b"\xff", b"ok": b"1"}, {b"no_id": b"x"}],
    ids=["not UTF-8", "no id"],
)
def test_garbage_in_a_reply_stream_is_skipped(
    start_service: Callable[..., ServiceProcess],
    redis_url: str,
    prefix: str,
    garbage: dict[bytes, bytes],
) -> None:
    """The asker's reply reader met an entry it could not read, crashed before moving
    past it, and read it again after every restart."""
    raw = Redis.from_url(redis_url, socket_timeout=60)
    instance = f"{prefix}-adv"
    service = start_service("run", env={"CTXD_INSTANCE": instance})
    service.wait_ready()
    raw.xadd(f"{prefix}:reply:{instance}", garbage)  # type: ignore[arg-type]
    for i in range(3):
        raw.xadd(f"{prefix}:in", {"workflow_id": f"after-{i}", "content": TECH})
    outputs = cast(
        RawEntries, read_outputs(raw, f"{prefix}:out", 3, timeout_ms=60_000)
    )  # a bytes client
    assert [f[b"error"] for _, f in outputs] == [b""] * 3, "\n".join(service.lines[-10:])
    assert not any('"actor restarted"' in line for line in service.lines)
    assert service.proc.poll() is None
    raw.close()
