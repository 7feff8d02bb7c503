"""Context features and the ``context_analyzer``'s choice of route.

The analyzer of the seed's contextual workflow (``create_contextual_workflow``) looks at
the event it is integrating and at the work already done for it, then sends the event to
one of four nodes or ends. This module holds that judgement as pure functions: text
features (:func:`terms`, :func:`cosine_similarity`, :func:`context_drift`), the
features record the analyzer builds (:class:`AnalyzerFeatures`), its tunable policy
(:class:`AnalyzerPolicy`) and the rule table (:func:`choose_route`).

Everything here is deterministic and free of I/O: the same inputs give the same route
in every process, which is what lets a replayed checkpoint take the same path.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum

from graph.errors import ConfigError

__all__ = [
    "STOP_WORDS",
    "AnalyzerFeatures",
    "AnalyzerPolicy",
    "AnalyzerRoute",
    "RouteChoice",
    "choose_route",
    "context_drift",
    "cosine_similarity",
    "split_sentences",
    "terms",
]

# Letters and digits of any script; ``_`` is a word character for ``\w`` but not a letter.
_TOKEN = re.compile(r"[^\W_]+")
# A sentence ends at ., ! or ? followed by space, or at a line break.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")

_STOP_WORDS_TEXT = """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers him his how i if in into is
    it its itself just me more most my no nor not now of off on once only or other our
    ours out over own same she should so some such than that the their theirs them then
    there these they this those through to too under until up very was we were what when
    where which while who whom why will with would you your yours
    aren couldn didn doesn don hadn hasn haven isn ll re shouldn ve wasn weren won wouldn
"""
STOP_WORDS: frozenset[str] = frozenset(_STOP_WORDS_TEXT.split())
"""Common English function words, and the pieces contractions split into (``don't`` gives
``don`` and ``t``), that say nothing about what a text is about."""


def terms(text: str) -> Counter[str]:
    """Count the content words of a text.

    Tokens are runs of Unicode letters and digits, lowercased; English stop words
    (:data:`STOP_WORDS`) and tokens shorter than two characters are left out.

    Args:
        text: any text.

    Returns:
        How often each remaining token occurs (a fresh counter the caller may change).
    """
    return Counter(dict(_term_counts(text)))


@functools.lru_cache(maxsize=4096)
def _term_counts(text: str) -> tuple[tuple[str, int], ...]:
    # Every pass re-reads the same window texts (analysis, drift, summaries): the
    # tokenizer was a tenth of the CPU per event before this cache (docs/performance.md).
    counts = Counter(
        token
        for token in (match.group().lower() for match in _TOKEN.finditer(text))
        if len(token) >= 2 and token not in STOP_WORDS
    )
    return tuple(counts.items())


def split_sentences(text: str) -> tuple[str, ...]:
    """Split a text into sentences, in order.

    A sentence ends at ``.``, ``!`` or ``?`` followed by white space, or at a line
    break. Pieces without a letter or digit (stray punctuation) are dropped.

    Args:
        text: any text.

    Returns:
        The stripped sentences.
    """
    return tuple(
        piece
        for piece in (raw.strip() for raw in _SENTENCE_BREAK.split(text))
        if _TOKEN.search(piece)
    )


def _squared_norm(vector: Mapping[str, int | float]) -> int | float:
    total: int | float = 0
    for key, weight in vector.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(
                f"term weight {weight!r} for {key!r} is not a finite number >= 0; "
                "cosine similarity is defined here for counts and other non-negative weights"
            )
        total += weight * weight
    return total


def cosine_similarity(a: Mapping[str, int | float], b: Mapping[str, int | float]) -> float:
    """Cosine of the angle between two term vectors.

    Args:
        a: weights by term (counts, say); finite and non-negative.
        b: the same for the other text.

    Returns:
        A number in [0, 1]: 1.0 for vectors pointing the same way, 0.0 for vectors with
        no term in common, and 0.0 when either vector is empty or all zero.

    Raises:
        ValueError: a weight is negative, infinite or NaN.
    """
    norm_a = _squared_norm(a)
    norm_b = _squared_norm(b)
    if not norm_a or not norm_b:
        return 0.0
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    dot = sum(weight * large.get(key, 0) for key, weight in small.items())
    # sqrt of the product (not the product of roots) keeps identical vectors at exactly 1.0.
    return max(0.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))


def context_drift(new_text: str, window: Sequence[str]) -> float:
    """How far new content moves away from the current context.

    Args:
        new_text: the content being integrated.
        window: the context it is compared with, oldest first; it should not contain
            ``new_text`` itself.

    Returns:
        ``1 - cosine(terms(new_text), sum of terms over window)``, in [0, 1]. When
        either side has no content words (an empty window, an empty or punctuation-only
        text) there is nothing to drift from, and the drift is 0.0.

    Raises:
        TypeError: ``window`` is a single ``str`` (it would be read letter by letter).
    """
    if isinstance(window, str):
        raise TypeError("window must be a sequence of texts, not one str: wrap it in a tuple")
    new_terms = terms(new_text)
    if not new_terms:
        return 0.0
    context: Counter[str] = Counter()
    for text in window:
        context.update(terms(text))
    if not context:
        return 0.0
    return 1.0 - cosine_similarity(new_terms, context)


class AnalyzerRoute(StrEnum):
    """Where the ``context_analyzer`` sends an event next: the seed's conditional-edge keys."""

    DEEP_ANALYSIS_NEEDED = "deep_analysis_needed"
    """Deepen the analysis (``adaptive_processor``)."""
    CONTEXT_SHIFT_DETECTED = "context_shift_detected"
    """Close the context segment and open a new one (``context_updater``)."""
    CONTINUE_MONITORING = "continue_monitoring"
    """Check state health (``continuous_monitor``)."""
    DECISION_POINT_REACHED = "decision_point_reached"
    """Decide what to do with the event (``decision_engine``)."""
    PROCESSING_COMPLETE = "processing_complete"
    """The event is done (``END``)."""


def _check_fraction(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{owner}.{name} = {value!r}: expected a number in [0, 1]")


def _check_count(owner: str, name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} = {value!r}: expected an integer >= {minimum}")


@dataclass(frozen=True)
class AnalyzerFeatures:
    """What the analyzer knows about the event it is working on.

    The workflow builds one record per analyzer visit. Fractions are in [0, 1] and
    counts are non-negative; anything else raises :class:`ValueError`.

    Attributes:
        quality: the seed's quality score of the current analysis.
        drift: :func:`context_drift` of the event's content against the context window.
        passes: deepening passes (``adaptive_processor`` runs) done for this event.
        iteration: analyzer visits for this event so far, 1 on the first visit.
        errors: errors recorded for this event (reported with the route; the
            routing itself goes by ``error_rate``).
        error_rate: recent failure rate of the actors doing the work.
        open_breakers: actor kinds (``analysis``, ``update``…) whose breaker is open.
        segment_rotated: ``context_updater`` already ran for this event.
        monitored: ``continuous_monitor`` ran since the last change to the analysis or
            the context.
        decided: ``decision_engine`` has decided for this event.
        retry_requested: the last decision was ``retry_with_improvements``.
    """

    quality: float
    drift: float
    passes: int
    iteration: int
    errors: int = 0
    error_rate: float = 0.0
    open_breakers: tuple[str, ...] = ()
    segment_rotated: bool = False
    monitored: bool = False
    decided: bool = False
    retry_requested: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("quality", "drift", "error_rate"):
            _check_fraction(owner, name, getattr(self, name))
        _check_count(owner, "passes", self.passes, 0)
        _check_count(owner, "iteration", self.iteration, 1)
        _check_count(owner, "errors", self.errors, 0)

    def factors(self) -> dict[str, bool | int | float | str]:
        """The features as flat span attributes (``ctxd.routing.factor.<name>``).

        Returns:
            Every field by name; ``open_breakers`` joined with commas.
        """
        return {
            field.name: (
                ",".join(self.open_breakers)
                if field.name == "open_breakers"
                else getattr(self, field.name)
            )
            for field in fields(self)
        }


@dataclass(frozen=True)
class _Setting:
    kind: type[int] | type[float]
    low: float
    high: float
    low_open: bool
    allowed: str

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


_POLICY_SETTINGS: dict[str, _Setting] = {
    "drift_threshold": _Setting(float, 0.0, 1.0, True, "a number in (0, 1]"),
    "quality_target": _Setting(float, 0.0, 1.0, False, "a number in [0, 1]"),
    "max_passes": _Setting(int, 0, math.inf, False, "an integer >= 0"),
    "iteration_budget": _Setting(int, 2, math.inf, False, "an integer >= 2"),
    "monitor_error_rate": _Setting(float, 0.0, 1.0, False, "a number in [0, 1]"),
}


def _validate(section: str, name: str, value: object) -> int | float:
    """Check a number against its setting; return it as the setting's type."""
    setting = _POLICY_SETTINGS[name]
    where = f"{section}.{name} = {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} is not {setting.allowed}")
    if setting.kind is int and not isinstance(value, int):
        raise ConfigError(f"{where} is not {setting.allowed} (no fractions)")
    if not (math.isfinite(value) and setting.accepts(value)):
        raise ConfigError(f"{where} is out of range: expected {setting.allowed}")
    return value if setting.kind is int else float(value)


def _coerce(section: str, name: str, raw: object) -> int | float:
    """Turn a config value (a number, or a number as text from the environment) into a number."""
    if isinstance(raw, str):
        setting = _POLICY_SETTINGS[name]
        try:
            parsed: int | float = int(raw.strip()) if setting.kind is int else float(raw.strip())
        except ValueError:
            raise ConfigError(f"{section}.{name} = {raw!r} is not {setting.allowed}") from None
        return _validate(section, name, parsed)
    return _validate(section, name, raw)


@dataclass(frozen=True)
class AnalyzerPolicy:
    """The analyzer's thresholds and budgets.

    Invalid values raise :class:`~graph.errors.ConfigError` at construction.

    Attributes:
        drift_threshold: drift at or above which the context segment is rotated, (0, 1].
        quality_target: quality below which the analysis is deepened, [0, 1].
        max_passes: deepening passes allowed per event, >= 0 (0 never deepens).
        iteration_budget: analyzer visits allowed per event, >= 2; the visit that
            reaches it ends the event.
        monitor_error_rate: error rate at or above which deepening is skipped: the
            event goes to monitoring and decision (circuit breaker or fallback) instead
            of spending more calls on failing actors, [0, 1] (0 never deepens).
    """

    drift_threshold: float = 0.75
    quality_target: float = 0.7
    max_passes: int = 3
    iteration_budget: int = 12
    monitor_error_rate: float = 0.3

    def __post_init__(self) -> None:
        for name in _POLICY_SETTINGS:
            value = _validate(type(self).__name__, name, getattr(self, name))
            # Whole numbers given for fractions are stored as floats, so equal policies
            # compare and print alike.
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, object], *, section: str = "analyzer"
    ) -> AnalyzerPolicy:
        """Build a policy from configuration (a TOML table, say); missing keys keep defaults.

        Numbers may also be given as text (``"0.8"``), as environment variables are.

        Args:
            data: settings by name.
            section: the key path of ``data`` in the configuration, used in messages.

        Returns:
            The policy.

        Raises:
            ConfigError: ``data`` is not a mapping, has an unknown key, or a value of
                the wrong type or out of range; the message names the key path, the
                value and what is allowed.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{section} = {data!r}: expected a table of settings")
        unknown = sorted(str(key) for key in data if key not in _POLICY_SETTINGS)
        if unknown:
            raise ConfigError(
                f"{section}.{unknown[0]} is not a setting; "
                f"allowed keys: {', '.join(_POLICY_SETTINGS)}"
            )
        values = {name: _coerce(section, name, raw) for name, raw in data.items()}
        return cls(**values)  # type: ignore[arg-type]  # types checked by _coerce


@dataclass(frozen=True)
class RouteChoice:
    """The analyzer's route and why.

    Attributes:
        route: where the event goes next.
        reason: the deciding rule in words, with its numbers (``"drift 0.82 >= 0.75"``).
        budget_exhausted: the event ended because the iteration budget ran out, not
            because its work was done.
    """

    route: AnalyzerRoute
    reason: str
    budget_exhausted: bool = False


def _deepening_blocked(features: AnalyzerFeatures, policy: AnalyzerPolicy) -> str | None:
    if features.passes >= policy.max_passes:
        return f"pass limit {policy.max_passes} reached"
    if "analysis" in features.open_breakers:
        return "analysis breaker open"
    if features.error_rate >= policy.monitor_error_rate:
        return f"error rate {features.error_rate:.2f} >= {policy.monitor_error_rate:.2f}"
    return None


def _joined(parts: Iterable[str]) -> str:
    return "; ".join(parts)


def choose_route(features: AnalyzerFeatures, policy: AnalyzerPolicy) -> RouteChoice:
    """Choose the analyzer's route: the first rule that holds wins.

    1. ``iteration >= iteration_budget`` → ``processing_complete``, budget exhausted.
    2. ``drift >= drift_threshold`` and the segment was not rotated for this event →
       ``context_shift_detected``.
    3. The analysis needs work (``quality < quality_target`` before any decision, or
       the last decision asked for a retry) and deepening is allowed
       (``passes < max_passes``, the ``analysis`` breaker is not open,
       ``error_rate < monitor_error_rate``) → ``deep_analysis_needed``. When deepening
       is wanted but not allowed, the reason says why and the later rules go on.
    4. Not monitored since the last change → ``continue_monitoring``.
    5. Not decided, and not waiting for a retry that cannot run →
       ``decision_point_reached``.
    6. Otherwise → ``processing_complete``. A retry that cannot run (rule 3 blocked)
       ends the event with the retry decision standing, rather than asking the
       decision engine again and again.

    Termination: the caller counts ``iteration`` up by one per analyzer visit, so an
    event sees at most ``iteration_budget`` visits and its last route is
    ``processing_complete``. The budget is a backstop: each other route makes progress
    that only a bounded number of routes can undo. Rule 2 fires at most once
    (``segment_rotated`` only turns on), rule 3 at most ``max_passes`` times
    (``passes`` only grows), rule 4 sets ``monitored``, which only a change (rule 2 or
    3) may clear, and every decision after the first follows such a change: a retry
    decision is followed by a pass or by the end. So an event ends within
    ``3 * max_passes + 6`` visits, also when every change clears ``monitored`` and
    ``decided``.

    Either convention for a retry decision works: ``decided=False`` with
    ``retry_requested=True`` (the decision is made again after the pass), or
    ``decided=True`` with ``retry_requested=True`` (the pass is the last word). The
    workflow clears ``retry_requested`` when a pass is done.

    Args:
        features: what the analyzer knows about the event.
        policy: thresholds and budgets.

    Returns:
        The route, the reason in words, and whether the budget ran out.
    """
    if features.iteration >= policy.iteration_budget:
        return RouteChoice(
            AnalyzerRoute.PROCESSING_COMPLETE,
            f"iteration {features.iteration} >= budget {policy.iteration_budget}",
            budget_exhausted=True,
        )
    if features.drift >= policy.drift_threshold and not features.segment_rotated:
        return RouteChoice(
            AnalyzerRoute.CONTEXT_SHIFT_DETECTED,
            f"drift {features.drift:.2f} >= {policy.drift_threshold:.2f}",
        )

    notes: list[str] = []
    wants: list[str] = []
    blocked: str | None = None
    # A decision settles the analysis unless it asked for a retry: deepening after it
    # would change an analysis nobody decides on again.
    if features.quality < policy.quality_target and not features.decided:
        wants.append(f"quality {features.quality:.2f} < {policy.quality_target:.2f}")
    if features.retry_requested:
        wants.append("retry requested")
    if wants:
        blocked = _deepening_blocked(features, policy)
        if blocked is None:
            return RouteChoice(
                AnalyzerRoute.DEEP_ANALYSIS_NEEDED,
                f"{_joined(wants)} (pass {features.passes + 1} of {policy.max_passes})",
            )
        notes.append(f"{_joined(wants)} but {blocked}")

    if not features.monitored:
        return RouteChoice(
            AnalyzerRoute.CONTINUE_MONITORING,
            _joined([*notes, "not monitored since the last change"]),
        )
    if features.retry_requested and blocked is not None:
        return RouteChoice(
            AnalyzerRoute.PROCESSING_COMPLETE,
            _joined([*notes, "the retry cannot run, so the last decision stands"]),
        )
    if not features.decided:
        return RouteChoice(
            AnalyzerRoute.DECISION_POINT_REACHED,
            _joined([*notes, "monitored, no decision yet"]),
        )
    return RouteChoice(
        AnalyzerRoute.PROCESSING_COMPLETE,
        _joined([*notes, "monitored and decided; nothing left to do"]),
    )
