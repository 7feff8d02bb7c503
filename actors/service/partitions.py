"""Partitions of the input and their exclusive owners.

Each partition's owner (:mod:`actors.service.router`) moves every valid input entry to the
partition stream ``{prefix}:part:{n}``, ``n = crc32(workflow_id) % CTXD_PARTITIONS``, so all the
entries of one workflow are in one partition, in input order. Each partition is owned
by at most one live instance at a time: the owner holds the partition's lease
(``{prefix}:lease:part:{n}``, with a fencing token) and is the only one that reads the
partition, runs its workflows, writes their checkpoints and commits their outputs — the
commit script and the checkpoint writes check the lease first.

Which instance should own which partition is a pure function of the live instances
(heartbeats) and the partition count, :func:`assignment`, so every instance computes the
same map without talking to the others: rendezvous hashing, capped so that every instance
owns ⌊P/K⌋ or ⌈P/K⌉ partitions, and a joining or leaving instance moves few of them.
"""

from __future__ import annotations

import functools
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
    """A lease key outside the partitions and its fence counter key (``router``: the retired
    router lease, actors/service/router_upgrade.py)."""
    return settings.key("lease", name), settings.key("fence", name)


def _weight(instance: str, n: int) -> bytes:
    return hashlib.blake2b(f"{instance}/{n}".encode(), digest_size=8).digest()


def assignment(instances: Sequence[str], partitions: int) -> dict[int, str]:
    """The instance that should own each partition: balanced rendezvous hashing.

    Plain rendezvous hashing (each partition to the instance of highest weight
    ``blake2b(instance/partition)``) moves only a leaving or joining instance's share,
    but its shares are uneven: with 8 instances and 16 partitions the busiest owned about
    twice its share and 69% of name sets left an instance idle. So the weights stay the
    preference, and every instance is capped: all (instance, partition) pairs are taken
    in descending weight, and a pair is kept when its partition has no owner yet and its
    instance is below its cap. Every instance may own ``⌊P/K⌋``; the first ``P mod K``
    instances to reach that take one more, so every instance owns ``⌊P/K⌋`` or ``⌈P/K⌉``
    (the greedy always places every partition: an instance with room left at the end had
    room when its pair with any unplaced partition came up).

    The rule is the stable matching of partitions and instances under one shared weight,
    so a join or leave changes only what the new weights and caps force: measured over
    random instance names (tests/actors/service/test_assignment.py), a join moves about
    1.1-2x the ideal ``P/(K+1)`` partitions, a leave about the leaver's share plus a few.

    Deterministic (a function of the set of names and ``partitions`` only, whatever the
    order or repetition of ``instances``), and cached: the ownership loop asks every few
    hundred milliseconds, the live set rarely changes.
    """
    return dict(_balanced(tuple(sorted(set(instances))), partitions))


@functools.lru_cache(maxsize=32)
def _balanced(instances: tuple[str, ...], partitions: int) -> tuple[tuple[int, str], ...]:
    if not instances or partitions <= 0:
        return ()
    floor, extra = divmod(partitions, len(instances))
    pairs = sorted(
        ((_weight(i, n), n, i) for i in instances for n in range(partitions)), reverse=True
    )
    owner: dict[int, str] = {}
    owned = dict.fromkeys(instances, 0)
    extras_taken = 0
    for _, n, i in pairs:
        if n in owner:
            continue
        count = owned[i]
        if count < floor or (count == floor and extras_taken < extra):
            owner[n] = i
            owned[i] = count + 1
            if count == floor:
                extras_taken += 1
            if len(owner) == partitions:
                break
    return tuple(sorted(owner.items()))
