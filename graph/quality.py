"""The seed's quality heuristic for an analysis text.

This is ``EnterpriseRoutingEngine._calculate_quality_score`` of the seed, kept number
for number: it feeds the routing context, and the routing tables (ours and the
outside tests') are written against these exact values. It is deterministic and needs
no model, so the service runs anywhere and tests can be exact.

The score is a weighted sum of four parts, capped at 1.0:

=============  ======  ===================================================================
part           weight  value
=============  ======  ===================================================================
length         0.25    ``len(text) / 500``, capped at 1.0
keywords       0.35    share of the five quality keywords found (case-insensitive)
structure      0.25    occurrences of newline, ``.``, ``:``, ``-``, ``•`` over 10, capped
complexity     0.15    complexity words found (case-insensitive) over 3, capped at 1.0
=============  ======  ===================================================================

Matching is by substring, as in the seed: ``"analyses"`` does not contain
``"analysis"``, but ``"reanalysis"`` does.
"""

from __future__ import annotations

__all__ = ["quality_score"]

_QUALITY_KEYWORDS = ("analysis", "conclusion", "evidence", "findings", "recommendation")
# The seed prints the last indicator as three odd characters: the UTF-8 bytes of the
# bullet U+2022 read as Mac Roman (mojibake), so the bullet is what its author meant.
_STRUCTURE_INDICATORS = ("\n", ".", ":", "-", "\u2022")
_COMPLEXITY_WORDS = ("however", "therefore", "furthermore", "consequently", "moreover")

_OPTIMAL_LENGTH = 500
_STRUCTURE_SATURATION = 10
_COMPLEXITY_SATURATION = 3


def quality_score(text: str) -> float:
    """Score how thorough an analysis text looks, from 0.0 to 1.0.

    Args:
        text: the analysis to score; the empty string scores 0.0.

    Returns:
        The seed's composite score: length, quality keywords, structure marks and
        complexity words weighted 0.25, 0.35, 0.25 and 0.15, capped at 1.0.
    """
    if not text:
        return 0.0
    lowered = text.lower()
    length_score = min(len(text) / _OPTIMAL_LENGTH, 1.0)
    keyword_score = sum(1 for keyword in _QUALITY_KEYWORDS if keyword in lowered) / len(
        _QUALITY_KEYWORDS
    )
    # Structure marks are counted on the original text: they have no case.
    structure_score = min(
        sum(text.count(indicator) for indicator in _STRUCTURE_INDICATORS) / _STRUCTURE_SATURATION,
        1.0,
    )
    complexity_score = min(
        sum(1 for word in _COMPLEXITY_WORDS if word in lowered) / _COMPLEXITY_SATURATION, 1.0
    )
    # Same summation order as the seed, so results agree with it to the last bit.
    composite = (
        length_score * 0.25
        + keyword_score * 0.35
        + structure_score * 0.25
        + complexity_score * 0.15
    )
    return min(composite, 1.0)
