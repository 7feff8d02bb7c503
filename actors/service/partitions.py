"""Partitions of the input and their exclusive owners.

The router (:mod:`actors.service.router`) appends every valid input entry to the partition
stream ``{prefix}:part:{n}``, ``n = crc32(workflow_id) % CTXD_PARTITIONS``, so all the
entries of one workflow are in one partition, in input order. Each partition is owned
by at most one live instance at a time: the owner holds the partition's lease
(``{prefix}:lease:part:{n}``, with a fencing token) and is the only one that reads the
partition, runs its workflows, writes their checkpoints and commits their outputs — the
commit script and the checkpoint writes check the lease first.

Which instance should own which partition is rendezvous hashing over the live
instances (heartbeats), so every instance computes the same answer without talking to
the others, and a joining or leaving instance moves only its share of partitions.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

from actors.config import Settings

__all__ = [
    "OWNER_CONSUMER",
    "assignment",
    "attempts_key",
    "dlq_stream_of",
    "lease_key",
    "output_stream_of",
    "partition_key",
    "partition_lease",
    "partition_of",
    "partition_stream",
    "partition_tag",
    "workflow_partition",
]

OWNER_CONSUMER = "owner"
"""The consumer name every owner uses on a partition: a new owner inherits the PEL."""


def partition_of(workflow_id: str, partitions: int) -> int:
    """The partition of a workflow (stable across processes and hosts)."""
    return zlib.crc32(workflow_id.encode()) % partitions


def workflow_partition(settings: Settings, workflow_id: str) -> int:
    """The partition of a workflow under ``settings.partitions``."""
    return partition_of(workflow_id, settings.partitions)


def partition_tag(settings: Settings, n: int) -> str:
    """The common start of partition ``n``'s keys: ``{prefix}:{p<n>}``.

    The braces are a Redis Cluster hash tag: every key of one partition hashes to one
    slot (so its commit script may touch them all), and the partitions spread over the
    cluster's shards. On a single node the tag is only part of the name.
    """
    return f"{settings.stream_prefix}:{{p{n}}}"


def partition_key(settings: Settings, n: int, *parts: str) -> str:
    """A key of partition ``n``: ``partition_key(s, 3, "attempts")`` → ``ctxd:{p3}:attempts``."""
    return ":".join((partition_tag(settings, n), *parts))


def partition_stream(settings: Settings, n: int) -> str:
    """The stream of partition ``n``: ``{prefix}:{p<n>}:stream``."""
    return partition_key(settings, n, "stream")


def partition_lease(settings: Settings, n: int) -> tuple[str, str]:
    """Partition ``n``'s lease key and fence counter key (in the partition's slot)."""
    return partition_key(settings, n, "lease"), partition_key(settings, n, "fence")


def attempts_key(settings: Settings, n: int) -> str:
    """Partition ``n``'s run attempts and last errors per entry (a hash, ``{p<n>}:attempts``)."""
    return partition_key(settings, n, "attempts")


def output_stream_of(settings: Settings, n: int) -> str:
    """Where partition ``n``'s results go.

    ``ctxd:out`` on a single node (the contract); on a Redis Cluster each partition has
    its own output stream in its own slot, ``{prefix}:{p<n>}:out``, so the commit that
    appends the result stays one atomic script (docs/operations.md, "Reading results
    from a cluster").
    """
    return partition_key(settings, n, "out") if settings.cluster else settings.output_stream


def dlq_stream_of(settings: Settings, n: int) -> str:
    """Partition ``n``'s dead letters: ``ctxd:dlq``, or ``{prefix}:{p<n>}:dlq`` on a cluster."""
    return partition_key(settings, n, "dlq") if settings.cluster else settings.dlq_stream


def lease_key(settings: Settings, name: str) -> tuple[str, str]:
    """The lease key and its fence counter key (``name`` e.g. ``part:3`` or ``router``)."""
    return settings.key("lease", name), settings.key("fence", name)


def _weight(instance: str, n: int) -> bytes:
    return hashlib.blake2b(f"{instance}/{n}".encode(), digest_size=8).digest()


def assignment(instances: Sequence[str], partitions: int) -> dict[int, str]:
    """Rendezvous hashing: the instance that should own each partition."""
    if not instances:
        return {}
    return {n: max(instances, key=lambda i: _weight(i, n)) for n in range(partitions)}
