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
import math
from collections.abc import Callable, Mapping
from typing import Annotated, TypeAlias, TypedDict, cast

__all__ = [
    "INTEGRITY_FIELDS",
    "JSON",
    "REQUIRED_FIELDS",
    "ContextState",
    "integrity_hash",
    "merge_dicts",
    "outbox_result",
    "state_problems",
]

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
"""A plain-JSON value: what the state, the work payloads and their replies are made of."""

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
    if isinstance(entry, str):
        return cast(dict[str, JSON], json.loads(entry))
    if not isinstance(entry, dict):
        raise TypeError(f"outbox entry {event_id!r} is {type(entry).__name__}, not a result")
    return dict(entry)


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


# -- the schema check ----------------------------------------------------------------
#
# A checkpoint is data anyone with write access to the store can change, and older ctxd
# versions wrote other shapes. The integrity hash sees a change to five fields; this
# check sees a value the nodes cannot work with (a wrong type anywhere, a missing field,
# an absurd size), so a bad checkpoint is refused on load instead of failing every run
# of its workflow. The bounds are far above what the nodes keep (8 window entries, 20
# segments and decisions, an outbox of 2 x the batch size): they only catch abuse.

REQUIRED_FIELDS = ("workflow_id", "window", "events_processed", "integrity_hash")
"""Fields every state has once it integrated an event (the analyzer sets them together)."""

_MAX_TEXT = 16 << 20  # characters in any one string (event content: CTXD_MAX_CONTENT_BYTES)
_MAX_ITEMS = 10_000  # entries in any one list or object
_MAX_WINDOW = 64
_MAX_DEPTH = 100  # nesting of free-form JSON (plug-in fields, health, resolutions)
_SHOWN = 60  # characters of an offending value shown in a problem


class _Problems:
    """Problems found so far; stops collecting at ``limit`` so a huge state costs little."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.found: list[str] = []

    @property
    def full(self) -> bool:
        return len(self.found) >= self.limit

    def add(self, path: str, text: str) -> None:
        if not self.full:
            self.found.append(f"{path}: {text}")


_Spec = Callable[[str, object, _Problems], None]


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return type(value).__name__


def _mismatch(path: str, expected: str, value: object, out: _Problems) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= _SHOWN else shown[: _SHOWN - 1] + "…"
    out.add(path, f"expected {expected}, got {_kind(value)} {shown}")


def _text(max_len: int = _MAX_TEXT) -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        if not isinstance(value, str):
            _mismatch(path, "str", value, out)
        elif len(value) > max_len:
            out.add(path, f"{len(value)} characters, at most {max_len} allowed")

    return check


def _integer() -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            _mismatch(path, "int", value, out)
        elif value < 0:
            out.add(path, f"expected an int >= 0, got {value}")

    return check


def _number(lo: float | None = None, hi: float | None = None, *, finite: bool = True) -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            _mismatch(path, "number", value, out)
        elif (
            (finite and not math.isfinite(value))
            or (lo is not None and value < lo)
            or (hi is not None and value > hi)
        ):
            out.add(path, f"expected a number in [{lo}, {hi}], got {value!r}")

    return check


def _flag(path: str, value: object, out: _Problems) -> None:
    if not isinstance(value, bool):
        _mismatch(path, "bool", value, out)


def _optional(spec: _Spec) -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        if value is not None:
            spec(path, value, out)

    return check


def _json_value(path: str, value: object, out: _Problems, depth: int = 0) -> None:
    """Plain JSON only: no bytes, no revived objects, bounded depth and sizes."""
    if value is None or isinstance(value, bool | int | str):
        if isinstance(value, str) and len(value) > _MAX_TEXT:
            out.add(path, f"{len(value)} characters, at most {_MAX_TEXT} allowed")
        return
    if isinstance(value, float):
        return
    if depth >= _MAX_DEPTH:
        out.add(path, f"nested deeper than {_MAX_DEPTH} levels")
        return
    if isinstance(value, list):
        if len(value) > _MAX_ITEMS:
            out.add(path, f"{len(value)} items, at most {_MAX_ITEMS} allowed")
            return
        for i, item in enumerate(value):
            if out.full:
                return
            _json_value(f"{path}[{i}]", item, out, depth + 1)
    elif isinstance(value, dict):
        if len(value) > _MAX_ITEMS:
            out.add(path, f"{len(value)} entries, at most {_MAX_ITEMS} allowed")
            return
        for key, item in value.items():
            if out.full:
                return
            if not isinstance(key, str):
                _mismatch(f"{path} key", "str", key, out)
            else:
                _json_value(f"{path}.{key}", item, out, depth + 1)
    else:
        _mismatch(path, "a JSON value", value, out)


def _json(path: str, value: object, out: _Problems) -> None:
    _json_value(path, value, out)


def _list(item: _Spec, max_items: int = _MAX_ITEMS) -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        if not isinstance(value, list):
            _mismatch(path, "list", value, out)
            return
        if len(value) > max_items:
            out.add(path, f"{len(value)} items, at most {max_items} allowed")
            return
        for i, element in enumerate(value):
            if out.full:
                return
            item(f"{path}[{i}]", element, out)

    return check


def _mapping(item: _Spec) -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        if not isinstance(value, dict):
            _mismatch(path, "dict", value, out)
            return
        if len(value) > _MAX_ITEMS:
            out.add(path, f"{len(value)} entries, at most {_MAX_ITEMS} allowed")
            return
        for key, element in value.items():
            if out.full:
                return
            if not isinstance(key, str):
                _mismatch(f"{path} key", "str", key, out)
            else:
                item(f"{path}.{key}", element, out)

    return check


def _record(
    fields: Mapping[str, _Spec], required: tuple[str, ...] = (), *, free: bool = False
) -> _Spec:
    """A JSON object whose named keys have types; other keys must be plain JSON
    (``free``: are not looked into, e.g. an event's metadata, validated on input)."""

    def check(path: str, value: object, out: _Problems) -> None:
        if not isinstance(value, dict):
            _mismatch(path, "dict", value, out)
            return
        for name in required:
            if name not in value:
                out.add(f"{path}.{name}", "missing (required)")
        if not free:
            _json_value(path, {k: v for k, v in value.items() if k not in fields}, out)
        for name, spec in fields.items():
            if name in value and not out.full:
                spec(f"{path}.{name}", value[name], out)

    return check


def _dict_only(path: str, value: object, out: _Problems) -> None:
    if not isinstance(value, dict):
        _mismatch(path, "dict", value, out)


def _one_of(*specs: _Spec, expected: str) -> _Spec:
    def check(path: str, value: object, out: _Problems) -> None:
        for spec in specs:
            trial = _Problems(1)
            spec(path, value, trial)
            if not trial.found:
                return
        _mismatch(path, expected, value, out)

    return check


# Events come validated from the input (content up to CTXD_MAX_CONTENT_BYTES); only
# the fields the nodes read are typed. They are in the state only mid-run or paused.
_EVENT = _record(
    {
        "event_id": _text(),
        "content": _text(1 << 40),
        "priority": _optional(_text()),
        "deadline": _optional(_text()),
        "max_cost": _optional(_number(finite=False)),
        "metadata": _optional(_dict_only),
        "started_at": _number(finite=False),
    },
    required=("event_id", "content"),
    free=True,
)
_DECISION = _record(
    {
        "event_id": _optional(_text()),
        "decision": _text(),
        "scores": _mapping(_number()),
        "reason": _text(),
        "margin": _number(),
    },
    required=("decision",),
)

_SCHEMA: dict[str, _Spec] = {
    "workflow_id": _text(),
    "window": _list(_text(), _MAX_WINDOW),
    "segment": _integer(),
    "segments": _list(
        _record(
            {
                "segment": _integer(),
                "summary": _text(),
                "events": _integer(),
                "checkpoint_id": _optional(_text()),
                "closed_at": _text(),
            },
            required=("segment", "summary"),
        )
    ),
    "analysis": _text(),
    "analysis_fields": _mapping(_json),
    "quality": _number(0.0, 1.0),
    "events_processed": _integer(),
    "error_count": _integer(),
    "integrity_hash": _text(128),
    "decisions": _list(_DECISION),
    "health": _mapping(_json),
    # One compact JSON string per result (a dict in older checkpoints).
    "outbox": _mapping(_one_of(_text(), _mapping(_json), expected="str or dict")),
    "inbox": _list(_EVENT),
    "run_size": _integer(),
    "event": _optional(_EVENT),
    "iteration": _integer(),
    "passes": _integer(),
    "drift": _number(),
    "monitored": _flag,
    "decided": _flag,
    "retry_requested": _flag,
    "segment_rotated": _flag,
    "research": _mapping(_json),
    "route": _list(_text()),
    "errors": _list(_mapping(_json)),
    "decision": _optional(_DECISION),
    "route_reason": _text(),
    "next_route": _text(),
    "analysis_stale": _flag,
    "base_checkpoint_id": _optional(_text()),
}


def state_problems(values: Mapping[str, object], *, limit: int = 8) -> list[str]:
    """Where a stored state does not fit :class:`ContextState`, as lines a person can act on.

    Checked on load, before a run uses the state (graph/recovery.py), and by
    ``ctxd state``: types of every channel down to the items of lists and objects,
    required fields, and bounds. An empty list means the state fits.

    Args:
        values: the checkpoint's channel values.
        limit: at most this many problems are reported (and looked for).

    Returns:
        Problems such as ``"window: expected list, got int 5"`` or
        ``"window: missing (required)"``, each naming the field; at most ``limit``.
    """
    out = _Problems(max(1, limit))
    if any(name in values for name in INTEGRITY_FIELDS if name != "workflow_id"):
        for name in REQUIRED_FIELDS:
            if name not in values:
                out.add(name, "missing (required)")
    for name, value in values.items():
        if out.full:
            break
        spec = _SCHEMA.get(name)
        if spec is not None:
            spec(name, value, out)
    return out.found
