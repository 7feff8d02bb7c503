"""``python -m bench.cluster``: ctxd on a Redis Cluster — the scale-out guide's numbers.

Starts a local Redis Cluster (3 masters + 3 replicas from the Redis Stack binaries,
modules loaded) unless ``--cluster-url`` names one, and a standalone Redis Stack as the
checkpoint store (a cluster cannot answer state history). For each instance count it
drains one backlog appended straight to the partition streams (the producer API) and
prints:

- events/s, and per instance;
- Redis commands per event: ``INFO commandstats`` summed over the masters, which counts
  the commands Lua scripts run as well as the clients' own, and the top commands;
- Redis CPU per event: ``used_cpu_sys + used_cpu_user`` summed over the masters;
- each ``ctxd run``'s CPU per event and peak RSS.

It writes everything to ``bench/results/cluster-<time>.json``. docs/operations.md
("Scale-out guide") quotes a run of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from redis import Redis
from redis.cluster import RedisCluster

from actors.config import Settings
from actors.producer import Producer
from actors.service.partitions import output_stream_of
from bench.local_cluster import open_local_cluster
from bench.procs import REPO, MeasuredProcess, bench_redis, cpu_seconds, peak_rss_mb
from bench.workload import make_events

__all__ = ["ClusterRun", "main"]

_STALL_SECONDS = 60.0


@dataclass
class ClusterRun:
    """One drain on the cluster with ``instances`` ``ctxd run`` processes."""

    instances: int
    events: int
    seconds: float = 0.0
    events_per_second: float = 0.0
    per_instance: float = 0.0
    redis_commands_per_event: float = 0.0
    redis_cpu_ms_per_event: float = 0.0
    ctxd_cpu_ms_per_event: float = 0.0
    peak_rss_mb: float = 0.0
    top_commands: dict[str, float] = field(default_factory=dict)
    masters: int = 0


def _masters(cluster: RedisCluster) -> list[Redis]:
    nodes = cluster.get_primaries()  # type: ignore[no-untyped-call]
    return [Redis(host=n.host, port=n.port, decode_responses=True) for n in nodes]


def _server_totals(masters: Sequence[Redis]) -> tuple[Counter[str], float]:
    """Calls per command and CPU seconds, summed over the masters."""
    calls: Counter[str] = Counter()
    cpu = 0.0
    for node in masters:
        stats = node.info("commandstats")
        for name, row in stats.items():
            calls[name.removeprefix("cmdstat_")] += int(row["calls"])
        info = node.info("cpu")
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return calls, cpu


def _outputs(cluster: RedisCluster, layout: Settings) -> int:
    return sum(int(cluster.xlen(output_stream_of(layout, n))) for n in range(layout.partitions))


def _drain(
    cluster_url: str,
    checkpoint_url: str,
    instances: int,
    events: int,
    workflows: int,
    workdir: Path,
    progress: bool,
) -> ClusterRun:
    prefix = f"b{uuid.uuid4().hex[:8]}"
    layout = Settings(stream_prefix=prefix, cluster=True)
    env = {
        "CTXD_REDIS_URL": cluster_url,
        "CTXD_CHECKPOINT_URL": checkpoint_url,
        "CTXD_STREAM_PREFIX": prefix,
        "CTXD_STATE_DIR": str(workdir / "state"),
        "CTXD_LOG_FORMAT": "json",
    }
    processes = [
        MeasuredProcess(
            ["actors.app.cli", "run"],
            {**env, "CTXD_INSTANCE": f"{prefix}-{n}"},
            ready_text="ctxd is running",
            log_path=workdir / f"{prefix}-{n}.log",
        )
        for n in range(instances)
    ]
    run = ClusterRun(instances=instances, events=events)
    client = RedisCluster.from_url(cluster_url, decode_responses=True)
    masters = _masters(client)
    try:
        for process in processes:
            process.wait_ready()
        producer = Producer(client, prefix=prefix, record_ttl=60.0)  # type: ignore[arg-type]
        for fields in make_events(events, workflows, prefix):
            producer.send_fields(fields)
        calls0, cpu0 = _server_totals(masters)
        cpu_before = [cpu_seconds(p.pid) for p in processes]
        started = time.monotonic()
        last, last_change = 0, started
        while (done := _outputs(client, layout)) < events:
            now = time.monotonic()
            if done != last:
                last, last_change = done, now
            elif now - last_change > _STALL_SECONDS:
                raise RuntimeError(f"stalled at {done}/{events}:\n{processes[0].tail()}")
            if progress:
                print(f"  {instances} instance(s): {done}/{events}", file=sys.stderr)
            time.sleep(1.0)
        run.seconds = time.monotonic() - started
        calls1, cpu1 = _server_totals(masters)
        spent = [cpu_seconds(p.pid) - b for p, b in zip(processes, cpu_before, strict=True)]
        run.peak_rss_mb = max(peak_rss_mb(p.pid) for p in processes)
    finally:
        for process in processes:
            process.stop()
        client.close()
        for node in masters:
            node.close()
    delta = calls1 - calls0
    run.masters = len(masters)
    run.events_per_second = round(events / run.seconds, 1)
    run.per_instance = round(run.events_per_second / instances, 1)
    run.redis_commands_per_event = round(sum(delta.values()) / events, 1)
    run.redis_cpu_ms_per_event = round((cpu1 - cpu0) * 1000 / events, 3)
    run.ctxd_cpu_ms_per_event = round(sum(spent) * 1000 / events, 2)
    run.top_commands = {name: round(n / events, 2) for name, n in delta.most_common(8)}
    return run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Drain a backlog with 1..N ctxd instances on a Redis Cluster and print "
        "events/s, Redis commands and Redis CPU per event (docs/operations.md).",
    )
    parser.add_argument("--cluster-url", help="an existing cluster (default: start one)")
    parser.add_argument("--checkpoint-url", help="checkpoint store (default: embedded)")
    parser.add_argument("--events", type=int, default=2000, help="backlog per run (2000)")
    parser.add_argument("--workflows", type=int, default=200, help="workflows (200)")
    parser.add_argument(
        "--instances", type=int, nargs="+", default=[1, 2], help="instance counts (1 2)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    runs: list[ClusterRun] = []
    with tempfile.TemporaryDirectory(prefix="ctxd-bench-cluster-") as tmp:
        workdir = Path(tmp)
        with bench_redis(args.checkpoint_url, workdir / "checkpoints") as checkpoint_url:
            for count in args.instances:
                with contextlib.ExitStack() as stack:
                    url = (
                        args.cluster_url
                        or stack.enter_context(open_local_cluster(workdir / f"cluster-{count}")).url
                    )
                    run = _drain(
                        url,
                        checkpoint_url,
                        count,
                        args.events,
                        args.workflows,
                        workdir,
                        progress=not args.quiet,
                    )
                    runs.append(run)
    print(f"{'instances':>9} {'events/s':>9} {'per inst':>9} {'cmds/ev':>8} "
          f"{'redis ms/ev':>11} {'ctxd ms/ev':>10} {'RSS MB':>7}")  # fmt: skip
    for r in runs:
        print(
            f"{r.instances:>9} {r.events_per_second:>9} {r.per_instance:>9} "
            f"{r.redis_commands_per_event:>8} {r.redis_cpu_ms_per_event:>11} "
            f"{r.ctxd_cpu_ms_per_event:>10} {r.peak_rss_mb:>7.0f}"
        )
        print(f"          top commands per event: {r.top_commands}")
    out = REPO / "bench" / "results" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    print(f"written {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
