"""The analysis plug-in point and the default analyzer (graph/analysis.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph.analysis import (
    MAX_ANALYSIS_BYTES,
    AnalysisRequest,
    AnalysisResult,
    heuristic_analyzer,
    load_analyzer,
)
from graph.errors import ConfigError
from graph.quality import quality_score

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "keyword_analyzer.py"

INCIDENT = (
    "The checkout service returned errors for twelve minutes after the morning deploy. "
    "Payment latency rose to four seconds at the peak.",
    "Customers in the EU segment abandoned carts at twice the usual rate. "
    "Support tickets mention slow payment pages and failed card checks.",
    "The database connection pool was exhausted during the incident. "
    "Engineers rolled back the deploy and latency returned to normal.",
)


def _request(window: tuple[str, ...], pass_number: int = 0, **research: str) -> AnalysisRequest:
    return AnalysisRequest("wf-1", window, pass_number=pass_number, research=research)


async def _quality(window: tuple[str, ...], pass_number: int) -> float:
    return quality_score((await heuristic_analyzer(_request(window, pass_number))).analysis)


# --- the heuristic analyzer -----------------------------------------------------------


async def test_quality_rises_strictly_over_the_first_three_passes() -> None:
    scores = [await _quality(INCIDENT, number) for number in range(3)]
    assert scores[0] < scores[1] < scores[2]
    assert scores[0] < 0.7  # a first pass alone leaves room for the loop to deepen
    assert scores[2] >= 0.7


async def test_quality_never_falls_on_later_passes() -> None:
    scores = [await _quality(INCIDENT, number) for number in range(6)]
    assert scores == sorted(scores)


@pytest.mark.parametrize("window", [(), ("",), ("ok",), ("API down.",), ("Short. Very short.",)])
async def test_thin_windows_stay_low_quality_at_every_pass(window: tuple[str, ...]) -> None:
    for number in range(5):
        assert await _quality(window, number) < 0.7


async def test_pass_zero_summarises_counts_terms_and_the_latest_lead() -> None:
    result = await heuristic_analyzer(_request(INCIDENT))
    assert result.analysis == (
        "Analysis of 3 events (pass 0): 6 sentences, 39 distinct terms.\n"
        "Key terms: deploy (2), latency (2), payment (2), returned (2), abandoned (1), back (1).\n"
        "Latest event: The database connection pool was exhausted during the incident."
    )
    assert result.fields == {"sentences": 6, "distinct_terms": 39, "substantive": True}


async def test_each_pass_keeps_the_lines_of_the_pass_before() -> None:
    previous: list[str] = []
    for number in range(5):
        lines = (await heuristic_analyzer(_request(INCIDENT, number))).analysis.splitlines()
        # The header names the pass; every other earlier line survives in order.
        assert [line for line in lines[1:] if line in previous[1:]] == previous[1:]
        previous = lines


async def test_deeper_passes_add_findings_evidence_and_reasoning() -> None:
    analysis = (await heuristic_analyzer(_request(INCIDENT, 2))).analysis
    for marker in ("\nFindings:\n• ", "\nEvidence from the latest event:\n- \"", "\nHowever, ",
                   "\nTherefore, ", "\nConclusion: ", "\nRecommendation: "):  # fmt: skip
        assert marker in analysis
    assert "However, the latest event brings new terms: back, connection, database" in analysis


async def test_thin_window_says_why_it_does_not_go_deeper() -> None:
    analysis = (await heuristic_analyzer(_request(("API down.",), 2))).analysis
    assert analysis.endswith(
        "Too little content to go deeper: 1 distinct term and 1 sentence (needs 8 and 2)."
    )
    assert "Conclusion" not in analysis


async def test_same_request_same_analysis() -> None:
    first = await heuristic_analyzer(_request(INCIDENT, 2, technical="- pool exhausted"))
    second = await heuristic_analyzer(_request(INCIDENT, 2, technical="- pool exhausted"))
    assert first == second


async def test_research_findings_are_folded_in_as_bullets() -> None:
    findings = (
        "technical research (comprehensive): 2 of 6 sentences mention database, deploy.\n"
        "- The database connection pool was exhausted during the incident.\n"
        "- Engineers rolled back the deploy."
    )
    analysis = (
        await heuristic_analyzer(_request(INCIDENT, 0, technical=findings, market="Demand fell."))
    ).analysis
    assert (
        "\nResearch:\n"
        "- market: Demand fell.\n"
        "- technical: The database connection pool was exhausted during the incident.\n"
        "- technical: Engineers rolled back the deploy."
    ) in analysis
    with_research = quality_score(analysis)
    assert with_research > await _quality(INCIDENT, 0)


async def test_analysis_is_bounded_on_a_64_kib_input() -> None:
    big = " ".join(f"Sentence {i} mentions latency, deploys and the incident." for i in range(1200))
    long_token = "x" * 65_536
    wide = "数据延迟很高。" * 9_000
    window = (big[:65_536], long_token, wide)
    research = {f"domain{i}" * 50: long_token for i in range(20)}
    for number in range(5):
        analysis = (await heuristic_analyzer(_request(window, number, **research))).analysis
        assert len(analysis.encode("utf-8")) <= MAX_ANALYSIS_BYTES


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=4), st.integers(min_value=0, max_value=4))
async def test_any_window_gives_a_bounded_non_decreasing_analysis(
    window: list[str], number: int
) -> None:
    lower = await _quality(tuple(window), number)
    higher = await _quality(tuple(window), number + 1)
    assert lower <= higher
    analysis = (await heuristic_analyzer(_request(tuple(window), number))).analysis
    assert len(analysis.encode("utf-8")) <= MAX_ANALYSIS_BYTES


def test_request_rejects_a_negative_pass_and_a_list_window() -> None:
    with pytest.raises(ValueError, match="pass_number = -1"):
        AnalysisRequest("wf", (), pass_number=-1)
    with pytest.raises(TypeError, match="window must be a tuple"):
        AnalysisRequest("wf", ["text"])  # type: ignore[arg-type]


# --- loading plug-ins -----------------------------------------------------------------


def test_load_analyzer_by_module_path() -> None:
    assert load_analyzer("graph.analysis:heuristic_analyzer") is heuristic_analyzer


async def test_load_the_example_by_file_path() -> None:
    analyze = load_analyzer(f"{EXAMPLE}:analyze")
    assert load_analyzer(f"{EXAMPLE}:analyze") is analyze  # loaded once
    result = await analyze(_request(INCIDENT))
    assert isinstance(result, AnalysisResult)
    assert result.fields == {"keywords": 6}
    assert "Conclusion: an incident is under way." in result.analysis


async def test_load_the_example_by_module_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    analyze = load_analyzer("examples.keyword_analyzer:analyze")
    result = await analyze(_request(("All quiet.",)))
    assert result.fields == {"keywords": 0}
    assert result.analysis.endswith("Recommendation: keep watching.")


def test_load_a_relative_file_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert callable(load_analyzer("examples/keyword_analyzer.py:analyze"))


def _plugin(tmp_path: Path, source: str) -> str:
    path = tmp_path / "plugin.py"
    path.write_text(source, encoding="utf-8")
    return str(path)


_PLUGIN = """
from graph.analysis import AnalysisResult

async def good(request):
    return AnalysisResult("ok")

class Callable:
    async def __call__(self, request):
        return AnalysisResult("called")

instance = Callable()

def sync(request):
    return AnalysisResult("sync")

async def two(request, extra):
    return AnalysisResult("two")

value = 42
"""


async def test_load_accepts_an_object_with_async_call(tmp_path: Path) -> None:
    analyze = load_analyzer(f"{_plugin(tmp_path, _PLUGIN)}:instance")
    assert (await analyze(_request(()))).analysis == "called"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", r"analyzer '': expected 'package\.module:function' or 'path/to/file\.py:function'"),
        ("graph.analysis", "expected 'package.module:function'"),
        ("graph.analysis:", "expected 'package.module:function'"),
        (":analyze", "expected 'package.module:function'"),
        ("no_such_ctxd_module:analyze", "no module named 'no_such_ctxd_module'; is it installed"),
        ("graph.no_such_module:analyze", "no module named 'graph.no_such_module'"),
        ("not a module:analyze", "is neither a module name"),
        ("/no/such/dir/plugin.py:analyze", r"no file '/no/such/dir/plugin\.py'; check the path"),
        (
            "graph.analysis:missing",
            r"'graph\.analysis' has no attribute 'missing'; expected async def <name>\("
            r"request: AnalysisRequest\) -> AnalysisResult",
        ),
        ("graph.analysis:MAX_ANALYSIS_BYTES", "'MAX_ANALYSIS_BYTES' is a int, not callable"),
        ("graph.analysis:load_analyzer", "'load_analyzer' is not a coroutine function; expected"),
    ],
)
def test_load_analyzer_errors_name_the_path_and_signature(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_analyzer(target)


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("sync", "'sync' is not a coroutine function"),
        ("two", r"'two' has signature \(request, extra\), which does not take exactly one"),
        ("value", "'value' is a int, not callable"),
        ("absent", "has no attribute 'absent'"),
    ],
)
def test_load_analyzer_errors_for_file_plugins(
    tmp_path: Path, attribute: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_analyzer(f"{_plugin(tmp_path, _PLUGIN)}:{attribute}")


def test_a_plugin_that_fails_to_import_is_a_config_error(tmp_path: Path) -> None:
    broken = _plugin(tmp_path, "import no_such_dependency_of_the_plugin\n")
    modules = set(sys.modules)
    with pytest.raises(ConfigError, match="ModuleNotFoundError: No module named 'no_such_depend"):
        load_analyzer(f"{broken}:analyze")
    assert set(sys.modules) == modules  # the half-loaded module is not left behind
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def (:\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="SyntaxError"):
        load_analyzer(f"{syntax}:analyze")


def test_a_module_whose_dependency_is_missing_says_which(tmp_path: Path) -> None:
    package = tmp_path / "ctxd_test_plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "mod.py").write_text("import no_such_dep_xyz\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(
            ConfigError, match=r"importing 'ctxd_test_plugin_pkg\.mod' failed: No module named"
        ):
            load_analyzer("ctxd_test_plugin_pkg.mod:analyze")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.startswith("ctxd_test_plugin_pkg")]:
            del sys.modules[name]
