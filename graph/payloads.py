"""What each work kind is sent and answers: the JSON objects on the graph ↔ actors seam.

A node builds one of the payloads below and gets the matching reply; the handlers in
:mod:`graph.work` read the same shapes. On the wire (a mailbox entry, a reply entry)
they are plain JSON objects (:data:`~graph.state.JSON`): :func:`as_json` is the one place
a typed message becomes one, and :mod:`graph.work`'s ``request_*`` helpers the one place
a reply is read back as its kind's shape.

Keys marked ``NotRequired`` are those a handler has a default for, so an asker of an
older version that omits them is still served.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypeAlias, TypedDict, cast

from graph.state import JSON

__all__ = [
    "AnalysisPayload",
    "AnalysisReply",
    "DecisionContext",
    "DecisionPayload",
    "DecisionReply",
    "JSONObject",
    "MonitoringPayload",
    "MonitoringReply",
    "ResearchPayload",
    "ResearchReply",
    "UpdatePayload",
    "UpdateReply",
    "WorkMessage",
    "as_json",
]

JSONObject: TypeAlias = dict[str, JSON]
"""A JSON object: what a payload or reply is on the wire."""


class AnalysisPayload(TypedDict):
    """``analysis``: analyse the context window (the analyzer plug-in's request)."""

    workflow_id: str
    window: list[str]
    previous_analysis: NotRequired[str]
    pass_number: NotRequired[int]
    research: NotRequired[dict[str, str]]


class AnalysisReply(TypedDict):
    """The analysis and the plug-in's structured fields (text to ``str|int|float|bool``)."""

    analysis: str
    fields: dict[str, JSON]


class ResearchPayload(TypedDict):
    """``analysis`` with ``op=research``: one research worker's task."""

    op: Literal["research"]
    domain: str
    task_id: str
    text: str


class ResearchReply(TypedDict):
    """One domain's findings."""

    domain: str
    findings: str


class UpdatePayload(TypedDict):
    """``update``: summarise the segment being closed."""

    window: list[str]


class UpdateReply(TypedDict):
    """The closed segment's summary."""

    summary: str


class MonitoringPayload(TypedDict):
    """``monitoring``: the seed's state health check over these values."""

    values: dict[str, JSON]
    stored_hash: NotRequired[str]
    errors: NotRequired[list[dict[str, JSON]]]
    iterations: NotRequired[int]
    duration: NotRequired[float]
    breakers: NotRequired[dict[str, str]]


class MonitoringReply(TypedDict):
    """The health report (the seed's ``_monitor_state_health``)."""

    state_integrity: Literal["valid", "corrupted"]
    error_rate: float
    execution_duration: float
    worker_health: dict[str, str]
    recovery_actions: list[str]


class DecisionContext(TypedDict):
    """The routing context the decision engine scores (the seed's ``RoutingContext``)."""

    quality_score: float
    performance_score: float
    error_rate: float
    resource_utilization: float
    business_priority: str
    execution_deadline: NotRequired[str | None]
    cost_constraints: NotRequired[dict[str, float]]


class DecisionPayload(TypedDict):
    """``decision``: choose among the six routing decisions."""

    context: DecisionContext
    iteration_count: NotRequired[int]
    now: NotRequired[str | None]


class DecisionReply(TypedDict):
    """The decision, every decision's score, the viable set and why."""

    decision: str
    scores: dict[str, float]
    raw_scores: NotRequired[dict[str, float]]
    viable: list[str]
    reason: str
    margin: float


WorkMessage: TypeAlias = (
    AnalysisPayload
    | AnalysisReply
    | ResearchPayload
    | ResearchReply
    | UpdatePayload
    | UpdateReply
    | MonitoringPayload
    | MonitoringReply
    | DecisionContext
    | DecisionPayload
    | DecisionReply
)
"""Any payload or reply above."""


def as_json(message: WorkMessage) -> JSONObject:
    """``message`` as the JSON object it is on the wire.

    Every value type above is a JSON type, but a ``TypedDict`` is never a
    ``dict[str, JSON]`` to a type checker; this says so once instead of at every send.
    """
    return cast(JSONObject, message)
