"""Routing configuration: the seed's defaults, overrides, and refusals of bad values.

Split from test_routing.py (the decision table); the constants are the same.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from graph.errors import ConfigError
from graph.routing import (
    BreakerGate,
    CriticalFactors,
    QualityGate,
    RetryWeights,
    RoutingConfig,
    RoutingContext,
    RoutingDecision,
    RoutingEngine,
    StandardQualityWeights,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
HQ = RoutingDecision.HIGH_QUALITY_PATH
SQ = RoutingDecision.STANDARD_QUALITY_PATH
RETRY = RoutingDecision.RETRY_WITH_IMPROVEMENTS
BREAKER = RoutingDecision.CIRCUIT_BREAKER_MODE
FALLBACK = RoutingDecision.FALLBACK_PROCESSING


def test_default_config_is_the_seeds() -> None:
    """Every seed number is the default."""
    config = RoutingConfig()
    assert config.thresholds.high_quality == QualityGate(0.9, 0.8, 0.05)
    assert config.thresholds.standard_quality == QualityGate(0.7, 0.6, 0.15)
    assert config.thresholds.circuit_breaker == BreakerGate(0.5, 0.3)
    assert config.weights.standard_quality == StandardQualityWeights(0.4, 0.3, 0.3, 1.2, 1.1, 2.0)
    assert config.weights.retry == RetryWeights(0.5, 0.3, 0.2, 0.8, 3)
    assert config.constraints.critical == CriticalFactors(1.3, 1.2, 0.5)
    assert config.constraints.deadline_seconds == 600.0
    assert config.constraints.low_budget_max_cost == 50.0
    assert RoutingEngine().config == config


def test_empty_mapping_gives_the_defaults() -> None:
    """An empty [routing] table changes nothing."""
    assert RoutingConfig.from_mapping({}) == RoutingConfig()


def test_partial_overrides_keep_the_other_defaults() -> None:
    """Only the keys given change; TOML integers are taken as floats."""
    config = RoutingConfig.from_mapping(
        {
            "thresholds": {"high_quality": {"quality": 0.92}},
            "constraints": {"deadline_seconds": 300, "low_budget": {"fallback": 2}},
            "weights": {"retry": {"max_iterations": 5}, "escalation": {"score": 1}},
        }
    )
    assert config.thresholds.high_quality == QualityGate(0.92, 0.8, 0.05)
    assert config.thresholds.standard_quality == RoutingConfig().thresholds.standard_quality
    assert config.constraints.deadline_seconds == 300.0
    assert isinstance(config.constraints.deadline_seconds, float)
    assert config.constraints.low_budget.fallback == 2.0
    assert config.constraints.low_budget.high_quality == 0.7
    assert config.weights.retry.max_iterations == 5
    assert config.weights.escalation.score == 1.0
    assert config.weights.high_quality == RoutingConfig().weights.high_quality


def test_overrides_change_decisions() -> None:
    """The engine decides with the configured numbers, not the seed's."""
    hq_edges = RoutingContext(0.9, 0.8, 0.05, 0.0, "critical")
    stricter = RoutingEngine(
        RoutingConfig.from_mapping({"thresholds": {"high_quality": {"quality": 0.92}}})
    )
    assert RoutingEngine().decide(hq_edges, now=NOW).decision is HQ
    assert stricter.decide(hq_edges, now=NOW).decision is SQ

    retryable = RoutingContext(0.3, 0.6, 0.2, execution_deadline=NOW + timedelta(seconds=400))
    shorter = RoutingEngine(RoutingConfig.from_mapping({"constraints": {"deadline_seconds": 300}}))
    assert RoutingEngine().decide(retryable, now=NOW).decision is FALLBACK
    assert shorter.decide(retryable, now=NOW).decision is RETRY

    no_retry = RoutingEngine(
        RoutingConfig.from_mapping({"weights": {"retry": {"max_iterations": 0}}})
    )
    outcome = no_retry.decide(RoutingContext(0.3, 0.6, 0.2), now=NOW)
    assert outcome.raw_scores[RETRY] == 0.0
    assert outcome.decision is FALLBACK


def test_weight_overrides_change_scores() -> None:
    """A weight override changes the raw score by exactly its share."""
    config = RoutingConfig.from_mapping({"weights": {"circuit_breaker": {"utilization": 0.5}}})
    outcome = RoutingEngine(config).decide(RoutingContext(0.5, 0.2, 0.8, 0.9), now=NOW)
    # .8*.6 + .8*.3 + .9*.5
    assert outcome.raw_scores[BREAKER] == pytest.approx(1.17, rel=0, abs=1e-9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            {"thresholds": {"high_qualty": {"quality": 0.9}}},
            "routing.thresholds.high_qualty is not a setting; allowed keys in "
            "routing.thresholds: high_quality, standard_quality, circuit_breaker",
            id="unknown-nested-key",
        ),
        pytest.param(
            {"weight": {}},
            "routing.weight is not a setting; allowed keys in routing: "
            "weights, constraints, thresholds",
            id="unknown-top-key",
        ),
        pytest.param(
            {"weights": {"fallback": {"speed": 0.3}}},
            "routing.weights.fallback.speed is not a setting; allowed keys in "
            "routing.weights.fallback: quality_gap, slowness, error_rate",
            id="unknown-leaf-key",
        ),
        pytest.param(
            {"thresholds": {"high_quality": 0.9}},
            "routing.thresholds.high_quality = 0.9 is not a table; expected a table of settings",
            id="number-where-table",
        ),
        pytest.param(
            {"constraints": {"deadline_seconds": "300"}},
            "routing.constraints.deadline_seconds = '300' is not a number; "
            "expected a finite number >= 0",
            id="string-not-number",
        ),
        pytest.param(
            {"weights": {"high_quality": {"quality": True}}},
            "routing.weights.high_quality.quality = True is not a number; "
            "expected a finite number from 0 to 1",
            id="bool-not-number",
        ),
        pytest.param(
            {"thresholds": {"standard_quality": {"quality": {"min": 0.7}}}},
            "routing.thresholds.standard_quality.quality = {'min': 0.7} is not a number",
            id="table-where-number",
        ),
        pytest.param(
            {"constraints": {"low_budget_max_cost": math.inf}},
            "routing.constraints.low_budget_max_cost = inf is not finite; "
            "expected a finite number >= 0",
            id="infinite",
        ),
        pytest.param(
            {"weights": {"retry": {"target_quality": math.nan}}},
            "routing.weights.retry.target_quality = nan is not finite; "
            "expected a finite number from 0 to 1",
            id="nan",
        ),
        pytest.param(
            {"thresholds": {"high_quality": {"quality": 1.5}}},
            "routing.thresholds.high_quality.quality = 1.5 is out of range; "
            "expected a finite number from 0 to 1",
            id="threshold-above-one",
        ),
        pytest.param(
            {"thresholds": {"circuit_breaker": {"error_rate": -0.1}}},
            "routing.thresholds.circuit_breaker.error_rate = -0.1 is out of range; "
            "expected a finite number from 0 to 1",
            id="threshold-negative",
        ),
        pytest.param(
            {"weights": {"standard_quality": {"quality_boost": 0}}},
            "routing.weights.standard_quality.quality_boost = 0 is out of range; "
            "expected a finite number > 0",
            id="boost-zero",
        ),
        pytest.param(
            {"constraints": {"critical": {"fallback": -0.5}}},
            "routing.constraints.critical.fallback = -0.5 is out of range; "
            "expected a finite number >= 0",
            id="factor-negative",
        ),
        pytest.param(
            {"weights": {"retry": {"max_iterations": 2.5}}},
            "routing.weights.retry.max_iterations = 2.5 is not an integer; "
            "expected an integer >= 0",
            id="count-not-integer",
        ),
        pytest.param(
            {"weights": {"retry": {"max_iterations": -1}}},
            "routing.weights.retry.max_iterations = -1 is out of range; expected an integer >= 0",
            id="count-negative",
        ),
    ],
)
def test_bad_config_names_path_value_and_allowed(data: dict[str, object], message: str) -> None:
    """Each ConfigError names the key path, the offending value and what is allowed."""
    with pytest.raises(ConfigError) as raised:
        RoutingConfig.from_mapping(data)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_config_built_directly_is_checked_too() -> None:
    """Building a config value in code gets the same range checks."""
    with pytest.raises(ConfigError, match=r"QualityGate\.quality = 2\.0 is out of range"):
        QualityGate(2.0, 0.8, 0.05)
    with pytest.raises(ConfigError, match=r"RetryWeights\.max_iterations = 1\.5 is not an integer"):
        RetryWeights(max_iterations=1.5)  # type: ignore[arg-type]
