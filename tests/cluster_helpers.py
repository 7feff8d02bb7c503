"""The local Redis Cluster of the tests (it lives in ``bench.local_cluster``, which the
cluster benchmark starts too)."""

from __future__ import annotations

from bench.local_cluster import (
    ClusterNode,
    LocalCluster,
    free_cluster_port,
    open_local_cluster,
    read_cluster_outputs,
)

__all__ = [
    "ClusterNode",
    "LocalCluster",
    "free_cluster_port",
    "open_local_cluster",
    "read_cluster_outputs",
]
