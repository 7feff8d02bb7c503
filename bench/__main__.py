"""``python -m bench`` (``make bench``): the seed-style pipeline against ``ctxd run``.

Starts the embedded Redis Stack (or uses ``--redis-url``) and an OTLP receiver, runs
every scenario on a fresh stream prefix, prints progress once a second, then the
figures and each target ratio with PASS/MISS, and writes everything to
``bench/results/bench-<time>.json``. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.footprint import FootprintResult, run_footprint
from bench.procs import REPO, bench_redis
from bench.report import ratios, render
from bench.scenarios import Scenario, ScenarioResult, run_scenario

__all__ = ["ALL_SCENARIOS", "main"]

ALL_SCENARIOS = (
    "baseline-drain",
    "ctxd-drain-1",
    "ctxd-drain-2",
    "ctxd-drain-1-traced",
    "baseline-steady",
    "ctxd-steady-1",
    "ctxd-steady-2",
    "footprint",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure ctxd against the seed-style pipeline (ainvoke per event, "
        "AsyncRedisSaver, durability sync) on the same workload and the same embedded Redis.",
    )
    parser.add_argument("--events", type=int, default=10_000, help="backlog size (10000)")
    parser.add_argument("--workflows", type=int, default=100, help="workflows (100)")
    parser.add_argument(
        "--baseline-events",
        type=int,
        default=1_000,
        help="the seed-style pipeline drains the first N events of the same backlog "
        "(1000; it runs at ~24 events/s, so 10k would take ~7 min; rates are comparable)",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="steady arrivals/s (50)")
    parser.add_argument("--duration", type=float, default=20.0, help="steady seconds (20)")
    parser.add_argument(
        "--footprint-events",
        type=int,
        default=3000,
        help="footprint: N, measured after N and 2N events (3000)",
    )
    parser.add_argument(
        "--footprint-workflows", type=int, default=10, help="footprint: workflows (10)"
    )
    parser.add_argument(
        "--footprint-rate", type=float, default=20.0, help="footprint: events/s (20)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of: {', '.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run for CI smoke tests (200 events, 10 workflows, 2 s steady; "
        "footprint only when named in --scenarios)",
    )
    parser.add_argument(
        "--redis-url", help="use this Redis (needs RedisJSON + RediSearch), not the embedded one"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the ctxd processes, e.g. CTXD_CONCURRENCY=64 "
        "(repeatable); recorded in the JSON",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy (pip install py-spy) to the first process of every scenario "
        "and print the top entries; figures of a profiled run are not comparable",
    )
    parser.add_argument("--output", type=Path, help="JSON path (bench/results/bench-<time>.json)")
    return parser


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    steady_events = max(1, round(args.rate * args.duration))
    known = {
        "baseline-drain": Scenario(
            "baseline-drain",
            "baseline",
            "drain",
            1,
            min(args.baseline_events, args.events),
            args.workflows,
        ),
        "ctxd-drain-1": Scenario("ctxd-drain-1", "ctxd", "drain", 1, args.events, args.workflows),
        "ctxd-drain-2": Scenario("ctxd-drain-2", "ctxd", "drain", 2, args.events, args.workflows),
        "ctxd-drain-1-traced": Scenario(
            "ctxd-drain-1-traced", "ctxd", "drain", 1, args.events, args.workflows, traced=True
        ),
        "baseline-steady": Scenario(
            "baseline-steady",
            "baseline",
            "steady",
            1,
            steady_events,
            args.workflows,
            rate=args.rate,
        ),
        "ctxd-steady-1": Scenario(
            "ctxd-steady-1", "ctxd", "steady", 1, steady_events, args.workflows, rate=args.rate
        ),
        "ctxd-steady-2": Scenario(
            "ctxd-steady-2", "ctxd", "steady", 2, steady_events, args.workflows, rate=args.rate
        ),
    }
    env = dict(item.split("=", 1) for item in args.env)
    for name, scenario in known.items():
        if scenario.pipeline == "ctxd":
            known[name] = replace(scenario, env=env)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip() and n != "footprint"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}: expected some of {list(known)}")
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when it ran (targets missed are reported, not fatal)."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.events, args.workflows, args.baseline_events = 200, 10, 40
        args.rate, args.duration = 20.0, 2.0
    scenarios = _scenarios(args)
    names = [n.strip() for n in args.scenarios.split(",")]
    footprint_wanted = "footprint" in names and not (
        args.quick and args.scenarios == ",".join(ALL_SCENARIOS)
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = REPO / "bench" / "results"
    logs = results_dir / f"bench-{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    output = args.output or results_dir / f"bench-{stamp}.json"
    from telemetry.testing import OtlpReceiver

    print(
        f"bench: {args.events} events over {args.workflows} workflows (seed-style baseline: "
        f"first {min(args.baseline_events, args.events)} of them); steady {args.rate:g}/s for "
        f"{args.duration:g} s; logs in {logs}",
        flush=True,
    )
    results: list[ScenarioResult] = []
    footprint: FootprintResult | None = None
    with (
        tempfile.TemporaryDirectory(prefix="ctxd-bench-") as tmp,
        bench_redis(args.redis_url, Path(tmp) / "redis") as redis_url,
        OtlpReceiver(accept_metrics=True) as receiver,
    ):
        for scenario in scenarios:
            print(f"{scenario.name}: starting {scenario.processes} process(es)", flush=True)
            receiver.clear()
            result = run_scenario(
                scenario,
                redis_url=redis_url,
                workdir=logs,
                otlp_endpoint=receiver.grpc_endpoint,
                spans_received=lambda: len(receiver.spans()),
                progress=lambda line: print(line, flush=True),
                profile=args.profile,
            )
            results.append(result)
            print(
                f"{scenario.name}: {result.events_per_s:.1f} events/s, p99 "
                f"{result.latency_ms['p99']:.0f} ms",
                flush=True,
            )
        if footprint_wanted:
            # A Redis of its own (used_memory is ctxd's alone), unless --redis-url is given.
            print("footprint: starting 1 process", flush=True)
            with bench_redis(args.redis_url, Path(tmp) / "redis-footprint") as own_url:
                footprint = run_footprint(
                    own_url,
                    logs,
                    events=args.footprint_events,
                    workflows=args.footprint_workflows,
                    rate=args.footprint_rate,
                    env=dict(item.split("=", 1) for item in args.env),
                    progress=lambda line: print(line, flush=True),
                )
    checks = ratios(results, rate=args.rate)
    baseline_events = min(args.baseline_events, args.events)
    document: dict[str, object] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "config": {
            "events": args.events,
            "workflows": args.workflows,
            "baseline_events": baseline_events,
            "rate": args.rate,
            "duration": args.duration,
            "quick": args.quick,
            "ctxd_env": dict(item.split("=", 1) for item in args.env),
        },
        "scenarios": {r.name: r.as_json() for r in results},
        "ratios": checks,
    }
    if footprint is not None:
        document["footprint"] = footprint.as_json()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if results:
        print(render(results, checks, baseline_events=baseline_events))
    if footprint is not None:
        print(footprint.render())
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
