"""A real Redis Cluster for tests: three masters on loopback, the slots split evenly,
stopped by pid afterwards (tests/redis_helpers.py starts each node)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from redis import Redis as SyncRedis
from redis_helpers import free_port, start_redis

_SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _cluster(client: SyncRedis, *args: object) -> object:
    return cast(Any, client).execute_command("CLUSTER", *args)


@contextmanager
def three_masters(data_dir: Path) -> Iterator[list[int]]:
    """Start the cluster and yield its ports once every node says ``cluster_state:ok``."""
    ports = [cluster_port() for _ in range(3)]
    procs = [
        start_redis(
            data_dir / str(port),
            port,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(data_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout",
            "2000",
            modules=False,
        )
        for port in ports
    ]
    try:
        clients = [SyncRedis(port=port) for port in ports]
        share = _SLOTS // 3
        for i, client in enumerate(clients):
            last = _SLOTS - 1 if i == 2 else (i + 1) * share - 1
            _cluster(client, "ADDSLOTSRANGE", i * share, last)
        for client in clients[1:]:
            _cluster(client, "MEET", "127.0.0.1", ports[0])
        deadline = time.monotonic() + 30
        while not all(str(_cluster(c, "INFO")).count("cluster_state:ok") for c in clients):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.1)  # the nodes gossip; nothing to block on
        for client in clients:
            client.close()
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
