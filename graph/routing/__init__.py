"""graph.routing: the seed's decision engine (:mod:`.engine`) and its numbers (:mod:`.config`).

Import from here: ``from graph.routing import RoutingConfig, RoutingEngine``.
"""

from __future__ import annotations

from graph.routing.config import (
    BreakerGate,
    BusinessConstraints,
    CircuitBreakerWeights,
    CriticalFactors,
    DeadlineFactors,
    EscalationRule,
    FallbackWeights,
    HighQualityWeights,
    LowBudgetFactors,
    QualityGate,
    RetryWeights,
    RoutingConfig,
    ScoreWeights,
    StandardQualityWeights,
    Thresholds,
)
from graph.routing.engine import (
    PRIORITIES,
    RoutingContext,
    RoutingDecision,
    RoutingEngine,
    RoutingOutcome,
)

__all__ = [
    "PRIORITIES",
    "BreakerGate",
    "BusinessConstraints",
    "CircuitBreakerWeights",
    "CriticalFactors",
    "DeadlineFactors",
    "EscalationRule",
    "FallbackWeights",
    "HighQualityWeights",
    "LowBudgetFactors",
    "QualityGate",
    "RetryWeights",
    "RoutingConfig",
    "RoutingContext",
    "RoutingDecision",
    "RoutingEngine",
    "RoutingOutcome",
    "ScoreWeights",
    "StandardQualityWeights",
    "Thresholds",
]
