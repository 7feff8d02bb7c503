"""Where the Redis checkpointer keeps state: the service Redis, or ``CTXD_CHECKPOINT_URL``.

On a single Redis, checkpoints live beside the streams and the pointer script checks the
partition lease atomically. On a Redis Cluster they cannot: RediSearch 2.10 has no
coordinator, so each shard's index would see only that shard's checkpoints and state
history, rollback and recovery would answer partly. There checkpoints go to a separate
store (a standalone Redis with RedisJSON and RediSearch), fenced by fencing-token floors
(:mod:`actors.service.checkpoint_floor`). Every command that opens the checkpointer
(``ctxd run``, ``state``, ``history``, ``rollback``, ``forget``…) asks this module which
store it is, so all of them refuse a cluster the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.config import Settings, split_cluster_option
from graph.checkpointer import cluster_store_refusal

__all__ = ["CheckpointStore", "checkpoint_store"]


@dataclass(frozen=True)
class CheckpointStore:
    """The Redis checkpoint store of a deployment.

    Attributes:
        url: its URL.
        setting: the setting the URL came from (``CTXD_CHECKPOINT_URL``, or
            ``CTXD_REDIS_URL`` when checkpoints stay in the service Redis), for messages.
        separate: whether it is another server than the service Redis (then the pointer
            fence is the fencing-token floor, not the atomic lease check).
    """

    url: str
    setting: str
    separate: bool


def checkpoint_store(settings: Settings, service_url: str) -> CheckpointStore:
    """The checkpoint store for ``CTXD_CHECKPOINTER=redis``.

    Args:
        settings: validated settings (``checkpoint_url``, ``cluster``).
        service_url: the service Redis in use (configured, or the embedded one).

    Raises:
        CheckpointStoreError: the service Redis is known to be a cluster and no separate
            store is configured (checkpoints would default to the cluster), or
            ``CTXD_CHECKPOINT_URL`` says ``?cluster=true``. A cluster
            not known from the settings is found when the store is probed
            (:func:`graph.checkpointer.refuse_cluster_store`).
    """
    url = settings.checkpoint_url
    if url is not None:
        url, stated = split_cluster_option(url, name="CTXD_CHECKPOINT_URL")
        if stated:
            raise cluster_store_refusal("CTXD_CHECKPOINT_URL")
    if url is None or url == service_url:
        setting = "CTXD_REDIS_URL" if url is None else "CTXD_CHECKPOINT_URL"
        if settings.cluster:
            raise cluster_store_refusal(setting)
        return CheckpointStore(service_url, setting, separate=False)
    return CheckpointStore(url, "CTXD_CHECKPOINT_URL", separate=True)
