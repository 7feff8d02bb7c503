"""Context features and the analyzer's route table (graph/features.py)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph.errors import ConfigError
from graph.features import (
    STOP_WORDS,
    AnalyzerFeatures,
    AnalyzerPolicy,
    AnalyzerRoute,
    RouteChoice,
    choose_route,
    context_drift,
    cosine_similarity,
    split_sentences,
    terms,
)

T = TypeVar("T")

# --- text features ------------------------------------------------------------------


def test_terms_lowercases_drops_stop_words_short_tokens_and_underscores() -> None:
    assert terms("The API latency, the API! Über_cool x 42 don't") == Counter(
        {"api": 2, "latency": 1, "über": 1, "cool": 1, "42": 1}
    )


def test_terms_of_text_without_content_words_is_empty() -> None:
    assert terms("") == Counter()
    assert terms("... the a of !!!") == Counter()


def test_terms_keeps_letters_of_any_script() -> None:
    assert terms("Данные задержка 数据") == Counter({"данные": 1, "задержка": 1, "数据": 1})


def test_stop_words_are_lowercase_words() -> None:
    assert all(word.isalpha() and word.islower() for word in STOP_WORDS)


def test_split_sentences_on_terminators_and_line_breaks() -> None:
    assert split_sentences("Hello world. Next one!\n\n...  third? end") == (
        "Hello world.",
        "Next one!",
        "third?",
        "end",
    )
    assert split_sentences("") == ()


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({"a": 1, "b": 1}, {"a": 1}, 1 / math.sqrt(2)),
        ({"a": 3, "b": 4}, {"a": 4, "b": 3}, 0.96),
        ({"a": 2, "b": 5}, {"a": 2, "b": 5}, 1.0),
        ({"a": 1}, {"b": 1}, 0.0),
        ({}, {"a": 1}, 0.0),
        ({"a": 1}, {}, 0.0),
        ({"a": 0}, {"a": 1}, 0.0),
        ({"a": 0.5, "b": 0.5}, {"a": 2, "b": 2}, 1.0),
    ],
)
def test_cosine_similarity_exact_values(
    a: dict[str, float], b: dict[str, float], expected: float
) -> None:
    assert cosine_similarity(a, b) == expected
    assert cosine_similarity(b, a) == expected


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
def test_cosine_similarity_rejects_negative_and_non_finite_weights(bad: float) -> None:
    with pytest.raises(ValueError, match="not a finite number >= 0"):
        cosine_similarity({"a": bad}, {"a": 1})


@pytest.mark.parametrize(
    ("new_text", "window", "expected"),
    [
        ("API latency", ("api latency",), 0.0),
        ("cats and dogs", ("birds", "fish"), 1.0),
        ("api latency", ("api database",), 0.5),
        ("api latency", ("api", "database"), 0.5),
        ("api latency", (), 0.0),
        ("", ("api",), 0.0),
        ("!!! the of", ("api",), 0.0),
        ("api", ("the and of",), 0.0),
    ],
)
def test_context_drift_exact_values(
    new_text: str, window: tuple[str, ...], expected: float
) -> None:
    assert context_drift(new_text, window) == expected


def test_context_drift_rejects_a_bare_string_window() -> None:
    with pytest.raises(TypeError, match="not one str"):
        context_drift("api", "api latency")


@given(st.text(), st.lists(st.text(), max_size=4))
def test_context_drift_is_a_fraction(new_text: str, window: list[str]) -> None:
    assert 0.0 <= context_drift(new_text, window) <= 1.0


# --- features and policy --------------------------------------------------------------


def test_analyzer_route_values_are_the_seed_edge_keys() -> None:
    assert [route.value for route in AnalyzerRoute] == [
        "deep_analysis_needed",
        "context_shift_detected",
        "continue_monitoring",
        "decision_point_reached",
        "processing_complete",
    ]
    assert isinstance(AnalyzerRoute.PROCESSING_COMPLETE, str)
    assert AnalyzerRoute("continue_monitoring") is AnalyzerRoute.CONTINUE_MONITORING


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quality": 1.5}, r"AnalyzerFeatures.quality = 1.5: expected a number in \[0, 1\]"),
        ({"drift": math.nan}, "AnalyzerFeatures.drift = nan"),
        ({"error_rate": -0.1}, "AnalyzerFeatures.error_rate"),
        ({"passes": -1}, "AnalyzerFeatures.passes = -1: expected an integer >= 0"),
        ({"iteration": 0}, "AnalyzerFeatures.iteration = 0: expected an integer >= 1"),
        ({"errors": True}, "AnalyzerFeatures.errors = True"),
    ],
)
def test_features_reject_out_of_range_values(changes: dict[str, object], message: str) -> None:
    base = {"quality": 0.5, "drift": 0.1, "passes": 0, "iteration": 1}
    with pytest.raises(ValueError, match=message):
        AnalyzerFeatures(**{**base, **changes})  # type: ignore[arg-type]


def test_features_factors_are_flat_attributes() -> None:
    features = AnalyzerFeatures(
        quality=0.5, drift=0.25, passes=1, iteration=2, open_breakers=("analysis", "update")
    )
    assert features.factors() == {
        "quality": 0.5,
        "drift": 0.25,
        "passes": 1,
        "iteration": 2,
        "errors": 0,
        "error_rate": 0.0,
        "open_breakers": "analysis,update",
        "segment_rotated": False,
        "monitored": False,
        "decided": False,
        "retry_requested": False,
    }


def test_policy_defaults() -> None:
    assert AnalyzerPolicy() == AnalyzerPolicy(
        drift_threshold=0.75,
        quality_target=0.7,
        max_passes=3,
        iteration_budget=12,
        monitor_error_rate=0.3,
    )
    assert AnalyzerPolicy.from_mapping({}) == AnalyzerPolicy()


def test_policy_from_mapping_reads_numbers_and_numeric_text() -> None:
    policy = AnalyzerPolicy.from_mapping(
        {"drift_threshold": 1, "quality_target": "0.8", "max_passes": " 0 ", "iteration_budget": 2}
    )
    assert policy == AnalyzerPolicy(
        drift_threshold=1.0, quality_target=0.8, max_passes=0, iteration_budget=2
    )
    assert isinstance(policy.drift_threshold, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"drift": 0.5},
            "analyzer.drift is not a setting; allowed keys: drift_threshold, quality_target, "
            "max_passes, iteration_budget, monitor_error_rate",
        ),
        (
            {"drift_threshold": 0},
            r"analyzer.drift_threshold = 0 is out of range: expected a number in \(0, 1\]",
        ),
        (
            {"drift_threshold": 1.01},
            r"analyzer.drift_threshold = 1.01 is out of range: expected a number in \(0, 1\]",
        ),
        (
            {"quality_target": "high"},
            r"analyzer.quality_target = 'high' is not a number in \[0, 1\]",
        ),
        ({"quality_target": math.nan}, "analyzer.quality_target = nan is out of range"),
        ({"max_passes": True}, "analyzer.max_passes = True is not an integer >= 0"),
        (
            {"max_passes": 2.5},
            r"analyzer.max_passes = 2.5 is not an integer >= 0 \(no fractions\)",
        ),
        ({"max_passes": "2.0"}, "analyzer.max_passes = '2.0' is not an integer >= 0"),
        (
            {"iteration_budget": 1},
            "analyzer.iteration_budget = 1 is out of range: expected an integer >= 2",
        ),
        ({"monitor_error_rate": [0.3]}, r"analyzer.monitor_error_rate = \[0.3\] is not"),
    ],
)
def test_policy_from_mapping_errors_name_key_value_and_allowed(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        AnalyzerPolicy.from_mapping(data)


def test_policy_from_mapping_uses_the_given_section_and_rejects_non_tables() -> None:
    with pytest.raises(ConfigError, match=r"^graph.analyzer.max_passes = -1 "):
        AnalyzerPolicy.from_mapping({"max_passes": -1}, section="graph.analyzer")
    with pytest.raises(ConfigError, match="analyzer = 3: expected a table of settings"):
        AnalyzerPolicy.from_mapping(3)  # type: ignore[arg-type]


def test_policy_constructor_validates_too() -> None:
    assert AnalyzerPolicy(drift_threshold=1) == AnalyzerPolicy(drift_threshold=1.0)
    assert repr(AnalyzerPolicy(drift_threshold=1)).startswith("AnalyzerPolicy(drift_threshold=1.0,")
    with pytest.raises(ConfigError, match=r"AnalyzerPolicy\.max_passes = -1"):
        AnalyzerPolicy(max_passes=-1)
    with pytest.raises(ConfigError, match=r"AnalyzerPolicy\.quality_target = '0\.5' is not"):
        AnalyzerPolicy(quality_target="0.5")  # type: ignore[arg-type]


# --- the route table ------------------------------------------------------------------

POLICY = AnalyzerPolicy()
_NOTHING_LEFT = "monitored and decided; nothing left to do"
# Everything done: the last rule ends the event.
DONE = AnalyzerFeatures(
    quality=0.9,
    drift=0.1,
    passes=1,
    iteration=5,
    segment_rotated=False,
    monitored=True,
    decided=True,
)
UNDECIDED = replace(DONE, decided=False)


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        # 1. the budget ends the event before anything else
        (
            replace(DONE, iteration=12, drift=0.9, quality=0.1, monitored=False),
            RouteChoice(
                AnalyzerRoute.PROCESSING_COMPLETE,
                "iteration 12 >= budget 12",
                budget_exhausted=True,
            ),
        ),
        # 2. a shift comes before deepening, once per event
        (
            replace(DONE, drift=0.82, quality=0.1),
            RouteChoice(AnalyzerRoute.CONTEXT_SHIFT_DETECTED, "drift 0.82 >= 0.75"),
        ),
        (
            replace(DONE, drift=0.75),
            RouteChoice(AnalyzerRoute.CONTEXT_SHIFT_DETECTED, "drift 0.75 >= 0.75"),
        ),
        (
            replace(DONE, drift=0.9, segment_rotated=True),
            RouteChoice(
                AnalyzerRoute.PROCESSING_COMPLETE, "monitored and decided; nothing left to do"
            ),
        ),
        # 3. deepening, for low quality before a decision or for a retry, while allowed
        (
            replace(UNDECIDED, quality=0.41, passes=0),
            RouteChoice(AnalyzerRoute.DEEP_ANALYSIS_NEEDED, "quality 0.41 < 0.70 (pass 1 of 3)"),
        ),
        (
            replace(DONE, quality=0.2),
            RouteChoice(AnalyzerRoute.PROCESSING_COMPLETE, _NOTHING_LEFT),
        ),
        (
            replace(DONE, retry_requested=True, passes=2),
            RouteChoice(AnalyzerRoute.DEEP_ANALYSIS_NEEDED, "retry requested (pass 3 of 3)"),
        ),
        (
            replace(UNDECIDED, quality=0.2, retry_requested=True),
            RouteChoice(
                AnalyzerRoute.DEEP_ANALYSIS_NEEDED,
                "quality 0.20 < 0.70; retry requested (pass 2 of 3)",
            ),
        ),
        (
            replace(UNDECIDED, quality=0.2, passes=3, monitored=False),
            RouteChoice(
                AnalyzerRoute.CONTINUE_MONITORING,
                "quality 0.20 < 0.70 but pass limit 3 reached; not monitored since the last change",
            ),
        ),
        (
            replace(UNDECIDED, quality=0.2, open_breakers=("update", "analysis")),
            RouteChoice(
                AnalyzerRoute.DECISION_POINT_REACHED,
                "quality 0.20 < 0.70 but analysis breaker open; monitored, no decision yet",
            ),
        ),
        (
            replace(UNDECIDED, quality=0.2, open_breakers=("update",)),
            RouteChoice(AnalyzerRoute.DEEP_ANALYSIS_NEEDED, "quality 0.20 < 0.70 (pass 2 of 3)"),
        ),
        # a retry that cannot run ends the event instead of asking for decisions again
        (
            replace(DONE, retry_requested=True, error_rate=0.3),
            RouteChoice(
                AnalyzerRoute.PROCESSING_COMPLETE,
                "retry requested but error rate 0.30 >= 0.30; "
                "the retry cannot run, so the last decision stands",
            ),
        ),
        (
            replace(UNDECIDED, retry_requested=True, passes=3),
            RouteChoice(
                AnalyzerRoute.PROCESSING_COMPLETE,
                "retry requested but pass limit 3 reached; "
                "the retry cannot run, so the last decision stands",
            ),
        ),
        (
            replace(UNDECIDED, retry_requested=True, passes=3, monitored=False),
            RouteChoice(
                AnalyzerRoute.CONTINUE_MONITORING,
                "retry requested but pass limit 3 reached; not monitored since the last change",
            ),
        ),
        # 4. monitoring, then 5. the decision, then 6. done
        (
            replace(DONE, monitored=False, decided=False),
            RouteChoice(AnalyzerRoute.CONTINUE_MONITORING, "not monitored since the last change"),
        ),
        (
            replace(DONE, decided=False),
            RouteChoice(AnalyzerRoute.DECISION_POINT_REACHED, "monitored, no decision yet"),
        ),
        (
            DONE,
            RouteChoice(
                AnalyzerRoute.PROCESSING_COMPLETE, "monitored and decided; nothing left to do"
            ),
        ),
    ],
)
def test_route_table(features: AnalyzerFeatures, expected: RouteChoice) -> None:
    assert choose_route(features, POLICY) == expected


def test_zero_max_passes_never_deepens() -> None:
    features = replace(DONE, quality=0.0, monitored=False)
    choice = choose_route(features, AnalyzerPolicy(max_passes=0))
    assert choice.route is AnalyzerRoute.CONTINUE_MONITORING


def test_a_fresh_substantive_event_walks_monitor_then_decision_then_end() -> None:
    features = AnalyzerFeatures(quality=0.8, drift=0.2, passes=0, iteration=1)
    routes = []
    while True:
        choice = choose_route(features, POLICY)
        routes.append(choice.route)
        if choice.route is AnalyzerRoute.PROCESSING_COMPLETE:
            break
        if choice.route is AnalyzerRoute.CONTINUE_MONITORING:
            features = replace(features, monitored=True)
        if choice.route is AnalyzerRoute.DECISION_POINT_REACHED:
            features = replace(features, decided=True)
        features = replace(features, iteration=features.iteration + 1)
    assert routes == [
        AnalyzerRoute.CONTINUE_MONITORING,
        AnalyzerRoute.DECISION_POINT_REACHED,
        AnalyzerRoute.PROCESSING_COMPLETE,
    ]
    assert not choice.budget_exhausted


# --- termination ----------------------------------------------------------------------

_fractions = st.floats(min_value=0.0, max_value=1.0)
_policies = st.builds(
    AnalyzerPolicy,
    drift_threshold=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    quality_target=_fractions,
    max_passes=st.integers(min_value=0, max_value=6),
    iteration_budget=st.integers(min_value=2, max_value=40),
    monitor_error_rate=_fractions,
)
_breakers = st.lists(st.sampled_from(["analysis", "update", "monitoring", "decision"]), unique=True)
# Arbitrary text, and text over a small vocabulary so that drift takes every value.
_texts = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.sampled_from(["api", "latency", "deploy", "market", "price", "rival"]), max_size=8
    ).map(" ".join),
)


def _sometimes_fixed(
    data: st.DataObject, strategy: st.SearchStrategy[T], label: str
) -> Callable[[], T]:
    """A source of values: fresh draws each time, or one value for the whole run.

    Hypothesis rarely draws the same value many times in a row; a fixed value stands
    for a stubborn node (a decision engine that always asks for a retry, a breaker
    that stays open), the cases that would loop if a rule were missing.
    """
    if data.draw(st.booleans(), label=f"{label} fixed"):
        value = data.draw(strategy, label=label)
        return lambda: value
    return lambda: data.draw(strategy, label=label)


def _simulate(
    data: st.DataObject, policy: AnalyzerPolicy, give_up_after: int
) -> tuple[int, RouteChoice]:
    """Run the analyzer loop over a tiny model of the nodes; return visits and last choice.

    The run stops after ``give_up_after`` visits even if the route is not complete (a
    long loop would otherwise exhaust Hypothesis's buffer and be discarded unseen).

    The model is adversarial where the real nodes have freedom: a pass may make quality
    worse, a rotation changes the drift, the error rate and breakers change at any step,
    the decision engine may ask for a retry every time, and (when ``clears`` is drawn)
    every change clears ``monitored`` and ``decided``.
    """
    window = data.draw(st.lists(_texts, max_size=4), label="window")
    content = data.draw(_texts, label="content")
    # Random texts seldom drift far; half the runs draw the drift directly instead.
    from_texts = data.draw(st.booleans(), label="drift from the texts")
    clears = data.draw(st.booleans(), label="changes clear monitored and decided")
    # graph/nodes.py's convention: a retry decision leaves the event undecided and a
    # pass clears the retry flag; the other keeps both set.
    undecided_retry = data.draw(st.booleans(), label="retry leaves the event undecided")
    quality = _sometimes_fixed(data, _fractions, "quality")
    error_rate = _sometimes_fixed(data, _fractions, "error_rate")
    breakers = _sometimes_fixed(data, _breakers, "open breakers")
    retry = _sometimes_fixed(data, st.booleans(), "retry_with_improvements")
    drift_after_rotation = _sometimes_fixed(data, _fractions, "drift after rotation")
    features = AnalyzerFeatures(
        quality=quality(),
        drift=context_drift(content, window) if from_texts else data.draw(_fractions),
        passes=0,
        iteration=1,
        error_rate=error_rate(),
        open_breakers=tuple(breakers()),
    )
    visits = 0
    while True:
        visits += 1
        assert features.iteration == visits
        choice = choose_route(features, policy)
        if choice.route is AnalyzerRoute.PROCESSING_COMPLETE or visits >= give_up_after:
            return visits, choice
        if choice.route is AnalyzerRoute.DEEP_ANALYSIS_NEEDED:
            features = replace(features, passes=features.passes + 1, quality=quality())
            if undecided_retry:
                features = replace(features, retry_requested=False)
            if clears:
                features = replace(features, monitored=False, decided=False)
        elif choice.route is AnalyzerRoute.CONTEXT_SHIFT_DETECTED:
            features = replace(features, segment_rotated=True, drift=drift_after_rotation())
            if clears:
                features = replace(features, monitored=False, decided=False)
        elif choice.route is AnalyzerRoute.CONTINUE_MONITORING:
            features = replace(features, monitored=True)
        else:
            retried = retry()
            features = replace(
                features, decided=not (retried and undecided_retry), retry_requested=retried
            )
        features = replace(
            features,
            iteration=features.iteration + 1,
            error_rate=error_rate(),
            open_breakers=tuple(breakers()),
            errors=features.errors + data.draw(st.integers(0, 1)),
        )


@settings(max_examples=300)
@given(data=st.data(), policy=_policies)
def test_loop_ends_within_the_iteration_budget(data: st.DataObject, policy: AnalyzerPolicy) -> None:
    visits, last = _simulate(data, policy, give_up_after=policy.iteration_budget + 1)
    assert visits <= policy.iteration_budget
    assert last.route is AnalyzerRoute.PROCESSING_COMPLETE
    assert last.budget_exhausted == (visits == policy.iteration_budget)


@settings(max_examples=500)
@given(data=st.data(), max_passes=st.integers(min_value=0, max_value=6))
def test_loop_ends_on_its_own_within_the_documented_bound(
    data: st.DataObject, max_passes: int
) -> None:
    """Without the budget as backstop, every event ends within 3 * max_passes + 6 visits."""
    policy = AnalyzerPolicy(max_passes=max_passes, iteration_budget=1_000)
    visits, last = _simulate(data, policy, give_up_after=3 * max_passes + 7)
    assert visits <= 3 * max_passes + 6
    assert last.route is AnalyzerRoute.PROCESSING_COMPLETE
    assert not last.budget_exhausted
