"""The commands that read results and dead letters follow the cluster layout: one output
stream and one DLQ per partition (``{prefix}:{p<n>}:out`` / ``:dlq``) plus the shared
``ctxd:dlq``. The layout is only names, so a single real Redis holds it; the commands run
through the real parser (``build_parser``), in process, with ``Settings(cluster=True)``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import cast

import pytest
from actor_support import RawEntries, TextEntries, TextRead
from redis import Redis
from redis.exceptions import NoPermissionError

from actors.app.cli import build_parser
from actors.app.cli.dlq import DeadLetterRef, replay_across_slots
from actors.app.cli.merged import Follower, newest
from actors.app.cli.ops import collect_status
from actors.config import Settings
from actors.results import dead_letter_streams, output_streams
from actors.service.partitions import dlq_stream_of, output_stream_of, workflow_partition


@pytest.fixture
def cluster_settings(settings: Settings) -> Settings:
    """A deployment with the cluster layout and 4 partitions, on the test's Redis."""
    return replace(settings, cluster=True, partitions=4)


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[Redis]:
    """A client that does not decode (to see the bytes a replay wrote)."""
    client = Redis.from_url(redis_url)
    yield client
    client.close()


def _workflows(settings: Settings) -> dict[int, str]:
    """One workflow id per partition."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < settings.partitions:
        wf = f"wf-{i}"
        found.setdefault(workflow_partition(settings, wf), wf)
        i += 1
    return found


def _text(redis: Redis, stream: str) -> TextEntries:
    return cast(TextEntries, redis.xrange(stream))


def _raw(redis: Redis, stream: str) -> RawEntries:
    return cast(RawEntries, redis.xrange(stream))


def _run(settings: Settings, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(args.handler(settings, args))


_clock = iter(range(1_000_000, 10_000_000))


def _next_id() -> str:
    """Entry ids that grow across streams too: two streams written in one millisecond
    both get ``ms-0``, so tests that check the merge name their ids."""
    return f"{next(_clock)}-0"


def _commit(redis: Redis, settings: Settings, wf: str, event: str, *, auto: bool = False) -> str:
    """What the service's commit writes: the result in the workflow's partition stream."""
    stream = output_stream_of(settings, workflow_partition(settings, wf))
    fields = {"workflow_id": wf, "event_id": event, "status": "ok", "route": "[]"}
    return str(redis.xadd(stream, fields, id="*" if auto else _next_id()))  # type: ignore[arg-type]


def test_tail_merges_every_partition_output_stream(
    redis: Redis, cluster_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """tail shows the newest results of all partitions, by entry id, each workflow's in
    commit order; --workflow reads that workflow's partition only."""
    s = cluster_settings
    wfs = _workflows(s)
    assert len({output_stream_of(s, n) for n in wfs}) == 4
    written = [(wfs[i % 4], f"e{i}") for i in range(12)]
    for wf, event in written:
        _commit(redis, s, wf, event)
    assert redis.xlen(s.output_stream) == 0  # nothing in ctxd:out on a cluster

    assert _run(s, "tail", "--json", "--last", "8") == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["workflow_id"], r["event_id"]) for r in shown] == written[-8:]

    assert _run(s, "tail", "--json", "--workflow", wfs[2], "--last", "2") == 0
    mine = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event_id"] for r in mine] == ["e6", "e10"]


def test_a_follow_starts_after_every_streams_newest_entry(
    redis: Redis, cluster_settings: Settings
) -> None:
    """tail's starting point: each stream's own newest id, also for streams none of
    whose entries made the merged --last cut (else a follow would print their history)."""
    s = cluster_settings
    wfs = _workflows(s)
    last: dict[str, str] = {}
    for i in range(12):
        wf = wfs[i // 3]  # partition 0's entries first, partition 3's last
        last[output_stream_of(s, workflow_partition(s, wf))] = _commit(redis, s, wf, f"e{i}")
    recent = newest(redis, output_streams(s), 2)
    assert [r.event_id for r in recent.entries] == ["e10", "e11"]
    assert recent.cursors == last
    follower = Follower(redis, recent.cursors, poll_interval=0.01)
    assert follower.read(block_ms=20) == []
    _commit(redis, s, wfs[0], "new")
    assert [r.event_id for r in follower.read(block_ms=1000)] == ["new"]


@pytest.mark.parametrize("per_stream", [False, True], ids=["one-xread", "per-stream"])
def test_follower_reads_new_entries_of_every_stream(
    redis: Redis, cluster_settings: Settings, per_stream: bool
) -> None:
    """A follow reads what arrives after its cursors in all streams, in each stream's
    order, and moves the cursors; one blocking XREAD or one XREAD per stream."""
    s = cluster_settings
    wfs = _workflows(s)
    before = _commit(redis, s, wfs[0], "old", auto=True)
    cursors = dict.fromkeys(output_streams(s), "0-0")
    cursors[output_stream_of(s, workflow_partition(s, wfs[0]))] = before
    follower = Follower(redis, cursors, per_stream=per_stream, poll_interval=0.01)
    written = [(wfs[i % 4], f"n{i}") for i in range(8)]
    ids = [_commit(redis, s, wf, event, auto=True) for wf, event in written]
    got = follower.read(block_ms=1000)
    # Ids of different streams may tie (one millisecond): only each workflow's order holds.
    assert sorted((r.workflow_id, r.event_id) for r in got) == sorted(written)
    for wf in wfs.values():
        assert [r.event_id for r in got if r.workflow_id == wf] == [
            e for w, e in written if w == wf
        ]
    assert follower.cursors[output_stream_of(s, workflow_partition(s, wfs[3]))] == ids[7]
    assert follower.read(block_ms=30) == []  # nothing new: bounded wait, then empty

    # A blocked read wakes up for an entry written meanwhile (in a partition's stream).
    def later() -> None:
        _commit(redis, s, wfs[1], "late", auto=True)

    writer = threading.Timer(0.1, later)
    writer.start()
    try:
        woke = follower.read(block_ms=5000)
    finally:
        writer.join()
    assert [(r.workflow_id, r.event_id) for r in woke] == [(wfs[1], "late")]


def _dead_letter(redis: Redis, stream: str, wf: str, **extra: str) -> str:
    fields = {
        "workflow_id": wf,
        "content": "x",
        "reason": "poison",
        "error": "boom",
        "attempts": "5",
        "source_id": "1700000000000-7",
        **extra,
    }
    return str(redis.xadd(stream, fields, id=_next_id()))  # type: ignore[arg-type]


def test_dlq_list_and_status_cover_every_partition_and_the_shared_dlq(
    redis: Redis, cluster_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """dlq list merges the partitions' DLQs and ctxd:dlq, naming each entry's stream;
    status sums the lengths and shows them per partition."""
    s = cluster_settings
    wfs = _workflows(s)
    first = _dead_letter(redis, dlq_stream_of(s, 1), wfs[1])
    second = _dead_letter(redis, s.dlq_stream, "pool-request")
    third = _dead_letter(redis, dlq_stream_of(s, 3), wfs[3])
    _commit(redis, s, wfs[0], "a")
    _commit(redis, s, wfs[3], "b")
    _commit(redis, s, wfs[3], "c")

    assert _run(s, "dlq", "list", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["dlq"], r["id"]) for r in rows] == [
        (dlq_stream_of(s, 1), first),
        (s.dlq_stream, second),
        (dlq_stream_of(s, 3), third),
    ]
    assert _run(s, "dlq", "list", "--count", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        f"{dlq_stream_of(s, 1)}/{first}",
        f"{s.dlq_stream}/{second}",
    ]

    doc = collect_status(redis, s)
    assert (doc["output_length"], doc["output_streams"], doc["dlq_size"]) == (3, 4, 3)
    per_partition = {p["partition"]: p for p in doc["partitions"]}  # type: ignore[attr-defined]
    assert per_partition[3]["output_length"] == 2
    assert per_partition[3]["dlq_size"] == 1
    assert _run(s, "status", "--scan-limit", "0") == 0
    assert "output: 3 entries in 4 partition streams   dlq: 3 entries" in capsys.readouterr().out


def test_dlq_replay_from_partition_dlqs_appends_to_the_input(
    redis: Redis,
    raw_redis: Redis,
    cluster_settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Replay finds a bare id in whichever DLQ holds it (or takes STREAM/ID), appends the
    original fields to ctxd:in with a fixed event_id, deletes the dead letter; bytes that
    are not UTF-8 come back as they were; a cut copy stays; an unknown id is reported."""
    s = cluster_settings
    wfs = _workflows(s)
    plain = _dead_letter(redis, dlq_stream_of(s, 2), wfs[2])
    keyed = _dead_letter(redis, dlq_stream_of(s, 0), wfs[0], event_id="ev-9")
    raw_redis.xadd(
        dlq_stream_of(s, 1),
        {b"workflow_id": wfs[1].encode(), b"content": b"\xff\xfe", b"reason": b"poison"},
    )
    binary = _raw(raw_redis, dlq_stream_of(s, 1))[-1][0].decode()
    cut = _dead_letter(redis, dlq_stream_of(s, 3), wfs[3], ctxd_cut="content: 9 bytes")

    code = _run(
        s, "dlq", "replay", "--id", plain, "--id", f"{dlq_stream_of(s, 0)}/{keyed}", "--id", binary
    )
    assert code == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"{dlq_stream_of(s, 2)}/{plain} -> {s.input_stream}" in out
    replayed = [fields for _, fields in _raw(raw_redis, s.input_stream)]
    assert replayed == [
        {b"workflow_id": wfs[2].encode(), b"content": b"x", b"event_id": b"1700000000000-7"},
        {b"workflow_id": wfs[0].encode(), b"content": b"x", b"event_id": b"ev-9"},
        # the bytes as they were; no source_id, so the event_id is the DLQ entry's id
        {b"workflow_id": wfs[1].encode(), b"content": b"\xff\xfe", b"event_id": binary.encode()},
    ]
    for stream in (dlq_stream_of(s, 0), dlq_stream_of(s, 1), dlq_stream_of(s, 2)):
        assert redis.xlen(stream) == 0

    assert _run(s, "dlq", "replay", "--id", cut, "--id", "1-1") == 1
    out = capsys.readouterr().out
    assert "its DLQ copy was cut" in out
    assert "1-1: not in any DLQ" in out
    assert redis.xlen(dlq_stream_of(s, 3)) == 1


def test_dlq_replay_again_after_a_failed_delete_appends_the_same_event(
    redis: Redis, redis_url: str, cluster_settings: Settings, prefix: str
) -> None:
    """Non-atomic but idempotent: when the delete fails after the append (here Redis
    refuses XDEL to an ACL user; a crash does the same), the dead letter stays, and a
    second replay appends it again with the same event_id (the service's dedupe makes it
    a duplicate) and then deletes it."""
    s = cluster_settings
    wfs = _workflows(s)
    dead = _dead_letter(redis, dlq_stream_of(s, 2), wfs[2])
    ref = DeadLetterRef(dlq_stream_of(s, 2), dead)
    user, password = f"{prefix}-noxdel", "pw-noxdel"
    redis.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=[f"{prefix}:*"],
        commands=["+@all", "-xdel"],
    )
    limited = Redis.from_url(redis_url, username=user, password=password, decode_responses=True)
    try:
        with pytest.raises(NoPermissionError):
            replay_across_slots(limited, s, ref)
    finally:
        limited.close()
        redis.acl_deluser(user)
    assert redis.xlen(ref.stream) == 1  # appended, not deleted
    replay_across_slots(redis, s, ref)
    events = [fields["event_id"] for _, fields in _text(redis, s.input_stream)]
    assert events == ["1700000000000-7", "1700000000000-7"]
    assert redis.xlen(ref.stream) == 0
    assert replay_across_slots(redis, s, ref) == ""  # gone: nothing appended


def test_dlq_replay_all_takes_every_dlq_in_id_order(
    redis: Redis, cluster_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    s = cluster_settings
    wfs = _workflows(s)
    written = [
        _dead_letter(redis, dlq_stream_of(s, n % 4), wfs[n % 4], event_id=f"e{n}") for n in range(6)
    ]
    assert len(written) == 6
    assert _run(s, "dlq", "replay", "--all") == 0
    assert [f["event_id"] for _, f in _text(redis, s.input_stream)] == [f"e{n}" for n in range(6)]
    assert all(redis.xlen(stream) == 0 for stream in dead_letter_streams(s))
    assert len(capsys.readouterr().out.splitlines()) == 6


def test_resume_waits_for_its_result_in_the_workflows_partition(
    redis: Redis, cluster_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """resume appends a control entry and waits for the output that answers it: on a
    cluster that output is in the workflow's partition stream, not ctxd:out."""
    s = cluster_settings
    wf = _workflows(s)[3]
    answered: list[int] = []
    command = threading.Thread(
        target=lambda: answered.append(_run(s, "resume", wf, "--wait", "20"))
    )
    start = str(redis.xadd(s.input_stream, {"init": "1"}))
    command.start()
    try:
        reply = cast(TextRead, redis.xread({s.input_stream: start}, block=15_000))
        entry_id = reply[0][1][0][0]  # the control entry
        stream = output_stream_of(s, workflow_partition(s, wf))
        redis.xadd(stream, {"workflow_id": wf, "source_id": entry_id, "status": "ok"})
    finally:
        command.join(timeout=30)
    assert answered == [0]
    assert "resume: status=ok" in capsys.readouterr().out
