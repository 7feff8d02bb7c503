"""The seed's research workers: which domains an event calls for, and what they find.

The seed's orchestrator (``_orchestrator_with_state_tracking``) asks
``_analyze_task_complexity`` whether a task needs research and in which domains, then
``_create_research_workers`` sends one worker per domain with a fixed focus, depth,
time allowance and quality threshold. Here that is :func:`needs_research` (keyword
detection), :func:`research_task` (the seed's numbers) and :func:`run_research` (the
deterministic default worker, no model, no network), for the ``adaptive_processor`` to
fan out with LangGraph ``Send``.

Unlike the seed, a task id is never made from the clock: the caller passes a stable one
(the event id and the domain, say), so a replayed event sends the same tasks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from graph.features import split_sentences

__all__ = [
    "DOMAIN_KEYWORDS",
    "ResearchDomain",
    "ResearchTask",
    "needs_research",
    "research_task",
    "run_research",
]

_WORD = re.compile(r"[^\W_]+")


class ResearchDomain(StrEnum):
    """A research worker's field, in the order the seed creates the workers."""

    TECHNICAL = "technical"
    MARKET = "market"
    COMPETITIVE = "competitive"


_TECHNICAL_WORDS = """
    api apis architecture backend bug bugs cache cpu crash crashes database databases
    deploy deployed deployment deployments frontend infrastructure integration kubernetes
    latency memory microservice microservices outage outages performance scalability
    security server servers throughput timeout timeouts vulnerability
"""
_MARKET_WORDS = """
    adoption buyers churn customer customers demand growth market markets price prices
    pricing revenue sales segment segments subscription subscriptions
"""
_COMPETITIVE_WORDS = """
    alternative alternatives competition competitive competitor competitors incumbent
    incumbents rival rivals versus vs
"""

DOMAIN_KEYWORDS: Mapping[ResearchDomain, frozenset[str]] = {
    ResearchDomain.TECHNICAL: frozenset(_TECHNICAL_WORDS.split()),
    ResearchDomain.MARKET: frozenset(_MARKET_WORDS.split()),
    ResearchDomain.COMPETITIVE: frozenset(_COMPETITIVE_WORDS.split()),
}
"""Single-word keywords per domain (lowercase, plurals spelt out)."""

# Phrases are matched first and their words are not matched again: "market share" is a
# competitive concern, and its "market" does not also call for market research.
_DOMAIN_PHRASES: Mapping[ResearchDomain, tuple[tuple[str, ...], ...]] = {
    ResearchDomain.TECHNICAL: (("tech", "debt"), ("technical", "debt")),
    ResearchDomain.MARKET: (("go", "to", "market"),),
    ResearchDomain.COMPETITIVE: (("market", "share"), ("head", "to", "head")),
}

# The seed's numbers, per domain: focus, depth, allocated seconds, quality threshold.
_SEED_TASKS: Mapping[ResearchDomain, tuple[str, str, float, float]] = {
    ResearchDomain.TECHNICAL: ("technical_analysis", "comprehensive", 300.0, 0.8),
    ResearchDomain.MARKET: ("market_analysis", "standard", 240.0, 0.7),
    ResearchDomain.COMPETITIVE: ("competitive_landscape", "detailed", 360.0, 0.75),
}

# How many sentences a worker quotes, by depth; longer quotes are cut.
_SENTENCES_BY_DEPTH: Mapping[str, int] = {"standard": 3, "detailed": 4, "comprehensive": 5}
_MAX_SENTENCE_CHARS = 200
_MAX_NAMED_KEYWORDS = 6


def _mentions(text: str) -> dict[ResearchDomain, list[str]]:
    """Keywords and phrases of each domain found in ``text``, in order of first occurrence."""
    words = [match.group().lower() for match in _WORD.finditer(text)]
    taken = [False] * len(words)
    found: dict[ResearchDomain, list[str]] = {domain: [] for domain in ResearchDomain}
    hits: list[tuple[int, ResearchDomain, str]] = []
    for domain, phrases in _DOMAIN_PHRASES.items():
        for phrase in phrases:
            size = len(phrase)
            for start in range(len(words) - size + 1):
                if tuple(words[start : start + size]) == phrase and not any(
                    taken[start : start + size]
                ):
                    taken[start : start + size] = [True] * size
                    hits.append((start, domain, " ".join(phrase)))
    for position, word in enumerate(words):
        if taken[position]:
            continue
        for domain, keywords in DOMAIN_KEYWORDS.items():
            if word in keywords:
                hits.append((position, domain, word))
    for _, domain, keyword in sorted(hits, key=lambda hit: hit[0]):
        if keyword not in found[domain]:
            found[domain].append(keyword)
    return found


def needs_research(text: str) -> tuple[ResearchDomain, ...]:
    """Which research domains a text calls for (the seed's ``_analyze_task_complexity``).

    Words are matched case-insensitively as whole words against
    :data:`DOMAIN_KEYWORDS`, after a few phrases (``market share`` is competitive, not
    market research).

    Args:
        text: the content to look at.

    Returns:
        The domains with at least one keyword, in declaration order (technical, market,
        competitive); empty when nothing matches.
    """
    found = _mentions(text)
    return tuple(domain for domain in ResearchDomain if found[domain])


@dataclass(frozen=True)
class ResearchTask:
    """One research worker's assignment (the seed's ``Send`` payload).

    Attributes:
        task_id: a stable id chosen by the caller.
        domain: the worker's field.
        focus: the seed's focus name (``technical_analysis``…).
        depth: ``comprehensive``, ``standard`` or ``detailed``.
        allocated_time: seconds the worker may take; the caller enforces it (for
            example with ``anyio.fail_after``).
        quality_threshold: the quality the seed expects of the worker's findings.
    """

    task_id: str
    domain: ResearchDomain
    focus: str
    depth: str
    allocated_time: float
    quality_threshold: float

    @property
    def node(self) -> str:
        """The seed's worker node name, e.g. ``technical_research_worker``."""
        return f"{self.domain.value}_research_worker"

    def to_payload(self) -> dict[str, str | float]:
        """The task as plain values, for a ``Send`` argument or a stream message."""
        return {
            "task_id": self.task_id,
            "domain": self.domain.value,
            "focus": self.focus,
            "depth": self.depth,
            "allocated_time": self.allocated_time,
            "quality_threshold": self.quality_threshold,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, str | float]) -> ResearchTask:
        """Rebuild a task from :meth:`to_payload` output.

        Args:
            payload: the plain values.

        Returns:
            The task.

        Raises:
            ValueError: a field is missing or has the wrong type, or the domain is unknown.
        """
        try:
            return cls(
                task_id=str(payload["task_id"]),
                domain=ResearchDomain(str(payload["domain"])),
                focus=str(payload["focus"]),
                depth=str(payload["depth"]),
                allocated_time=float(payload["allocated_time"]),
                quality_threshold=float(payload["quality_threshold"]),
            )
        except KeyError as exc:
            raise ValueError(f"research task payload lacks {exc.args[0]!r}: {payload!r}") from None


def research_task(domain: ResearchDomain, task_id: str) -> ResearchTask:
    """The seed's assignment for a domain.

    ===========  =====================  =============  =======  =========
    domain       focus                  depth          seconds  threshold
    ===========  =====================  =============  =======  =========
    technical    technical_analysis     comprehensive  300      0.8
    market       market_analysis        standard       240      0.7
    competitive  competitive_landscape  detailed       360      0.75
    ===========  =====================  =============  =======  =========

    Args:
        domain: the worker's field.
        task_id: a stable, non-empty id (never derived from the clock).

    Returns:
        The task.

    Raises:
        ValueError: ``task_id`` is empty.
    """
    if not task_id:
        raise ValueError("task_id must be a non-empty, stable id (e.g. '<event_id>:technical')")
    domain = ResearchDomain(domain)
    focus, depth, allocated_time, quality_threshold = _SEED_TASKS[domain]
    return ResearchTask(task_id, domain, focus, depth, allocated_time, quality_threshold)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


async def run_research(task: ResearchTask, text: str) -> str:
    """Deterministic findings for a task: the text's sentences about the task's domain.

    The sentences naming the most of the domain's keywords are quoted (earlier first
    on ties), in text order: 3, 4 or 5 of them for ``standard``, ``detailed`` or
    ``comprehensive`` depth, each cut to 200 characters. The result is at most about
    1.3 KB whatever the input.

    Args:
        task: the assignment.
        text: the content to research.

    Returns:
        A headline line and one ``- `` line per quoted sentence.
    """
    sentences = split_sentences(text)
    scored: list[tuple[int, int, list[str]]] = []
    for position, sentence in enumerate(sentences):
        keywords = _mentions(sentence)[task.domain]
        if keywords:
            scored.append((position, len(keywords), keywords))
    headline = f"{task.domain.value} research ({task.depth})"
    if not scored:
        return f"{headline}: no sentence mentions a {task.domain.value} keyword."
    limit = _SENTENCES_BY_DEPTH.get(task.depth, 3)
    chosen = sorted(sorted(scored, key=lambda item: (-item[1], item[0]))[:limit])
    named: list[str] = []
    for _, _, keywords in scored:
        named.extend(keyword for keyword in keywords if keyword not in named)
    lines = [
        f"{headline}: {len(scored)} of {len(sentences)} sentences mention "
        f"{', '.join(named[:_MAX_NAMED_KEYWORDS])}."
    ]
    lines.extend(
        f"- {_clip(sentences[position], _MAX_SENTENCE_CHARS)}" for position, _, _ in chosen
    )
    return "\n".join(lines)
