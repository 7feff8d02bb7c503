"""The input contract of ``ctxd:in``: raw stream fields in, a valid :class:`Event` out.

Limits are checked before anything is parsed (field count, then sizes), so a hostile
entry costs little. Every violation raises :class:`~graph.errors.InvalidEntryError`
with a ``reason`` tag and a message a person can act on; the ingress sends such
entries to the DLQ on their first delivery.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from graph.errors import InvalidEntryError
from graph.routing import PRIORITIES

__all__ = ["Event", "decode_fields", "parse_event"]

_WORKFLOW_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_EVENT_ID_MAX = 200
_METADATA_MAX = 16 * 1024
_OTHER_FIELD_MAX = 4 * 1024


@dataclass(frozen=True)
class Event:
    """One valid input entry.

    Attributes:
        source_id: the stream entry id in ``ctxd:in``.
        workflow_id: the LangGraph thread id.
        event_id: the idempotency key (the entry id when the producer gave none).
        content: the event's text.
        priority: ``low|standard|high|critical``.
        deadline: ISO-8601 with a UTC offset, or None.
        max_cost: the cost budget, or None.
        metadata: the producer's JSON object.
        carrier: ``traceparent``/``tracestate`` as sent.
        control: ``resume`` or ``rollback`` for a control entry, None for an event.
        value: a resume's answer (parsed JSON).
        checkpoint_id: a rollback's target checkpoint.
    """

    source_id: str
    workflow_id: str
    event_id: str
    content: str
    priority: str = "standard"
    deadline: str | None = None
    max_cost: float | None = None
    metadata: Mapping[str, object] = field(default_factory=dict)
    carrier: Mapping[str, str] = field(default_factory=dict)
    # A control entry (``ctxd resume`` / ``ctxd rollback``) instead of an event:
    control: str | None = None
    value: object = None
    checkpoint_id: str | None = None

    def as_state(self) -> dict[str, object]:
        """A plain-JSON form for the workflow state (no datetimes, no custom types)."""
        return {
            "source_id": self.source_id,
            "event_id": self.event_id,
            "content": self.content,
            "priority": self.priority,
            "deadline": self.deadline,
            "max_cost": self.max_cost,
            "metadata": dict(self.metadata),
        }


def decode_fields(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, str | bytes]:
    """Field names as text; values stay bytes where they are not valid UTF-8."""
    decoded: dict[str, str | bytes] = {}
    for key, value in raw.items():
        name = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else str(key)
        if isinstance(value, bytes):
            try:
                decoded[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                decoded[name] = value
        else:
            decoded[name] = value
    return decoded


def _text(fields: Mapping[str, str | bytes], name: str, limit: int) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        raise InvalidEntryError(
            "invalid_utf8", f"field {name!r} is not valid UTF-8: send text encoded as UTF-8"
        )
    if len(value.encode("utf-8")) > limit:
        reason = "oversized_content" if name == "content" else f"oversized_{name}"
        raise InvalidEntryError(
            reason,
            f"field {name!r} is {len(value.encode('utf-8'))} bytes, over the limit of {limit}: "
            f"split the event or raise CTXD_MAX_CONTENT_BYTES",
        )
    return value


def _deadline(raw: str) -> str:
    text = raw.strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEntryError(
            "invalid_deadline",
            f"deadline {raw[:60]!r} is not an ISO-8601 timestamp: use e.g. 2026-01-31T12:00:00Z",
        ) from None
    if moment.tzinfo is None:
        raise InvalidEntryError(
            "invalid_deadline",
            f"deadline {raw[:60]!r} has no UTC offset: add Z or +HH:MM so it is unambiguous",
        )
    return moment.astimezone(UTC).isoformat()


def _max_cost(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidEntryError(
            "invalid_max_cost", f"max_cost {raw[:60]!r} is not a finite number >= 0"
        )
    return value


def _metadata(raw: str) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidEntryError(
            "invalid_metadata", f"metadata is not valid JSON ({exc.msg} at {exc.pos})"
        ) from None
    if not isinstance(value, dict):
        raise InvalidEntryError(
            "invalid_metadata",
            f"metadata must be a JSON object, got {type(value).__name__}: send {{...}}",
        )
    return value


def parse_event(
    entry_id: str,
    fields: Mapping[str, str | bytes],
    *,
    max_content_bytes: int = 65536,
    max_fields: int = 32,
) -> Event:
    """Validate one ``ctxd:in`` entry.

    Args:
        entry_id: the stream entry id.
        fields: the entry's fields, as :func:`decode_fields` returns them.
        max_content_bytes: the content size limit in bytes.
        max_fields: the most fields an entry may have.

    Raises:
        InvalidEntryError: with a reason tag and an actionable message.
    """
    if len(fields) > max_fields:
        raise InvalidEntryError(
            "too_many_fields", f"entry has {len(fields)} fields, over the limit of {max_fields}"
        )
    workflow_id = _text(fields, "workflow_id", 1024)
    if workflow_id is None or not workflow_id:
        raise InvalidEntryError(
            "missing_workflow_id", "entry has no workflow_id: every event names its workflow"
        )
    if not _WORKFLOW_ID.fullmatch(workflow_id):
        raise InvalidEntryError(
            "invalid_workflow_id",
            f"workflow_id {workflow_id[:60]!r} is invalid: use 1-200 characters of "
            "letters, digits and _ . : -",
        )
    control = _control(fields)
    content = _text(fields, "content", max_content_bytes)
    if control is not None:
        content = content or f"ctxd {control.control}"
    if content is None or not content.strip():
        raise InvalidEntryError("missing_content", "entry has no content: send the event's text")
    event_id = _text(fields, "event_id", _EVENT_ID_MAX * 4)
    if event_id is not None and not (0 < len(event_id) <= _EVENT_ID_MAX):
        raise InvalidEntryError(
            "invalid_event_id", f"event_id must be 1-{_EVENT_ID_MAX} characters"
        )
    priority = _text(fields, "priority", _OTHER_FIELD_MAX)
    if priority is not None and priority not in PRIORITIES:
        raise InvalidEntryError(
            "invalid_priority",
            f"priority {priority[:60]!r} is not one of {', '.join(PRIORITIES)}",
        )
    deadline = _text(fields, "deadline", _OTHER_FIELD_MAX)
    max_cost = _text(fields, "max_cost", _OTHER_FIELD_MAX)
    metadata = _text(fields, "metadata", _METADATA_MAX)
    carrier = {
        name: value
        for name in ("traceparent", "tracestate")
        if (value := _text(fields, name, _OTHER_FIELD_MAX)) is not None
    }
    return Event(
        source_id=entry_id,
        workflow_id=workflow_id,
        event_id=event_id or entry_id,
        content=content,
        priority=priority or "standard",
        deadline=_deadline(deadline) if deadline is not None else None,
        max_cost=_max_cost(max_cost) if max_cost is not None else None,
        metadata=_metadata(metadata) if metadata is not None else {},
        carrier=carrier,
        control=control.control if control else None,
        value=control.value if control else None,
        checkpoint_id=control.checkpoint_id if control else None,
    )


@dataclass(frozen=True)
class _Control:
    control: str
    value: object = None
    checkpoint_id: str | None = None


def _control(fields: Mapping[str, str | bytes]) -> _Control | None:
    """The optional control fields: ``control=resume`` (+ ``value``, JSON) or
    ``control=rollback`` (+ ``checkpoint_id``)."""
    control = _text(fields, "control", _OTHER_FIELD_MAX)
    if control is None:
        return None
    if control == "resume":
        raw = _text(fields, "value", _METADATA_MAX)
        try:
            value = json.loads(raw) if raw is not None else None
        except json.JSONDecodeError as exc:
            raise InvalidEntryError(
                "invalid_value", f"resume value is not valid JSON ({exc.msg} at {exc.pos})"
            ) from None
        return _Control(control, value=value)
    if control == "rollback":
        checkpoint_id = _text(fields, "checkpoint_id", _OTHER_FIELD_MAX)
        if not checkpoint_id:
            raise InvalidEntryError(
                "missing_checkpoint_id",
                "a rollback needs checkpoint_id: see `ctxd state WORKFLOW_ID --history`",
            )
        return _Control(control, checkpoint_id=checkpoint_id)
    raise InvalidEntryError(
        "invalid_control", f"control {control[:60]!r} is not one of resume, rollback"
    )
