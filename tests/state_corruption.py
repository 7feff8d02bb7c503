"""Corrupting stored checkpoints as an attacker or an older ctxd version would: straight
in the RedisJSON documents of the Redis saver (keys found by scanning for the thread
and checkpoint ids, no key layout assumed), or a pickled write through a saver's API."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from redis import Redis

from graph.history import thread_config


def checkpoint_key(redis: Redis, workflow_id: str, checkpoint_id: str) -> str:
    """The RedisJSON document of one checkpoint, found by scanning (no key layout assumed)."""
    for key in redis.scan_iter(match=f"*{workflow_id}*{checkpoint_id}*", count=1000):
        if redis.type(key) == "ReJSON-RL" and redis.json().get(key, "$.checkpoint.id"):
            return str(key)
    raise AssertionError(f"no checkpoint document for {workflow_id} {checkpoint_id}")


class _Boom:
    """Unpickling this would run a command; the strict serializer must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


class _PickleWriter:
    """A foreign writer's serializer: everything as pickle."""

    def dumps_typed(self, obj: object) -> tuple[str, bytes]:
        return "pickle", pickle.dumps(obj)

    def loads_typed(self, data: tuple[str, bytes]) -> object:  # pragma: no cover
        raise NotImplementedError


async def inject_pickled_write(
    saver: BaseCheckpointSaver[str], workflow_id: str, checkpoint_id: str, marker: Path
) -> None:
    """A pending write whose value is pickled, stored through the saver's own API."""
    strict = saver.serde
    saver.serde = _PickleWriter()
    try:
        config = thread_config(workflow_id, checkpoint_id)
        config["configurable"]["checkpoint_ns"] = ""
        await saver.aput_writes(config, [("window", _Boom(marker))], "attacker-task")
    finally:
        saver.serde = strict


Corrupt = Callable[[Redis, str], None]


def _set(path: str, value: str | int) -> Corrupt:
    def corrupt(redis: Redis, key: str) -> None:
        redis.json().set(key, path, value)

    return corrupt


def _delete(path: str) -> Corrupt:
    def corrupt(redis: Redis, key: str) -> None:
        redis.json().delete(key, path)

    return corrupt


CASES: dict[str, tuple[Corrupt, str]] = {
    "wrong type (window = 5)": (
        _set("$.checkpoint.channel_values.window", 5),
        "window: expected list, got int 5",
    ),
    "missing field": (
        _delete("$.checkpoint.channel_values.window"),
        "window: missing (required)",
    ),
    "wrong type deep inside": (
        _set("$.checkpoint.channel_values.decisions[0].scores", "high"),
        "decisions[0].scores: expected dict, got str",
    ),
    "cannot be decoded at all": (
        _set("$.checkpoint", "garbage"),
        "checkpoint could not be decoded",
    ),
}
