"""The routing engine decides exactly as the seed's EnterpriseRoutingEngine.

The table's expected decisions are chosen by hand; every score is checked against
``_reference``, an independent transcription of the seed with its numbers written out,
and about a dozen cases also against scores computed by hand.
"""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from graph.routing import (
    RoutingContext,
    RoutingDecision,
    RoutingEngine,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
HQ = RoutingDecision.HIGH_QUALITY_PATH
SQ = RoutingDecision.STANDARD_QUALITY_PATH
RETRY = RoutingDecision.RETRY_WITH_IMPROVEMENTS
BREAKER = RoutingDecision.CIRCUIT_BREAKER_MODE
FALLBACK = RoutingDecision.FALLBACK_PROCESSING
ESCALATE = RoutingDecision.ESCALATION_REQUIRED
ORDER = (HQ, SQ, RETRY, BREAKER, FALLBACK, ESCALATE)


def below(x: float) -> float:
    """The float just below ``x``: one step across a ``>=`` threshold."""
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    """The float just above ``x``: one step across a ``<=`` threshold."""
    return math.nextafter(x, math.inf)


@dataclass(frozen=True, kw_only=True)
class Case:
    """One row of the routing table."""

    name: str
    expected: RoutingDecision
    q: float
    p: float
    e: float
    r: float
    priority: str = "standard"
    remaining: float | None = None  # seconds from NOW to the deadline; None: no deadline
    max_cost: float | None = 100.0  # None: the key is missing
    iteration: int = 0
    # Hand-computed scores after constraints, in declaration order.
    literal: tuple[float, float, float, float, float, float] | None = None

    def context(self) -> RoutingContext:
        deadline = None if self.remaining is None else NOW + timedelta(seconds=self.remaining)
        costs = {} if self.max_cost is None else {"max_cost": self.max_cost}
        return RoutingContext(
            quality_score=self.q,
            performance_score=self.p,
            error_rate=self.e,
            resource_utilization=self.r,
            business_priority=self.priority,
            execution_deadline=deadline,
            cost_constraints=costs,
        )


@dataclass(frozen=True)
class Reference:
    raw: list[float]
    scores: list[float]
    viable: list[RoutingDecision]
    decision: RoutingDecision
    margin: float


def _reference(case: Case) -> Reference:
    """The seed's engine, transcribed with its literal numbers (decision order as ORDER)."""
    q, p, e, r = case.q, case.p, case.e, case.r
    critical = case.priority == "critical"
    raw = [
        q * 0.4 + p * 0.3 + (1.0 - e) * 0.2 + (1.0 - r) * 0.1,
        min(q * 1.2, 1.0) * 0.4 + min(p * 1.1, 1.0) * 0.3 + (1.0 - min(e * 2.0, 1.0)) * 0.3,
        (0.8 - q) * 0.5 + p * 0.3 + (1.0 - e) * 0.2 if case.iteration < 3 else 0.0,
        e * 0.6 + (1.0 - p) * 0.3 + r * 0.1,
        (1.0 - q) * 0.4 + (1.0 - p) * 0.3 + e * 0.3,
        0.9 if critical and (q < 0.6 or e > 0.4) else 0.0,
    ]
    s = list(raw)
    if critical:
        s[0] *= 1.3
        s[5] *= 1.2
        s[4] *= 0.5
    if case.remaining is not None and case.remaining < 600:
        s[1] *= 1.2
        s[2] *= 0.3
    if (case.max_cost if case.max_cost is not None else math.inf) < 50.0:
        s[0] *= 0.7
        s[4] *= 1.2
    ok = [
        q >= 0.9 and p >= 0.8 and e <= 0.05,
        q >= 0.7 and p >= 0.6 and e <= 0.15,
        True,
        e >= 0.5 or p <= 0.3,
        True,
        True,
    ]
    viable = [i for i in range(6) if ok[i]]
    best = viable[0]
    for i in viable:
        if s[i] > s[best]:
            best = i
    others = [s[i] for i in viable if i != best]
    return Reference(
        raw=raw,
        scores=s,
        viable=[ORDER[i] for i in viable],
        decision=ORDER[best],
        margin=s[best] - max(others),
    )


# Shared inputs, so that neighbouring rows differ in one thing only.
HQ_EDGES: dict[str, Any] = {"q": 0.9, "p": 0.8, "e": 0.05, "r": 0.0, "priority": "critical"}
SQ_EDGES: dict[str, Any] = {"q": 0.7, "p": 0.6, "e": 0.15, "r": 0.0}
RETRYABLE: dict[str, Any] = {"q": 0.3, "p": 0.6, "e": 0.2, "r": 0.0}
BREAKER_VS_FALLBACK: dict[str, Any] = {"q": 0.5, "p": 0.5, "e": 0.5, "r": 1.0}
CRITICAL_BREAKER: dict[str, Any] = {"q": 0.6, "p": 0.3, "e": 0.4, "r": 0.0, "iteration": 3}
ESCALATION: dict[str, Any] = {"p": 0.5, "r": 0.5, "priority": "critical"}
HQ_HEAVY: dict[str, Any] = {"q": 0.9, "p": 0.8, "e": 0.05, "r": 1.0, "priority": "critical"}
TIE_HQ_SQ: dict[str, Any] = {"q": 1.0, "p": 1.0, "e": 0.05, "r": 0.2}


def case(name: str, **kwargs: Any) -> Case:
    return Case(name=name, **kwargs)


TABLE = [
    # --- each decision wins ----------------------------------------------------------
    case(
        "high-quality-wins-when-critical",
        expected=HQ,
        q=0.95, p=0.9, e=0.02, r=0.2, priority="critical",
        # HQ (.38+.27+.196+.08)*1.3; SQ .4+.297+.288; RT -.075+.27+.196;
        # CB .012+.03+.02; FB (.02+.03+.006)*.5
        literal=(1.2038, 0.985, 0.391, 0.062, 0.028, 0.0),
    ),
    case(
        "standard-quality-wins",
        expected=SQ,
        q=0.8, p=0.7, e=0.1, r=0.3,
        # HQ .32+.21+.18+.07; SQ .384+.231+.24; RT 0+.21+.18; CB .06+.09+.03; FB .08+.09+.03
        literal=(0.78, 0.855, 0.39, 0.18, 0.2, 0.0),
    ),
    case(
        "retry-wins",
        expected=RETRY,
        **RETRYABLE,
        # HQ .12+.18+.16+.1; SQ .144+.198+.18; RT .25+.18+.16; CB .12+.12+0; FB .28+.12+.06
        literal=(0.56, 0.522, 0.59, 0.24, 0.46, 0.0),
    ),
    case(
        "circuit-breaker-wins",
        expected=BREAKER,
        q=0.5, p=0.2, e=0.8, r=0.9,
        # HQ .2+.06+.04+.01; SQ .24+.066+0; RT .15+.06+.04; CB .48+.24+.09; FB .2+.24+.24
        literal=(0.31, 0.306, 0.25, 0.81, 0.68, 0.0),
    ),
    case(
        "fallback-wins-after-retries-run-out",
        expected=FALLBACK,
        q=0.1, p=0.4, e=0.3, r=0.5, iteration=3,
        # HQ .04+.12+.14+.05; SQ .048+.132+.12; RT 0; CB .18+.18+.05; FB .36+.18+.09
        literal=(0.35, 0.3, 0.0, 0.41, 0.63, 0.0),
    ),
    case(
        "fallback-beats-retry-on-score",
        expected=FALLBACK,
        q=0.1, p=0.4, e=0.3, r=0.5,
    ),
    case(
        "escalation-wins",
        expected=ESCALATE,
        q=0.2, p=0.5, e=0.1, r=0.0, priority="critical",
        # HQ (.08+.15+.18+.1)*1.3; SQ .096+.165+.24; RT .3+.15+.18; CB .06+.15+0;
        # FB (.32+.15+.03)*.5; ES .9*1.2
        literal=(0.663, 0.501, 0.63, 0.21, 0.25, 1.08),
    ),
    # --- ties go to the earlier decision -------------------------------------------------
    case(
        "tie-high-quality-before-standard",
        expected=HQ,
        **TIE_HQ_SQ,
        # HQ .4+.3+.19+.08; SQ .4+.3+.27; RT -.1+.3+.19; CB .03+0+.02; FB 0+0+.015
        literal=(0.97, 0.97, 0.39, 0.05, 0.015, 0.0),
    ),
    case("tie-breaker-before-fallback", expected=BREAKER, q=0.0, p=0.2, e=1.0, r=1.0),
    case("tie-retry-before-fallback", expected=RETRY, q=0.0, p=0.25, e=0.1, r=0.0),
    case("tie-three-way-retry-first", expected=RETRY, q=0.4, p=0.65, e=0.5, r=0.9),
    # The seed's operand order makes high quality 0.9999999999999999, standard 1.0.
    case("float-order-standard-beats-high", expected=SQ, q=1.0, p=1.0, e=0.0, r=0.0),
    # --- high-quality thresholds: q >= .9, p >= .8, e <= .05 -----------------------------
    case("hq-all-at-edges", expected=HQ, **HQ_EDGES),
    case("hq-quality-just-below", expected=SQ, **{**HQ_EDGES, "q": below(0.9)}),
    case("hq-performance-just-below", expected=SQ, **{**HQ_EDGES, "p": below(0.8)}),
    case("hq-error-just-above", expected=SQ, **{**HQ_EDGES, "e": above(0.05)}),
    # --- standard-quality thresholds: q >= .7, p >= .6, e <= .15 --------------------------
    case("sq-all-at-edges", expected=SQ, **SQ_EDGES),
    case("sq-quality-just-below", expected=RETRY, **{**SQ_EDGES, "q": below(0.7)}),
    case("sq-performance-just-below", expected=RETRY, **{**SQ_EDGES, "p": below(0.6)}),
    case("sq-error-just-above", expected=RETRY, **{**SQ_EDGES, "e": above(0.15)}),
    # --- circuit-breaker thresholds: e >= .5 or p <= .3 ---------------------------------
    case(
        "breaker-error-at-edge",
        expected=BREAKER,
        **BREAKER_VS_FALLBACK,
        # HQ .2+.15+.1+0; SQ .24+.165+0; RT .15+.15+.1; CB .3+.15+.1; FB .2+.15+.15
        literal=(0.45, 0.405, 0.4, 0.55, 0.5, 0.0),
    ),
    case(
        "breaker-error-just-below",
        expected=FALLBACK,
        **{**BREAKER_VS_FALLBACK, "e": below(0.5)},
    ),
    case("breaker-performance-at-edge", expected=BREAKER, q=0.6, p=0.3, e=0.3, r=1.0),
    case(
        "breaker-performance-just-above", expected=FALLBACK, q=0.6, p=above(0.3), e=0.3, r=1.0
    ),
    # --- retry stops at iteration 3 ------------------------------------------------------
    case("retry-at-iteration-2", expected=RETRY, **RETRYABLE, iteration=2),
    case("retry-gone-at-iteration-3", expected=FALLBACK, **RETRYABLE, iteration=3),
    # --- escalation: critical and (q < .6 or e > .4) ---------------------------------------
    case("escalation-not-at-edges", expected=RETRY, q=0.6, e=0.4, **ESCALATION),
    case("escalation-quality-just-below", expected=ESCALATE, q=below(0.6), e=0.4, **ESCALATION),
    case("escalation-error-just-above", expected=ESCALATE, q=0.6, e=above(0.4), **ESCALATION),
    case(
        "escalation-needs-critical",
        expected=RETRY,
        q=0.2, p=0.5, e=0.1, r=0.0, priority="high",
    ),
    case(
        "escalation-on-errors-alone",
        expected=ESCALATE,
        q=0.95, p=0.9, e=0.45, r=0.0, priority="critical",
    ),
    # --- critical priority: HQ x1.3, escalation x1.2, fallback x0.5 -----------------------
    case(
        "standard-priority-keeps-fallback",
        expected=FALLBACK,
        **CRITICAL_BREAKER,
        # HQ .24+.09+.12+.1; SQ .288+.099+.06; RT 0; CB .24+.21+0; FB .16+.21+.12
        literal=(0.55, 0.447, 0.0, 0.45, 0.49, 0.0),
    ),
    case(
        "critical-halves-fallback",
        expected=BREAKER,
        **CRITICAL_BREAKER,
        priority="critical",
        literal=(0.715, 0.447, 0.0, 0.45, 0.245, 0.0),
    ),
    case("critical-boost-needed-for-hq", expected=SQ, **{**HQ_EDGES, "priority": "standard"}),
    case("low-priority-is-standard", expected=SQ, **{**HQ_EDGES, "priority": "low"}),
    # --- deadline pressure (< 600 s): standard x1.2, retry x0.3 ----------------------------
    case(
        "deadline-pressure-cuts-retry",
        expected=FALLBACK,
        **RETRYABLE,
        remaining=300.0,
        literal=(0.56, 0.6264, 0.177, 0.24, 0.46, 0.0),
    ),
    case("deadline-past", expected=FALLBACK, **RETRYABLE, remaining=-60.0),
    case("deadline-exactly-600s-no-pressure", expected=RETRY, **RETRYABLE, remaining=600.0),
    case("deadline-just-under-600s", expected=FALLBACK, **RETRYABLE, remaining=599.999999),
    case("deadline-far", expected=RETRY, **RETRYABLE, remaining=3600.0),
    case("deadline-boosts-standard-over-hq", expected=SQ, **HQ_HEAVY, remaining=60.0),
    case("no-deadline-hq-keeps-lead", expected=HQ, **HQ_HEAVY),
    # --- low budget (max_cost < 50): HQ x0.7, fallback x1.2 --------------------------------
    case(
        "low-budget-boosts-fallback",
        expected=FALLBACK,
        **BREAKER_VS_FALLBACK,
        max_cost=49.99,
        literal=(0.315, 0.405, 0.4, 0.55, 0.6, 0.0),
    ),
    case("max-cost-exactly-50-not-low", expected=BREAKER, **BREAKER_VS_FALLBACK, max_cost=50.0),
    case("max-cost-missing-is-unlimited", expected=BREAKER, **BREAKER_VS_FALLBACK, max_cost=None),
    case("max-cost-zero", expected=FALLBACK, **BREAKER_VS_FALLBACK, max_cost=0.0),
    case("low-budget-after-critical-boost", expected=SQ, **HQ_EDGES, max_cost=10.0),
    case("low-budget-breaks-tie", expected=SQ, **TIE_HQ_SQ, max_cost=20.0),
    # --- all three constraints at once ----------------------------------------------------
    case(
        "all-constraints",
        expected=ESCALATE,
        q=0.2, p=0.5, e=0.1, r=0.0, priority="critical", remaining=60.0, max_cost=10.0,
        # HQ .51*1.3*.7; SQ .501*1.2; RT .63*.3; CB .21; FB .5*.5*1.2; ES .9*1.2
        literal=(0.4641, 0.6012, 0.189, 0.21, 0.3, 1.08),
    ),
]  # fmt: skip


def test_table_is_large_and_covers_every_winner() -> None:
    """The table holds at least 40 rows and every decision wins in some row."""
    assert len(TABLE) >= 40
    assert len({row.name for row in TABLE}) == len(TABLE)
    assert {row.expected for row in TABLE} == set(RoutingDecision)


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.name)
def test_routing_table(row: Case) -> None:
    """Decision, scores before and after constraints, viable set and margin are the seed's."""
    ref = _reference(row)
    assert ref.decision is row.expected, "the independent reference disagrees with the table"

    outcome = RoutingEngine().decide(row.context(), iteration_count=row.iteration, now=NOW)

    assert outcome.decision is row.expected
    assert outcome.reason == "score_max"
    assert tuple(outcome.scores) == ORDER
    assert tuple(outcome.raw_scores) == ORDER
    assert [outcome.raw_scores[d] for d in ORDER] == pytest.approx(ref.raw, rel=0, abs=1e-9)
    assert [outcome.scores[d] for d in ORDER] == pytest.approx(ref.scores, rel=0, abs=1e-9)
    assert list(outcome.viable) == ref.viable
    assert outcome.margin == pytest.approx(ref.margin, rel=0, abs=1e-9)
    if row.literal is not None:
        assert [outcome.scores[d] for d in ORDER] == pytest.approx(row.literal, rel=0, abs=1e-9)


def test_ties_have_zero_margin() -> None:
    """On a tie the earlier decision wins with a margin of exactly 0."""
    context = RoutingContext(1.0, 1.0, 0.05, 0.2)
    outcome = RoutingEngine().decide(context, now=NOW)
    assert outcome.scores[HQ] == outcome.scores[SQ]
    assert outcome.decision is HQ
    assert outcome.margin == 0.0


def test_decision_enum_values_and_order() -> None:
    """The six values are the seed's strings, in the seed's order."""
    assert [d.value for d in RoutingDecision] == [
        "high_quality_path",
        "standard_quality_path",
        "retry_with_improvements",
        "circuit_breaker_mode",
        "fallback_processing",
        "escalation_required",
    ]
    assert isinstance(HQ, str)
    assert HQ == "high_quality_path"
    assert RoutingDecision("fallback_processing") is FALLBACK


# --- the context ----------------------------------------------------------------------


def test_context_defaults_are_the_seeds() -> None:
    """Missing values default as in the seed's _extract_routing_context."""
    context = RoutingContext(0.4)
    assert context.performance_score == 0.5
    assert context.error_rate == 0.0
    assert context.resource_utilization == 0.0
    assert context.business_priority == "standard"
    assert context.execution_deadline is None
    assert dict(context.cost_constraints) == {"max_cost": 100.0}


def test_context_field_order_is_the_seeds() -> None:
    """The seven fields can be given positionally in the seed's order."""
    deadline = NOW + timedelta(hours=1)
    context = RoutingContext(0.1, 0.2, 0.3, 0.4, "high", deadline, {"max_cost": 5.0})
    assert (
        context.quality_score,
        context.performance_score,
        context.error_rate,
        context.resource_utilization,
        context.business_priority,
        context.execution_deadline,
        dict(context.cost_constraints),
    ) == (0.1, 0.2, 0.3, 0.4, "high", deadline, {"max_cost": 5.0})


def test_context_is_immutable_and_copies_costs() -> None:
    """The context is frozen and later changes to the caller's dict do not leak in."""
    costs = {"max_cost": 10.0}
    context = RoutingContext(0.5, cost_constraints=costs)
    costs["max_cost"] = 99.0
    assert context.cost_constraints["max_cost"] == 10.0
    with pytest.raises(FrozenInstanceError):
        context.quality_score = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        context.cost_constraints["max_cost"] = 1.0  # type: ignore[index]


def test_naive_deadline_is_rejected() -> None:
    """A deadline without a timezone is a ValueError saying so."""
    with pytest.raises(ValueError, match="timezone-aware"):
        RoutingContext(0.5, execution_deadline=datetime(2025, 1, 1, 12, 0))


def test_deadline_in_another_timezone_counts_the_same() -> None:
    """An aware deadline in any zone is compared as an instant."""
    plus_two = timezone(timedelta(hours=2))
    deadline = (NOW + timedelta(seconds=300)).astimezone(plus_two)
    context = RoutingContext(0.3, 0.6, 0.2, execution_deadline=deadline)
    assert RoutingEngine().decide(context, now=NOW).decision is FALLBACK


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"business_priority": "urgent"}, ValueError, "business_priority must be one of"),
        ({"business_priority": "Critical"}, ValueError, "'Critical'"),
        ({"error_rate": math.nan}, ValueError, "error_rate must be a finite number"),
        ({"performance_score": math.inf}, ValueError, "performance_score must be a finite"),
        ({"resource_utilization": "0.5"}, TypeError, "resource_utilization must be a number"),
        ({"cost_constraints": {"max_cost": math.nan}}, ValueError, "must not be NaN"),
        ({"cost_constraints": {"max_cost": -1.0}}, ValueError, "must be >= 0"),
        ({"cost_constraints": {"max_cost": "10"}}, TypeError, "must be a number"),
    ],
)
def test_bad_context_values_are_rejected(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    """Values that would silently mislead the engine are refused with a clear message."""
    with pytest.raises(error, match=match):
        RoutingContext(0.5, **kwargs)  # type: ignore[arg-type]


def test_infinite_max_cost_is_allowed() -> None:
    """An infinite budget is meaningful: no low-budget constraint."""
    context = RoutingContext(0.5, 0.5, 0.5, 1.0, cost_constraints={"max_cost": math.inf})
    assert RoutingEngine().decide(context, now=NOW).decision is BREAKER


# --- deciding -------------------------------------------------------------------------


def test_now_defaults_to_the_current_time() -> None:
    """Without ``now``, the deadline is measured from the real current time."""
    engine = RoutingEngine()
    future = RoutingContext(0.3, 0.6, 0.2, execution_deadline=datetime.now(UTC) + timedelta(days=1))
    past = RoutingContext(0.3, 0.6, 0.2, execution_deadline=datetime.now(UTC) - timedelta(days=1))
    assert engine.decide(future).decision is RETRY
    assert engine.decide(past).decision is FALLBACK


def test_naive_now_is_rejected() -> None:
    """``now`` without a timezone is a ValueError."""
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        RoutingEngine().decide(RoutingContext(0.5), now=datetime(2025, 1, 1))


def test_negative_iteration_count_is_rejected() -> None:
    """A negative pass count is a caller bug, not a reason to retry."""
    with pytest.raises(ValueError, match="iteration_count must be an integer >= 0, got -1"):
        RoutingEngine().decide(RoutingContext(0.5), iteration_count=-1, now=NOW)


def test_outcome_is_immutable() -> None:
    """The outcome and its score mappings cannot be changed by whoever records them."""
    outcome = RoutingEngine().decide(RoutingContext(0.5), now=NOW)
    with pytest.raises(FrozenInstanceError):
        outcome.decision = HQ  # type: ignore[misc]
    with pytest.raises(TypeError):
        outcome.scores[HQ] = 2.0  # type: ignore[index]


def test_the_engine_is_pure() -> None:
    """The same inputs give equal outcomes; nothing accumulates between calls."""
    engine = RoutingEngine()
    context = RoutingContext(0.3, 0.6, 0.2, execution_deadline=NOW + timedelta(seconds=30))
    assert engine.decide(context, now=NOW) == engine.decide(context, now=NOW)
    assert not hasattr(engine, "routing_history")


def test_single_viable_decision_would_have_zero_margin_but_three_are_always_viable() -> None:
    """Retry, fallback and escalation are always viable, so the reason is score_max."""
    outcome = RoutingEngine().decide(RoutingContext(0.0, 0.5, 0.4), iteration_count=9, now=NOW)
    assert outcome.viable == (RETRY, FALLBACK, ESCALATE)
    assert outcome.reason == "score_max"


# --- configuration --------------------------------------------------------------------
