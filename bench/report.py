"""Target ratios (issue #7) and the printed table."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bench.scenarios import ScenarioResult

__all__ = ["ratios", "render"]


def _check(
    name: str, value: float | None, target: float, *, at_most: bool = False
) -> dict[str, object]:
    if value is None or math.isnan(value):
        verdict = "N/A"
    elif at_most:
        verdict = "PASS" if value <= target else "MISS"
    else:
        verdict = "PASS" if value >= target else "MISS"
    return {
        "name": name,
        "value": None if value is None or math.isnan(value) else round(value, 3),
        "target": f"{'<=' if at_most else '>='} {target:g}",
        "verdict": verdict,
    }


def ratios(results: Sequence[ScenarioResult], *, rate: float) -> list[dict[str, object]]:
    """Each target of issue #7 with its measured value and PASS/MISS (N/A if not run)."""
    by_name = {r.name: r for r in results}

    def eps(name: str) -> float | None:
        r = by_name.get(name)
        return r.events_per_s if r else None

    def ratio(a: str, b: str) -> float | None:
        x, y = eps(a), eps(b)
        return x / y if x is not None and y else None

    steady = by_name.get("ctxd-steady-1")
    rss = [mb for r in results if r.pipeline == "ctxd" for mb in r.peak_rss_mb]
    return [
        _check(
            "ctxd 1 process / seed-style, drain events/s",
            ratio("ctxd-drain-1", "baseline-drain"),
            10,
        ),
        _check(
            "ctxd 2 processes / 1 process, drain events/s",
            ratio("ctxd-drain-2", "ctxd-drain-1"),
            1.7,
        ),
        _check(
            f"ctxd 1 process p99 latency at steady {rate:g}/s (ms)",
            steady.latency_ms["p99"] if steady else None,
            100,
            at_most=True,
        ),
        _check("peak RSS per ctxd process (MB)", max(rss) if rss else None, 300, at_most=True),
        _check(
            "tracing on / off, drain events/s", ratio("ctxd-drain-1-traced", "ctxd-drain-1"), 0.9
        ),
    ]


def render(
    results: Sequence[ScenarioResult], checks: Sequence[dict[str, object]], *, baseline_events: int
) -> str:
    """The figures as a text table, then the targets."""
    head = (
        f"{'scenario':<22}{'procs':>5}{'events':>8}{'events/s':>10}{'p50 ms':>9}"
        f"{'p95 ms':>9}{'p99 ms':>9}{'CPU s/1k':>10}{'peak RSS MB':>14}"
    )
    lines = ["", head, "-" * len(head)]
    for r in results:
        rss = "/".join(f"{mb:.0f}" for mb in r.peak_rss_mb)
        lines.append(
            f"{r.name:<22}{r.processes:>5}{r.events:>8}{r.events_per_s:>10.1f}"
            f"{r.latency_ms['p50']:>9.0f}{r.latency_ms['p95']:>9.0f}{r.latency_ms['p99']:>9.0f}"
            f"{r.cpu_s_per_1000:>10.2f}{rss:>14}"
        )
        if r.spans_received is not None:
            lines.append(f"{'':<22}  (OTLP receiver got {r.spans_received} spans)")
    lines.append(
        f"seed-style 'drain' = the first {baseline_events} events of the same backlog; "
        "latency = output entry time - input entry time (Redis server clock)."
    )
    lines += ["", f"{'target':<52}{'value':>10}  {'target':<8} verdict", "-" * 80]
    for c in checks:
        value = "-" if c["value"] is None else f"{c['value']:.2f}"
        lines.append(f"{c['name']!s:<52}{value:>10}  {c['target']!s:<8} {c['verdict']}")
    return "\n".join(lines)
