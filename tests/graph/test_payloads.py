"""The typed seam between nodes and workers: each kind's handler answers exactly the keys
its reply ``TypedDict`` declares, and JSON values read back as the types nodes expect."""

from __future__ import annotations

import pytest

from graph.json_values import as_float, as_int, as_list, as_object, as_objects, as_str
from graph.payloads import (
    AnalysisPayload,
    AnalysisReply,
    DecisionPayload,
    DecisionReply,
    MonitoringPayload,
    MonitoringReply,
    ResearchPayload,
    ResearchReply,
    UpdatePayload,
    UpdateReply,
)
from graph.state import INTEGRITY_FIELDS, JSON
from graph.work import (
    LocalDispatch,
    WorkKind,
    request_analysis,
    request_decision,
    request_health,
    request_research,
    request_summary,
)

WINDOW = ["The rollout failed twice.", "Market share fell after the price change."]


def _keys_match(answer: object, required: frozenset[str], optional: frozenset[str]) -> None:
    """``answer`` has every required key of its reply type and no undeclared one."""
    assert isinstance(answer, dict)
    assert required <= answer.keys() <= required | optional


async def test_every_kind_answers_its_declared_reply() -> None:
    dispatch = LocalDispatch()
    analysis: AnalysisPayload = {"workflow_id": "wf-1", "window": WINDOW, "pass_number": 1}
    _keys_match(
        await request_analysis(dispatch, analysis),
        AnalysisReply.__required_keys__,
        AnalysisReply.__optional_keys__,
    )
    research: ResearchPayload = {
        "op": "research",
        "domain": "market",
        "task_id": "e1:market:0",
        "text": WINDOW[1],
    }
    found = await request_research(dispatch, research)
    _keys_match(found, ResearchReply.__required_keys__, ResearchReply.__optional_keys__)
    assert found["domain"] == "market"
    update: UpdatePayload = {"window": WINDOW}
    _keys_match(
        await request_summary(dispatch, update),
        UpdateReply.__required_keys__,
        UpdateReply.__optional_keys__,
    )
    monitoring: MonitoringPayload = {"values": dict.fromkeys(INTEGRITY_FIELDS)}
    health = await request_health(dispatch, monitoring)
    _keys_match(health, MonitoringReply.__required_keys__, MonitoringReply.__optional_keys__)
    assert health["state_integrity"] == "valid"  # no stored hash: nothing to compare
    decision: DecisionPayload = {
        "context": {
            "quality_score": 0.95,
            "performance_score": 0.9,
            "error_rate": 0.0,
            "resource_utilization": 0.1,
            "business_priority": "standard",
        }
    }
    outcome = await request_decision(dispatch, decision)
    _keys_match(outcome, DecisionReply.__required_keys__, DecisionReply.__optional_keys__)
    assert outcome["decision"] in outcome["viable"]
    assert set(outcome["viable"]) <= outcome["scores"].keys()


async def test_a_payload_of_the_wrong_shape_fails_its_request() -> None:
    """A missing key is the request's failure (the asker gets the error), not a bad reply."""
    wrong: dict[str, JSON] = {"window": ["one event"]}
    with pytest.raises(KeyError):
        await LocalDispatch()(WorkKind.DECISION, wrong)


def test_json_values_keep_the_nodes_defaults() -> None:
    """Missing, None and empty values read as the default; a scalar converts."""
    assert as_int(None) == 0
    assert as_int(0, 1) == 1  # the nodes' ``int(x or 1)``
    assert as_int("7") == 7
    assert as_float(None, 2.5) == 2.5
    assert as_float(3) == 3.0
    assert as_str(None, "standard") == "standard"
    assert as_str(12) == "12"
    assert as_list(None) == []
    assert as_object(None) == {}
    errors: list[JSON] = [{"kind": "analysis"}]
    copied = as_objects(errors)
    assert copied == errors
    assert copied is not errors  # a copy: a node may change it


@pytest.mark.parametrize(
    ("read", "value"),
    [
        (as_int, [1]),
        (as_float, {"a": 1}),
        (as_str, ["x"]),
        (as_list, {"a": 1}),
        (as_object, [1]),
        (as_objects, [1, 2]),
    ],
)
def test_json_values_refuse_another_type(read: object, value: object) -> None:
    """A value of the wrong type is a TypeError naming it, never a silent coercion."""
    assert callable(read)
    with pytest.raises(TypeError, match="expected"):
        read(value)
