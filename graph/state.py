"""The workflow's state schema: what one workflow remembers between events.

Everything in the state is plain JSON (strings, numbers, lists, dicts): no datetimes,
no custom classes, so the strict checkpoint serializer never needs to revive an object.
Per-event fields are reset by the input of each run; durable context (window,
segments, analysis, counters) lives on across events.

One graph run may carry several events of the same workflow (``inbox``): the analyzer
takes the next one when the current one is complete, and every finished event's result
lands in ``outbox``, keyed by event id, where the ingress reads it after the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, TypedDict, cast

__all__ = [
    "INTEGRITY_FIELDS",
    "JSON",
    "ContextState",
    "integrity_hash",
    "merge_dicts",
    "outbox_result",
]

JSON = Any  # a plain-JSON value; the precise recursive type adds nothing for readers here.

# Fields the integrity hash covers: the durable context that the graph alone may change.
INTEGRITY_FIELDS = ("workflow_id", "window", "segments", "analysis", "events_processed")


def merge_dicts(old: dict[str, JSON] | None, new: dict[str, JSON] | None) -> dict[str, JSON]:
    """Reducer for fan-in channels: merge, or reset when the update is an empty dict."""
    if not new:
        return {}
    return {**(old or {}), **new}


def outbox_result(outbox: Mapping[str, JSON] | None, event_id: str) -> dict[str, JSON] | None:
    """An event's result from the outbox: a JSON string (dicts in older checkpoints)."""
    entry = (outbox or {}).get(event_id)
    if entry is None:
        return None
    return cast(dict[str, JSON], json.loads(entry)) if isinstance(entry, str) else dict(entry)


def integrity_hash(values: Mapping[str, JSON]) -> str:
    """SHA-256 over the canonical JSON of :data:`INTEGRITY_FIELDS`; stable across processes."""
    subset = {name: values.get(name) for name in INTEGRITY_FIELDS}
    canonical = json.dumps(subset, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ContextState(TypedDict, total=False):
    """One workflow's state (LangGraph channels).

    Durable context:
        workflow_id: the thread id.
        window: the current segment's recent event texts, oldest first (bounded).
        segment: the current segment's number.
        segments: closed segments: number, summary, rollback checkpoint id (bounded).
        analysis: the current analysis of the window.
        analysis_fields: the analyzer plug-in's structured fields for it.
        quality: quality score of ``analysis`` (the seed's formula).
        events_processed: events integrated so far.
        error_count: errors recorded so far, over all events.
        integrity_hash: hash of the integrity fields as the graph last wrote them.
        decisions: the latest decisions with their scores and reasons (bounded; the
            full record of the current one is in ``decision``).
        health: the last health check (the seed's ``_monitor_state_health``).
        outbox: results of recent events by event id (bounded), for effectively-once;
            each result is one compact JSON string (cheap to checkpoint).

    Per event (reset by each run's input and when the analyzer takes the next event):
        inbox: events still to process in this run.
        run_size: how many events this run was given; the outbox keeps at least twice
            as many results (this run's and, on a redelivery, the previous run's).
        event: the event in progress.
        iteration, passes, drift, monitored, decided, retry_requested,
        segment_rotated: the analyzer's features for the event in progress.
        research: research workers' findings by domain (fan-in).
        route: nodes visited for the event in progress.
        errors: errors recorded for the event in progress.
        decision: the decision engine's latest outcome for the event.
        route_reason: why the analyzer chose its latest route.
        next_route: the route the analyzer chose (its conditional edge reads it).
        analysis_stale: the window changed since the last analysis.
        base_checkpoint_id: the checkpoint this run started from (a rollback point).
    """

    workflow_id: str
    window: list[str]
    segment: int
    segments: list[dict[str, JSON]]
    analysis: str
    analysis_fields: dict[str, JSON]
    quality: float
    events_processed: int
    error_count: int
    integrity_hash: str
    decisions: list[dict[str, JSON]]
    health: dict[str, JSON]
    outbox: dict[str, str]

    inbox: list[dict[str, JSON]]
    run_size: int
    event: dict[str, JSON] | None
    iteration: int
    passes: int
    drift: float
    monitored: bool
    decided: bool
    retry_requested: bool
    segment_rotated: bool
    research: Annotated[dict[str, JSON], merge_dicts]
    route: list[str]
    errors: list[dict[str, JSON]]
    decision: dict[str, JSON] | None
    route_reason: str
    next_route: str
    analysis_stale: bool
    base_checkpoint_id: str | None
