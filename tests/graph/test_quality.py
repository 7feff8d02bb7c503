"""The seed's quality score, number for number, on texts whose parts are counted by hand."""

from __future__ import annotations

import pytest

from graph.quality import quality_score

# Weights of the four parts: length .25, keywords .35, structure .25, complexity .15.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", 0.0, id="empty"),
        # length 1/500 * .25
        pytest.param("x", 0.0005, id="one-char"),
        # length 1/500 * .25 + structure 1/10 * .25
        pytest.param("\u2022", 0.0255, id="bullet-counts-as-structure"),
        # The seed's mojibake of the bullet is three plain characters: length only.
        pytest.param("\u201a\u00c4\u00a2", 0.0015, id="mojibake-is-not-a-bullet"),
        # length 19/500*.25 = .0095; keywords 2/5*.35 = .14; structure (":" ".") 2/10*.25 = .05
        pytest.param("Analysis: evidence.", 0.1995, id="keywords-and-structure"),
        # length 53/500*.25 = .0265; keywords 2/5*.35 = .14;
        # structure ("." "\n" ":" ".") 4/10*.25 = .1; complexity 2/3*.15 = .1
        pytest.param(
            "However, the analysis shows evidence.\nTherefore: act.", 0.3665, id="all-four-parts"
        ),
        # length 8/500*.25 = .004; keyword matching ignores case: 1/5*.35 = .07
        pytest.param("FINDINGS", 0.074, id="keywords-ignore-case"),
        # length 17/500*.25 = .0085; one keyword counts once however often it appears
        pytest.param("analysis analysis", 0.0785, id="keyword-counted-once"),
        # length 8/500*.25 = .004; substring semantics: "analyses" lacks "analysis"
        pytest.param("analyses", 0.004, id="plural-is-no-keyword"),
        # length 10/500*.25 = .005 + keyword 1/5*.35 = .07: "reanalysis" contains it
        pytest.param("reanalysis", 0.075, id="substring-is-a-keyword"),
        # length 17/500*.25 = .0085; every dash counts: 2/10*.25 = .05
        pytest.param("well-known - fact", 0.0585, id="structure-counts-every-mark"),
        # length 14/500*.25 = .007; 12 newlines cap structure at 1: .25
        pytest.param("\n" * 5 + "ab" + "\n" * 7, 0.257, id="structure-capped"),
        # length 54/500*.25 = .027; five complexity words cap at 1 (not 5/3): .15
        pytest.param(
            "however therefore furthermore consequently moreover ok", 0.177, id="complexity-capped"
        ),
    ],
)
def test_quality_score_matches_hand_count(text: str, expected: float) -> None:
    """Each part is the seed's, with the seed's weights and substring matching."""
    assert quality_score(text) == pytest.approx(expected, rel=0, abs=1e-12)


def test_length_caps_at_500_characters() -> None:
    """Beyond 500 characters the length part stays at its full weight of 0.25."""
    assert quality_score("a" * 500) == pytest.approx(0.25, rel=0, abs=1e-12)
    assert quality_score("a" * 5000) == pytest.approx(0.25, rel=0, abs=1e-12)


def test_everything_present_scores_exactly_one() -> None:
    """A long, structured text with every keyword and complexity word scores 1.0."""
    text = (
        "Analysis. Conclusion: evidence - findings - recommendation.\n"
        "However, therefore, furthermore, consequently, moreover.\n"
    ) + "\u2022 detail\n" * 80
    assert len(text) > 500
    assert quality_score(text) == 1.0


def test_score_never_exceeds_one() -> None:
    """The composite is capped at 1.0 whatever the text holds."""
    text = " ".join(
        ["analysis conclusion evidence findings recommendation"]
        + ["however therefore furthermore consequently moreover"] * 20
        + ["- : . \u2022\n"] * 100
    )
    assert 0.0 < quality_score(text) <= 1.0
