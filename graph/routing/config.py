"""The routing engine's numbers: every weight, constraint and threshold of the seed.

Configuration comes from the ``[routing]`` table of the TOML config file, read with
:meth:`RoutingConfig.from_mapping`. Every key is optional and overrides the default
shown; unknown keys, non-numbers, non-finite numbers and values out of range are
errors that name the key path::

    [routing.thresholds.high_quality]      # viable when q >= quality, p >= performance
    quality = 0.9                          # and e <= error_rate; each from 0 to 1
    performance = 0.8
    error_rate = 0.05

    [routing.thresholds.standard_quality]  # same rule as high_quality
    quality = 0.7
    performance = 0.6
    error_rate = 0.15

    [routing.thresholds.circuit_breaker]   # viable when e >= error_rate or p <= performance
    error_rate = 0.5
    performance = 0.3
    # retry, fallback and escalation are always viable.

    [routing.weights.high_quality]         # weights are numbers from 0 to 1
    quality = 0.4
    performance = 0.3
    reliability = 0.2
    headroom = 0.1

    [routing.weights.standard_quality]
    quality = 0.4
    performance = 0.3
    reliability = 0.3
    quality_boost = 1.2                    # boosts and the amplifier: finite and > 0
    performance_boost = 1.1
    error_amplifier = 2.0

    [routing.weights.retry]
    improvement = 0.5
    performance = 0.3
    reliability = 0.2
    target_quality = 0.8                   # from 0 to 1
    max_iterations = 3                     # an integer >= 0; 0 never retries

    [routing.weights.circuit_breaker]
    error_rate = 0.6
    slowness = 0.3
    utilization = 0.1

    [routing.weights.fallback]
    quality_gap = 0.4
    slowness = 0.3
    error_rate = 0.3

    [routing.weights.escalation]           # each from 0 to 1
    score = 0.9
    quality_below = 0.6
    error_rate_above = 0.4

    [routing.constraints]                  # seconds and cost: finite and >= 0
    deadline_seconds = 600.0               # deadline pressure when less time remains
    low_budget_max_cost = 50.0             # low budget when max_cost is below this

    [routing.constraints.critical]         # score factors: finite and >= 0
    high_quality = 1.3
    escalation = 1.2
    fallback = 0.5

    [routing.constraints.deadline]
    standard_quality = 1.2
    retry = 0.3

    [routing.constraints.low_budget]
    high_quality = 0.7
    fallback = 1.2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Final, TypeVar, cast

from graph.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
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
    "ScoreWeights",
    "StandardQualityWeights",
    "Thresholds",
]


@dataclass(frozen=True)
class _Range:
    """The values a configuration number may take, and how to say so in an error."""

    low: float
    high: float = math.inf
    low_included: bool = True
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.high != math.inf:
            return f"{kind} from {self.low:g} to {self.high:g}"
        return f"{kind} {'>=' if self.low_included else '>'} {self.low:g}"

    def check(self, value: object, path: str) -> float | int:
        """Return ``value`` as the field's type, or raise ConfigError naming ``path``."""
        allowed = f"expected {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} = {value!r} is not a number; {allowed}")
        if self.integer:
            if not isinstance(value, int):
                raise ConfigError(f"{path} = {value!r} is not an integer; {allowed}")
            number: float = value
        else:
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{path} = {value!r} is not finite; {allowed}")
        too_low = number < self.low or (number == self.low and not self.low_included)
        if too_low or number > self.high:
            raise ConfigError(f"{path} = {value!r} is out of range; {allowed}")
        return value if self.integer else number


_RANGE: Final = "ctxd.range"
_UNIT: Final = _Range(0.0, 1.0)
_NON_NEGATIVE: Final = _Range(0.0)
_POSITIVE: Final = _Range(0.0, low_included=False)
_COUNT: Final = _Range(0, integer=True)


def _unit(default: float) -> float:
    return field(default=default, metadata={_RANGE: _UNIT})


def _non_negative(default: float) -> float:
    return field(default=default, metadata={_RANGE: _NON_NEGATIVE})


def _positive(default: float) -> float:
    return field(default=default, metadata={_RANGE: _POSITIVE})


class _Checked:
    """Checks every ranged field of a config dataclass when it is built directly."""

    def __post_init__(self) -> None:
        for spec_field in fields(cast("DataclassInstance", self)):
            spec = spec_field.metadata.get(_RANGE)
            if isinstance(spec, _Range):
                path = f"{type(self).__name__}.{spec_field.name}"
                value = spec.check(getattr(self, spec_field.name), path)
                object.__setattr__(self, spec_field.name, value)


@dataclass(frozen=True)
class HighQualityWeights(_Checked):
    """Weights of the high-quality score.

    Attributes:
        quality: weight of the quality score.
        performance: weight of the performance score.
        reliability: weight of one minus the error rate.
        headroom: weight of one minus the resource utilization.
    """

    quality: float = _unit(0.4)
    performance: float = _unit(0.3)
    reliability: float = _unit(0.2)
    headroom: float = _unit(0.1)


@dataclass(frozen=True)
class StandardQualityWeights(_Checked):
    """Weights and boosts of the standard-quality score.

    Attributes:
        quality: weight of ``min(quality * quality_boost, 1)``.
        performance: weight of ``min(performance * performance_boost, 1)``.
        reliability: weight of ``1 - min(error_rate * error_amplifier, 1)``.
        quality_boost: how leniently the standard path judges quality.
        performance_boost: how leniently the standard path judges performance.
        error_amplifier: how harshly the standard path judges errors.
    """

    quality: float = _unit(0.4)
    performance: float = _unit(0.3)
    reliability: float = _unit(0.3)
    quality_boost: float = _positive(1.2)
    performance_boost: float = _positive(1.1)
    error_amplifier: float = _positive(2.0)


@dataclass(frozen=True)
class RetryWeights(_Checked):
    """Weights of the retry score, and when retrying stops.

    Attributes:
        improvement: weight of ``target_quality - quality`` (negative above the target).
        performance: weight of the performance score.
        reliability: weight of one minus the error rate.
        target_quality: the quality a retry aims for.
        max_iterations: retry scores 0 once ``iteration_count`` reaches this.
    """

    improvement: float = _unit(0.5)
    performance: float = _unit(0.3)
    reliability: float = _unit(0.2)
    target_quality: float = _unit(0.8)
    max_iterations: int = field(default=3, metadata={_RANGE: _COUNT})


@dataclass(frozen=True)
class CircuitBreakerWeights(_Checked):
    """Weights of the circuit-breaker score.

    Attributes:
        error_rate: weight of the error rate.
        slowness: weight of one minus the performance score.
        utilization: weight of the resource utilization.
    """

    error_rate: float = _unit(0.6)
    slowness: float = _unit(0.3)
    utilization: float = _unit(0.1)


@dataclass(frozen=True)
class FallbackWeights(_Checked):
    """Weights of the fallback score.

    Attributes:
        quality_gap: weight of one minus the quality score.
        slowness: weight of one minus the performance score.
        error_rate: weight of the error rate.
    """

    quality_gap: float = _unit(0.4)
    slowness: float = _unit(0.3)
    error_rate: float = _unit(0.3)


@dataclass(frozen=True)
class EscalationRule(_Checked):
    """When a critical workflow asks for a person, and how strongly.

    Attributes:
        score: the escalation score when the rule fires (0 otherwise).
        quality_below: fires when the quality score is strictly below this...
        error_rate_above: ...or the error rate strictly above this.
    """

    score: float = _unit(0.9)
    quality_below: float = _unit(0.6)
    error_rate_above: float = _unit(0.4)


@dataclass(frozen=True)
class ScoreWeights:
    """How each decision's raw score is computed (the ``weights`` table)."""

    high_quality: HighQualityWeights = field(default_factory=HighQualityWeights)
    standard_quality: StandardQualityWeights = field(default_factory=StandardQualityWeights)
    retry: RetryWeights = field(default_factory=RetryWeights)
    circuit_breaker: CircuitBreakerWeights = field(default_factory=CircuitBreakerWeights)
    fallback: FallbackWeights = field(default_factory=FallbackWeights)
    escalation: EscalationRule = field(default_factory=EscalationRule)


@dataclass(frozen=True)
class CriticalFactors(_Checked):
    """Score factors for a ``critical`` business priority.

    Attributes:
        high_quality: factor on the high-quality score.
        escalation: factor on the escalation score.
        fallback: factor on the fallback score.
    """

    high_quality: float = _non_negative(1.3)
    escalation: float = _non_negative(1.2)
    fallback: float = _non_negative(0.5)


@dataclass(frozen=True)
class DeadlineFactors(_Checked):
    """Score factors under deadline pressure.

    Attributes:
        standard_quality: factor on the standard-quality score.
        retry: factor on the retry score.
    """

    standard_quality: float = _non_negative(1.2)
    retry: float = _non_negative(0.3)


@dataclass(frozen=True)
class LowBudgetFactors(_Checked):
    """Score factors under a low budget.

    Attributes:
        high_quality: factor on the high-quality score.
        fallback: factor on the fallback score.
    """

    high_quality: float = _non_negative(0.7)
    fallback: float = _non_negative(1.2)


@dataclass(frozen=True)
class BusinessConstraints(_Checked):
    """When the business rules apply, and the factors they put on the raw scores.

    The factors apply in this order: critical, deadline, low budget.

    Attributes:
        deadline_seconds: deadline pressure when fewer seconds than this remain
            (a deadline already past included).
        low_budget_max_cost: low budget when ``max_cost`` is strictly below this.
        critical: factors for a ``critical`` business priority.
        deadline: factors under deadline pressure.
        low_budget: factors under a low budget.
    """

    deadline_seconds: float = _non_negative(600.0)
    low_budget_max_cost: float = _non_negative(50.0)
    critical: CriticalFactors = field(default_factory=CriticalFactors)
    deadline: DeadlineFactors = field(default_factory=DeadlineFactors)
    low_budget: LowBudgetFactors = field(default_factory=LowBudgetFactors)


@dataclass(frozen=True)
class QualityGate(_Checked):
    """Minimums a context must meet for a quality path to be viable.

    Attributes:
        quality: viable only when the quality score is at least this.
        performance: viable only when the performance score is at least this.
        error_rate: viable only when the error rate is at most this.
    """

    quality: float = field(metadata={_RANGE: _UNIT})
    performance: float = field(metadata={_RANGE: _UNIT})
    error_rate: float = field(metadata={_RANGE: _UNIT})


@dataclass(frozen=True)
class BreakerGate(_Checked):
    """When circuit-breaker mode is viable: either condition suffices.

    Attributes:
        error_rate: viable when the error rate is at least this.
        performance: viable when the performance score is at most this.
    """

    error_rate: float = _unit(0.5)
    performance: float = _unit(0.3)


@dataclass(frozen=True)
class Thresholds:
    """Viability of the gated decisions; the others are always viable."""

    high_quality: QualityGate = field(default_factory=lambda: QualityGate(0.9, 0.8, 0.05))
    standard_quality: QualityGate = field(default_factory=lambda: QualityGate(0.7, 0.6, 0.15))
    circuit_breaker: BreakerGate = field(default_factory=BreakerGate)


_D = TypeVar("_D", bound="DataclassInstance")


def _merge(current: _D, data: object, path: str) -> _D:
    """Return ``current`` with the overrides of the TOML table ``data`` at ``path``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} = {data!r} is not a table; expected a table of settings")
    known = {spec_field.name: spec_field for spec_field in fields(current)}
    changes: dict[str, object] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}"
        if not isinstance(key, str) or key not in known:
            raise ConfigError(
                f"{key_path} is not a setting; allowed keys in {path}: {', '.join(known)}"
            )
        child = getattr(current, key)
        if is_dataclass(child) and not isinstance(child, type):
            changes[key] = _merge(child, value, key_path)
        else:
            spec = known[key].metadata[_RANGE]
            changes[key] = cast("_Range", spec).check(value, key_path)
    return replace(current, **changes)


@dataclass(frozen=True)
class RoutingConfig:
    """Every number of the seed's routing engine; the defaults are the seed's.

    Attributes:
        weights: how each decision's raw score is computed.
        constraints: the business rules applied to the raw scores.
        thresholds: which decisions a context makes viable.
    """

    weights: ScoreWeights = field(default_factory=ScoreWeights)
    constraints: BusinessConstraints = field(default_factory=BusinessConstraints)
    thresholds: Thresholds = field(default_factory=Thresholds)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> RoutingConfig:
        """Build a config from the ``[routing]`` table of the TOML config file.

        Every key is optional and overrides the default; the shape is in this
        module's docstring.

        Args:
            data: the ``[routing]`` table as parsed by :mod:`tomllib`.

        Returns:
            The defaults with ``data``'s overrides applied.

        Raises:
            ConfigError: a key is unknown, or a value is not a table where a table
                belongs, not a number (or not an integer), not finite, or out of range.
                The message names the key path (``routing.thresholds.high_quality.quality``),
                the value and what is allowed.
        """
        return _merge(cls(), data, "routing")
