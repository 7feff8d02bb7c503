"""Property: the REAL compiled workflow ends every event within the iteration budget.

The graph runs with the in-memory checkpointer, the local handlers and a dispatch whose
``health()`` reports random breaker states and error figures (changing on every call,
as live figures do), over random texts and priorities.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langgraph.checkpoint.memory import InMemorySaver

from graph.checkpointer import strict_serializer
from graph.features import AnalyzerPolicy
from graph.json_values import as_list
from graph.state import JSON
from graph.work import DispatchHealth, LocalDispatch, WorkKind
from graph.workflow import build_contextual_workflow, run_events

_STATES = ("closed", "open", "half_open", "forced_open")
_KINDS = tuple(k.value for k in WorkKind)

_words = st.sampled_from(
    [
        "latency",
        "deploy",
        "market",
        "customers",
        "pricing",
        "competitor",
        "rival",
        "api",
        "database",
        "outage",
        "revenue",
        "the",
        "a",
        "and",
        "analysis",
        "findings",
        "evidence",
        "conclusion",
        "recommendation",
        "therefore",
        "because",
        "growth",
        "kubernetes",
        "cache",
        "share",
        "product",
        "launch",
        "incident",
        "error",
    ]
)
_text = st.one_of(
    st.text(min_size=1, max_size=300),
    st.lists(_words, min_size=1, max_size=80).map(" ".join),
)
_health = st.builds(
    DispatchHealth,
    breaker_states=st.fixed_dictionaries({k: st.sampled_from(_STATES) for k in _KINDS}),
    error_rate=st.floats(0.0, 1.0),
    performance_score=st.floats(0.0, 1.0),
)


class RandomHealthDispatch:
    """Local work; health() draws the next of a random sequence of figures."""

    def __init__(self, figures: list[DispatchHealth], seed: int) -> None:
        self._inner = LocalDispatch()
        self._figures = figures
        self._rng = random.Random(seed)

    async def __call__(self, kind: WorkKind, payload: Mapping[str, JSON]) -> dict[str, JSON]:
        return await self._inner(kind, payload)

    def health(self) -> DispatchHealth:
        return self._rng.choice(self._figures)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    texts=st.lists(_text.filter(lambda t: t.strip() != ""), min_size=1, max_size=4),
    figures=st.lists(_health, min_size=1, max_size=5),
    priorities=st.lists(st.sampled_from(["low", "standard", "high", "critical"]), min_size=4),
    seed=st.integers(0, 2**16),
    budget=st.integers(2, 14),
)
def test_every_event_of_the_real_workflow_ends_within_the_budget(
    texts: list[str],
    figures: list[DispatchHealth],
    priorities: list[str],
    seed: int,
    budget: int,
) -> None:
    policy = AnalyzerPolicy(iteration_budget=budget)
    graph = build_contextual_workflow(
        RandomHealthDispatch(figures, seed),
        InMemorySaver(serde=strict_serializer()),
        policy=policy,
    )
    events: list[dict[str, JSON]] = [
        {"event_id": f"e{i}", "content": text, "priority": priorities[i]}
        for i, text in enumerate(texts)
    ]

    async def run_all() -> None:
        # One run with every event, then one run per event on the same thread.
        batch = await run_events(graph, "batch", events, iteration_budget=budget)
        singles: dict[str, Mapping[str, JSON]] = {}
        for event in events:
            run = await run_events(graph, "single", [event], iteration_budget=budget)
            singles.update(run.results)
        for results in (batch.results, singles):
            assert set(results) == {e["event_id"] for e in events}
            for result in results.values():
                route = as_list(result["route"])
                assert 1 <= route.count("context_analyzer") <= budget
                assert route[0] == "context_analyzer"
                assert route[-1] == "context_analyzer"
                assert result["status"] in ("ok", "escalated", "fallback", "error")

    anyio.run(run_all)
