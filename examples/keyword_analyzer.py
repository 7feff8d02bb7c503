"""An example analyzer plug-in: count a domain's keywords, write a structured analysis.

ctxd calls an analyzer once per analysis pass with an ``AnalysisRequest`` (the context
window, oldest first, the previous analysis, the pass number and any research
findings) and stores the ``AnalysisResult`` it returns. This one needs no model: it
counts how often the words of :data:`KEYWORDS` occur in the window and writes
sections the seed's quality score recognises (analysis, findings, evidence,
conclusion, recommendation). The count is returned as the field ``keywords``.

To use it, name it in the ``analyzer`` setting of ctxd's configuration, by file or,
with the repository root on ``PYTHONPATH``, by module::

    analyzer = "examples/keyword_analyzer.py:analyze"
    analyzer = "examples.keyword_analyzer:analyze"

To put a language model here, copy this file and replace the body of :func:`analyze`
after the comment ``# An LLM call goes here``: build a prompt from
``request.window`` (newest last), ``request.previous_analysis`` and
``request.research``, ask for more depth as ``request.pass_number`` grows, ``await``
your client's async call, and return its text as ``AnalysisResult(analysis=...)``.
Keep the reply bounded (a few KiB: it is stored with every checkpoint), set a timeout
on the call, and let errors raise: ctxd records them, and its circuit breaker and
decision engine fall back to the heuristic path when the analyzer keeps failing.
"""

from __future__ import annotations

from graph.analysis import AnalysisRequest, AnalysisResult
from graph.features import split_sentences, terms

__all__ = ["KEYWORDS", "analyze"]

KEYWORDS = frozenset({"deploy", "latency", "outage", "error", "errors", "rollback", "incident"})
"""The domain's vocabulary: here, words of an operations incident."""

_MAX_QUOTES = 3
_MAX_QUOTE_CHARS = 160


async def analyze(request: AnalysisRequest) -> AnalysisResult:
    """Count :data:`KEYWORDS` in the window and write a structured analysis.

    Args:
        request: the context window and pass details.

    Returns:
        The analysis, with the field ``keywords``: keyword occurrences in the window.
    """
    # An LLM call goes here: replace everything down to the return with
    #   text = await client.complete(prompt_from(request), timeout=30)
    # and return AnalysisResult(analysis=text[:4096]).
    counts = terms("\n".join(request.window))
    found = {word: counts[word] for word in sorted(KEYWORDS) if counts[word]}
    total = sum(found.values())
    quotes = [
        sentence[:_MAX_QUOTE_CHARS]
        for text in request.window
        for sentence in split_sentences(text)
        if not KEYWORDS.isdisjoint(terms(sentence))
    ][:_MAX_QUOTES]

    lines = [f"Analysis: {total} keyword mentions in {len(request.window)} events."]
    if found:
        lines.append("Findings:")
        lines.extend(f"- {word}: {count}" for word, count in found.items())
    if quotes:
        lines.append("Evidence:")
        lines.extend(f'- "{quote}"' for quote in quotes)
    for domain, findings in sorted(request.research.items()):
        if findings.strip():
            headline = findings.strip().splitlines()[0]
            lines.append(f"- research ({domain}): {headline[:_MAX_QUOTE_CHARS]}")
    verdict = "an incident is under way" if total >= 3 else "no incident signal"
    lines.append(f"Conclusion: {verdict}.")
    lines.append(
        "Recommendation: page the on-call engineer."
        if total >= 3
        else "Recommendation: keep watching."
    )
    return AnalysisResult(analysis="\n".join(lines), fields={"keywords": total})
