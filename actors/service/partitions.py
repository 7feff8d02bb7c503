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
    "lease_key",
    "partition_of",
    "partition_stream",
]

OWNER_CONSUMER = "owner"
"""The consumer name every owner uses on a partition: a new owner inherits the PEL."""


def partition_of(workflow_id: str, partitions: int) -> int:
    """The partition of a workflow (stable across processes and hosts)."""
    return zlib.crc32(workflow_id.encode()) % partitions


def partition_stream(settings: Settings, n: int) -> str:
    """The stream of partition ``n``."""
    return settings.key("part", str(n))


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
