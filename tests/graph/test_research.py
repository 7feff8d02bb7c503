"""Research domains, the seed's worker assignments and the default worker (graph/research.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graph.research import (
    DOMAIN_KEYWORDS,
    ResearchDomain,
    ResearchTask,
    needs_research,
    research_task,
    run_research,
)

TECHNICAL = ResearchDomain.TECHNICAL
MARKET = ResearchDomain.MARKET
COMPETITIVE = ResearchDomain.COMPETITIVE

TEXT = (
    "Our API latency doubled after the deploy. Customers complain about pricing. "
    "The rival gained market share versus us. Nothing else happened. "
    "The database is slow and the API times out."
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("The weather was pleasant all week.", ()),
        ("The API is slow.", (TECHNICAL,)),
        ("Latency spiked after the DEPLOY", (TECHNICAL,)),
        ("Pricing for enterprise customers", (MARKET,)),
        ("Revenue fell as demand in the SMB segment cooled", (MARKET,)),
        ("A competitor launched an alternative", (COMPETITIVE,)),
        ("Us versus them", (COMPETITIVE,)),
        # a phrase takes its words: market share is competitive, not market research
        ("Our market share fell", (COMPETITIVE,)),
        ("The market is growing and our market share fell", (MARKET, COMPETITIVE)),
        ("We must pay down tech debt", (TECHNICAL,)),
        # declaration order, whatever the order in the text
        ("Rivals cut prices while our database crashed", (TECHNICAL, MARKET, COMPETITIVE)),
        # whole words only
        ("The apiary and the marketplace", ()),
    ],
)
def test_needs_research_table(text: str, expected: tuple[ResearchDomain, ...]) -> None:
    assert needs_research(text) == expected


def test_domains_and_keywords() -> None:
    assert [domain.value for domain in ResearchDomain] == ["technical", "market", "competitive"]
    assert set(DOMAIN_KEYWORDS) == set(ResearchDomain)
    for keywords in DOMAIN_KEYWORDS.values():
        assert all(keyword.isalnum() and keyword.islower() for keyword in keywords)


@pytest.mark.parametrize(
    ("domain", "focus", "depth", "seconds", "threshold"),
    [
        (TECHNICAL, "technical_analysis", "comprehensive", 300, 0.8),
        (MARKET, "market_analysis", "standard", 240, 0.7),
        (COMPETITIVE, "competitive_landscape", "detailed", 360, 0.75),
    ],
)
def test_research_task_has_the_seed_numbers(
    domain: ResearchDomain, focus: str, depth: str, seconds: float, threshold: float
) -> None:
    task = research_task(domain, "evt-1:" + domain.value)
    assert task == ResearchTask(f"evt-1:{domain.value}", domain, focus, depth, seconds, threshold)
    assert task.node == f"{domain.value}_research_worker"


def test_research_task_id_is_the_callers_and_stable() -> None:
    assert research_task(TECHNICAL, "e1") == research_task(TECHNICAL, "e1")
    with pytest.raises(ValueError, match="task_id must be a non-empty, stable id"):
        research_task(TECHNICAL, "")


def test_task_payload_round_trips_through_plain_values() -> None:
    task = research_task(COMPETITIVE, "e1:competitive")
    payload = task.to_payload()
    assert payload == {
        "task_id": "e1:competitive",
        "domain": "competitive",
        "focus": "competitive_landscape",
        "depth": "detailed",
        "allocated_time": 360.0,
        "quality_threshold": 0.75,
    }
    assert ResearchTask.from_payload(payload) == task
    with pytest.raises(ValueError, match="lacks 'depth'"):
        ResearchTask.from_payload({k: v for k, v in payload.items() if k != "depth"})


async def test_run_research_quotes_the_domains_sentences() -> None:
    technical = await run_research(research_task(TECHNICAL, "t"), TEXT)
    assert technical == (
        "technical research (comprehensive): 2 of 5 sentences mention api, latency, deploy, "
        "database.\n"
        "- Our API latency doubled after the deploy.\n"
        "- The database is slow and the API times out."
    )
    competitive = await run_research(research_task(COMPETITIVE, "c"), TEXT)
    assert competitive == (
        "competitive research (detailed): 1 of 5 sentences mention rival, market share, versus.\n"
        "- The rival gained market share versus us."
    )


async def test_run_research_without_matches_says_so() -> None:
    findings = await run_research(research_task(MARKET, "m"), "Nothing to see.")
    assert findings == "market research (standard): no sentence mentions a market keyword."


async def test_run_research_keeps_the_best_sentences_in_text_order_by_depth() -> None:
    text = " ".join(
        [
            "Pricing moved.",  # 1 keyword
            "Customers, revenue and demand all fell.",  # 3
            "Sales were flat.",  # 1
            "Churn rose in one segment.",  # 2
            "Prices changed.",  # 1
        ]
    )
    findings = await run_research(research_task(MARKET, "m"), text)
    # standard depth quotes 3: the two richest, then the earliest of the ties.
    assert findings.splitlines()[1:] == [
        "- Pricing moved.",
        "- Customers, revenue and demand all fell.",
        "- Churn rose in one segment.",
    ]


async def test_run_research_is_bounded_and_deterministic() -> None:
    sentence = "The API latency and database performance degraded " + "badly " * 200 + ". "
    text = sentence * 400
    task = research_task(TECHNICAL, "t")
    first = await run_research(task, text)
    assert first == await run_research(task, text)
    assert len(first) <= 1400
    assert all(len(line) <= 203 for line in first.splitlines()[1:])


@given(st.text(max_size=400))
def test_needs_research_is_ordered_and_without_duplicates(text: str) -> None:
    domains = needs_research(text)
    assert list(domains) == sorted(set(domains), key=list(ResearchDomain).index)
