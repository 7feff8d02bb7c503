"""The decision engine: the seed's ``EnterpriseRoutingEngine``, pure and configurable.

:class:`RoutingEngine` scores the six :class:`RoutingDecision` values for a
:class:`RoutingContext`, applies the business constraints (critical priority, deadline
pressure, low budget), keeps the decisions whose thresholds the context meets, and
picks the best of those, first in declaration order on a tie. Every number is the
seed's by default and lives in :class:`RoutingConfig`. The engine logs nothing and
keeps no history: the caller wraps :meth:`RoutingEngine.decide` in a span and records
the :class:`RoutingOutcome`.

Raw scores, with q, p, e, r the context's quality, performance, error rate and
resource utilization (seed defaults in brackets)::

    high_quality_path      q*quality[.4] + p*performance[.3] + (1-e)*reliability[.2]
                           + (1-r)*headroom[.1]
    standard_quality_path  min(q*quality_boost[1.2], 1)*quality[.4]
                           + min(p*performance_boost[1.1], 1)*performance[.3]
                           + (1 - min(e*error_amplifier[2], 1))*reliability[.3]
    retry_with_improvements   while iteration_count < max_iterations[3]:
                           (target_quality[.8] - q)*improvement[.5] + p*performance[.3]
                           + (1-e)*reliability[.2]; otherwise 0
    circuit_breaker_mode   e*error_rate[.6] + (1-p)*slowness[.3] + r*utilization[.1]
    fallback_processing    (1-q)*quality_gap[.4] + (1-p)*slowness[.3] + e*error_rate[.3]
    escalation_required    score[.9] if priority is "critical" and
                           (q < quality_below[.6] or e > error_rate_above[.4]); otherwise 0

The numbers live in :mod:`graph.routing.config`: the ``[routing]`` table of the TOML
config file, read with :meth:`RoutingConfig.from_mapping`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from graph.routing.config import QualityGate, RoutingConfig

__all__ = [
    "PRIORITIES",
    "RoutingContext",
    "RoutingDecision",
    "RoutingEngine",
    "RoutingOutcome",
]

PRIORITIES: Final = ("low", "standard", "high", "critical")
_CRITICAL: Final = "critical"


class RoutingDecision(StrEnum):
    """The six routes of the seed, in the seed's order (the tie-break order)."""

    HIGH_QUALITY_PATH = "high_quality_path"
    STANDARD_QUALITY_PATH = "standard_quality_path"
    RETRY_WITH_IMPROVEMENTS = "retry_with_improvements"
    CIRCUIT_BREAKER_MODE = "circuit_breaker_mode"
    FALLBACK_PROCESSING = "fallback_processing"
    ESCALATION_REQUIRED = "escalation_required"


# --- the context -------------------------------------------------------------------------


def _default_costs() -> Mapping[str, float]:
    return MappingProxyType({"max_cost": 100.0})


def _is_naive(moment: datetime) -> bool:
    return moment.tzinfo is None or moment.tzinfo.utcoffset(moment) is None


def _finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RoutingContext:
    """What the engine knows when it decides: the seed's routing context.

    The defaults are those the seed's ``_extract_routing_context`` falls back to for a
    state that lacks the value: no execution metrics (performance 0.5), no errors
    (error rate 0.0), no memory figure (utilization 0.0), priority "standard", no
    deadline and a budget of 100. The quality score has no default: it is always
    computed from the analysis (see :func:`graph.quality.quality_score`).

    Attributes:
        quality_score: quality of the current analysis, usually 0 to 1.
        performance_score: recent performance, usually 0 to 1.
        error_rate: errors per iteration; may exceed 1, as in the seed.
        resource_utilization: memory use as a fraction; may exceed 1, as in the seed.
        business_priority: one of ``low``, ``standard``, ``high``, ``critical``.
        execution_deadline: when the work is due, timezone-aware; ``None`` for none.
        cost_constraints: budget figures; the engine reads ``max_cost`` (missing means
            no limit). Stored as a read-only copy.

    Raises:
        TypeError: a number is not a real number, or the deadline is not a datetime.
        ValueError: a number is NaN or infinite, the priority is unknown, the deadline
            is naive, or ``max_cost`` is NaN or negative.
    """

    quality_score: float
    performance_score: float = 0.5
    error_rate: float = 0.0
    resource_utilization: float = 0.0
    business_priority: str = "standard"
    execution_deadline: datetime | None = None
    # A read-only mapping cannot be hashed; equality still compares it.
    cost_constraints: Mapping[str, float] = field(default_factory=_default_costs, hash=False)

    def __post_init__(self) -> None:
        for name in ("quality_score", "performance_score", "error_rate", "resource_utilization"):
            object.__setattr__(self, name, _finite_float(name, getattr(self, name)))
        if self.business_priority not in PRIORITIES:
            raise ValueError(
                f"business_priority must be one of {', '.join(PRIORITIES)}, "
                f"got {self.business_priority!r}"
            )
        deadline = self.execution_deadline
        if deadline is not None:
            if not isinstance(deadline, datetime):
                raise TypeError(f"execution_deadline must be a datetime, got {deadline!r}")
            if _is_naive(deadline):
                raise ValueError(
                    f"execution_deadline must be timezone-aware, got the naive {deadline!r}; "
                    "attach a timezone (e.g. datetime.UTC)"
                )
        object.__setattr__(self, "cost_constraints", _frozen_costs(self.cost_constraints))


def _frozen_costs(costs: Mapping[str, float]) -> Mapping[str, float]:
    if not isinstance(costs, Mapping):
        raise TypeError(f"cost_constraints must be a mapping, got {costs!r}")
    frozen: dict[str, float] = {}
    for key, value in costs.items():
        if not isinstance(key, str):
            raise TypeError(f"cost_constraints keys must be strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"cost_constraints[{key!r}] must be a number, got {value!r}")
        # Infinity is a meaningful budget ("no limit"); NaN would defeat every comparison.
        if math.isnan(value):
            raise ValueError(f"cost_constraints[{key!r}] must not be NaN")
        frozen[key] = float(value)
    if frozen.get("max_cost", 0.0) < 0.0:
        raise ValueError(f"cost_constraints['max_cost'] must be >= 0, got {frozen['max_cost']!r}")
    return MappingProxyType(frozen)


# --- deciding ----------------------------------------------------------------------------

_HQ: Final = RoutingDecision.HIGH_QUALITY_PATH
_SQ: Final = RoutingDecision.STANDARD_QUALITY_PATH
_RETRY: Final = RoutingDecision.RETRY_WITH_IMPROVEMENTS
_BREAKER: Final = RoutingDecision.CIRCUIT_BREAKER_MODE
_FALLBACK: Final = RoutingDecision.FALLBACK_PROCESSING
_ESCALATE: Final = RoutingDecision.ESCALATION_REQUIRED


@dataclass(frozen=True)
class RoutingOutcome:
    """What the engine decided, and everything needed to explain it.

    Attributes:
        decision: the chosen route.
        scores: every decision's score after the business constraints, in
            declaration order.
        raw_scores: every decision's score before the business constraints.
        viable: the decisions whose thresholds the context met, in declaration order.
        reason: ``"score_max"`` when the best viable score won; ``"fallback"`` when no
            decision was viable and the engine fell back to ``fallback_processing``.
        margin: the chosen score minus the best other viable score; 0.0 when nothing
            else was viable (or on a fallback). A tie gives 0.0.
    """

    decision: RoutingDecision
    scores: Mapping[RoutingDecision, float] = field(hash=False)
    raw_scores: Mapping[RoutingDecision, float] = field(hash=False)
    viable: tuple[RoutingDecision, ...]
    reason: str
    margin: float


class RoutingEngine:
    """Chooses a route for a routing context; pure, so one engine serves every task.

    Args:
        config: the numbers to decide with; the seed's when omitted.
    """

    def __init__(self, config: RoutingConfig | None = None) -> None:
        self._config = config if config is not None else RoutingConfig()

    @property
    def config(self) -> RoutingConfig:
        """The numbers this engine decides with."""
        return self._config

    def decide(
        self,
        context: RoutingContext,
        *,
        iteration_count: int = 0,
        now: datetime | None = None,
    ) -> RoutingOutcome:
        """Score, constrain, filter and choose, as the seed's engine does.

        Args:
            context: what is known about the work.
            iteration_count: passes already made; retrying stops at the configured
                ``max_iterations``.
            now: the moment the deadline is measured from, timezone-aware; the current
                UTC time when omitted.

        Returns:
            The decision with every score, the viable set, the reason and the margin.

        Raises:
            ValueError: ``iteration_count`` is negative or ``now`` is naive.
        """
        if isinstance(iteration_count, bool) or iteration_count < 0:
            raise ValueError(f"iteration_count must be an integer >= 0, got {iteration_count!r}")
        if now is None:
            now = datetime.now(UTC)
        elif _is_naive(now):
            raise ValueError(
                f"now must be timezone-aware, got the naive {now!r}; attach a timezone"
            )
        raw_scores = self._raw_scores(context, iteration_count)
        scores = self._constrain(raw_scores, context, now)
        viable = tuple(decision for decision in RoutingDecision if self._viable(decision, context))
        if not viable:
            # Unreachable with the seed's rules (retry, fallback and escalation are always
            # viable); kept so the contract holds if a gate is ever added to those.
            decision, reason, margin = _FALLBACK, "fallback", 0.0
        else:
            # max() keeps the first of equal scores: ties go to the earlier decision.
            decision = max(viable, key=scores.__getitem__)
            others = [scores[other] for other in viable if other is not decision]
            reason = "score_max"
            margin = scores[decision] - max(others) if others else 0.0
        return RoutingOutcome(
            decision=decision,
            scores=MappingProxyType(scores),
            raw_scores=MappingProxyType(raw_scores),
            viable=viable,
            reason=reason,
            margin=margin,
        )

    def _raw_scores(
        self, context: RoutingContext, iteration_count: int
    ) -> dict[RoutingDecision, float]:
        # Each sum keeps the seed's operand order, so scores agree with it bit for bit
        # (q=p=1, e=r=0 gives 0.9999999999999999 for high quality and 1.0 for standard).
        weights = self._config.weights
        q = context.quality_score
        p = context.performance_score
        e = context.error_rate
        r = context.resource_utilization

        hq = weights.high_quality
        high_quality = (
            q * hq.quality
            + p * hq.performance
            + (1.0 - e) * hq.reliability
            + (1.0 - r) * hq.headroom
        )

        sq = weights.standard_quality
        standard_quality = (
            min(q * sq.quality_boost, 1.0) * sq.quality
            + min(p * sq.performance_boost, 1.0) * sq.performance
            + (1.0 - min(e * sq.error_amplifier, 1.0)) * sq.reliability
        )

        rt = weights.retry
        retry = 0.0
        if iteration_count < rt.max_iterations:
            retry = (
                (rt.target_quality - q) * rt.improvement
                + p * rt.performance
                + (1.0 - e) * rt.reliability
            )

        cb = weights.circuit_breaker
        breaker = e * cb.error_rate + (1.0 - p) * cb.slowness + r * cb.utilization

        fb = weights.fallback
        fallback = (1.0 - q) * fb.quality_gap + (1.0 - p) * fb.slowness + e * fb.error_rate

        esc = weights.escalation
        escalation = 0.0
        if context.business_priority == _CRITICAL and (
            q < esc.quality_below or e > esc.error_rate_above
        ):
            escalation = esc.score

        return {
            _HQ: high_quality,
            _SQ: standard_quality,
            _RETRY: retry,
            _BREAKER: breaker,
            _FALLBACK: fallback,
            _ESCALATE: escalation,
        }

    def _constrain(
        self,
        raw_scores: Mapping[RoutingDecision, float],
        context: RoutingContext,
        now: datetime,
    ) -> dict[RoutingDecision, float]:
        # Applied in the seed's order (critical, deadline, budget): a score hit by two
        # rules is multiplied in that order, which fixes its last bit.
        constraints = self._config.constraints
        scores = dict(raw_scores)
        if context.business_priority == _CRITICAL:
            scores[_HQ] *= constraints.critical.high_quality
            scores[_ESCALATE] *= constraints.critical.escalation
            scores[_FALLBACK] *= constraints.critical.fallback
        if context.execution_deadline is not None:
            remaining = (context.execution_deadline - now).total_seconds()
            if remaining < constraints.deadline_seconds:
                scores[_SQ] *= constraints.deadline.standard_quality
                scores[_RETRY] *= constraints.deadline.retry
        if context.cost_constraints.get("max_cost", math.inf) < constraints.low_budget_max_cost:
            scores[_HQ] *= constraints.low_budget.high_quality
            scores[_FALLBACK] *= constraints.low_budget.fallback
        return scores

    def _viable(self, decision: RoutingDecision, context: RoutingContext) -> bool:
        thresholds = self._config.thresholds
        q = context.quality_score
        p = context.performance_score
        e = context.error_rate
        if decision is _HQ:
            return _passes(thresholds.high_quality, q, p, e)
        if decision is _SQ:
            return _passes(thresholds.standard_quality, q, p, e)
        if decision is _BREAKER:
            gate = thresholds.circuit_breaker
            return e >= gate.error_rate or p <= gate.performance
        return True


def _passes(gate: QualityGate, quality: float, performance: float, error_rate: float) -> bool:
    return (
        quality >= gate.quality
        and performance >= gate.performance
        and error_rate <= gate.error_rate
    )
