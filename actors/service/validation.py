"""The input contract of ``ctxd:in``: raw stream fields in, a valid :class:`Event` out.

Whole-entry limits are checked on the raw bytes before anything is decoded or parsed
(:func:`check_entry`: field count, total bytes, names that are text), so a hostile
entry costs little; then each known field's size and form. JSON (``metadata``, a
resume's ``value``) is bounded too: at most :data:`JSON_MAX_DEPTH` levels, integers in
the signed 64-bit range (what the checkpoint serializer stores), finite numbers only.

Every violation raises :class:`~graph.errors.InvalidEntryError` with a ``reason`` tag
and a message a person can act on, and nothing else escapes :func:`parse_event`
whatever the bytes: an unexpected exception is reported as ``invalid_entry`` naming
its type. The router and the ingress send such entries to the DLQ on their first
delivery.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

from graph.errors import InvalidEntryError
from graph.routing import PRIORITIES
from graph.state import JSON

if TYPE_CHECKING:
    from actors.config import Settings

__all__ = [
    "JSON_MAX_DEPTH",
    "Event",
    "RawFields",
    "as_invalid_entry",
    "check_entry",
    "decode_fields",
    "parse_entry",
    "parse_event",
    "routing_key",
]

JSON_MAX_DEPTH = 32
"""The deepest nesting of arrays/objects a JSON field may have (the outer one counts)."""

_WORKFLOW_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_CHECKPOINT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_JSON_TOKENS = re.compile(r'\\.|["\[\]{}]', re.DOTALL)
RawFields = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[str, str | bytes]
"""An entry's fields as read (bytes) or as decoded (text, bytes where not UTF-8)."""

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_EVENT_ID_MAX = 200
_METADATA_MAX = 16 * 1024
_OTHER_FIELD_MAX = 4 * 1024
_MESSAGE_VALUE_MAX = 60


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
    metadata: Mapping[str, JSON] = field(default_factory=dict)
    carrier: Mapping[str, str] = field(default_factory=dict)
    # A control entry (``ctxd resume`` / ``ctxd rollback``) instead of an event:
    control: str | None = None
    value: JSON = None
    checkpoint_id: str | None = None

    def as_state(self) -> dict[str, JSON]:
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


def decode_fields(raw: RawFields) -> dict[str, str | bytes]:
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


def _size(value: str | bytes) -> int:
    """Bytes on the wire; a lone surrogate counts as its three bytes (refused later)."""
    return len(value) if isinstance(value, bytes) else len(value.encode("utf-8", "surrogatepass"))


def check_entry(
    raw: RawFields,
    *,
    max_fields: int,
    max_entry_bytes: int,
) -> None:
    """The whole-entry limits, on the fields as read, before anything is decoded.

    Unknown fields are allowed but count toward both limits, so no field escapes them.

    Raises:
        InvalidEntryError: ``too_many_fields``, ``oversized_entry`` or
            ``invalid_field_name`` (a name that is not UTF-8 text).
    """
    if len(raw) > max_fields:
        raise InvalidEntryError(
            "too_many_fields",
            f"entry has {len(raw)} fields, over the limit of {max_fields} (unknown fields "
            "count too): drop the extra fields or raise CTXD_MAX_FIELDS",
        )
    total = sum(_size(name) + _size(value) for name, value in raw.items())
    if total > max_entry_bytes:
        raise InvalidEntryError(
            "oversized_entry",
            f"entry is {total} bytes (field names and values, unknown fields included), over "
            f"the limit of {max_entry_bytes}: shorten it or raise CTXD_MAX_ENTRY_BYTES",
        )
    for name in raw:
        if isinstance(name, bytes):
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidEntryError(
                    "invalid_field_name",
                    f"field name {name[:_MESSAGE_VALUE_MAX]!r} is not UTF-8 text: name "
                    "fields with text",
                ) from None


def parse_entry(
    entry_id: str,
    raw: RawFields,
    settings: Settings,
) -> Event:
    """Check the whole-entry limits on ``raw``, then decode and validate it.

    The partition owner calls it once on every entry it reads (the router only reads
    the :func:`routing_key`).

    Raises:
        InvalidEntryError: only this, whatever the bytes.
    """
    try:
        check_entry(raw, max_fields=settings.max_fields, max_entry_bytes=settings.max_entry_bytes)
        # The limits hold for the decoded fields too (decoding keeps every byte), so the
        # fields are parsed without checking them a second time.
        return _parse(entry_id, decode_fields(raw), settings.max_content_bytes)
    except InvalidEntryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes: never past this point
        raise as_invalid_entry(exc) from None


def as_invalid_entry(exc: Exception) -> InvalidEntryError:
    """``exc`` itself when it is an :class:`InvalidEntryError`, else an ``invalid_entry``
    one naming the unexpected exception (bounded), for a DLQ entry a person can act on."""
    if isinstance(exc, InvalidEntryError):
        return exc
    detail = str(exc)[:200]
    return InvalidEntryError(
        "invalid_entry",
        f"entry could not be read ({type(exc).__name__}: {detail}): check the producer's "
        "fields against the input contract (README, Streams), and report it to ctxd's "
        "maintainers with this DLQ entry if they look right",
    )


def _text(fields: Mapping[str, str | bytes], name: str, limit: int) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        raise InvalidEntryError(
            "invalid_utf8", f"field {name!r} is not valid UTF-8: send text encoded as UTF-8"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEntryError(
            "invalid_utf8", f"field {name!r} is not valid UTF-8: send text encoded as UTF-8"
        ) from None
    if size > limit:
        reason = "oversized_content" if name == "content" else f"oversized_{name}"
        remedy = (
            "split the event or raise CTXD_MAX_CONTENT_BYTES" if name == "content" else "shorten it"
        )
        raise InvalidEntryError(
            reason, f"field {name!r} is {size} bytes, over the limit of {limit}: {remedy}"
        )
    if "\x00" in value:
        raise InvalidEntryError(
            "invalid_text",
            f"field {name!r} contains a NUL character (U+0000) at offset "
            f"{value.index(chr(0))}: remove it; text fields hold text",
        )
    return value


def _deadline(raw: str) -> str:
    text = raw.strip()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise InvalidEntryError(
            "invalid_deadline",
            f"deadline {raw[:60]!r} is not an ISO-8601 timestamp: use e.g. 2026-01-31T12:00:00Z",
        ) from None
    if moment.tzinfo is None:
        raise InvalidEntryError(
            "invalid_deadline",
            f"deadline {raw[:60]!r} has no UTC offset: add Z or +HH:MM so it is unambiguous",
        )
    try:
        return moment.astimezone(UTC).isoformat()
    except (ValueError, OverflowError):  # 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
        raise InvalidEntryError(
            "invalid_deadline",
            f"deadline {raw[:60]!r} is outside the years 1-9999 once converted to UTC: "
            "send a real date",
        ) from None


def _max_cost(raw: str) -> float:
    try:
        value = float(raw)
    except (ValueError, OverflowError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidEntryError(
            "invalid_max_cost", f"max_cost {raw[:60]!r} is not a finite number >= 0"
        )
    return value


class _JSONRejected(ValueError):
    """A JSON document that parses but breaks ctxd's rules (raised from the hooks)."""


def _json_int(text: str) -> int:
    # Checked on the digits first: int() of 5,000 digits raises (the int-string limit).
    if len(text.lstrip("-")) > 19 or not _INT_MIN <= (value := int(text)) <= _INT_MAX:
        raise _JSONRejected(
            f"integer {text[:_MESSAGE_VALUE_MAX]}{'…' if len(text) > 60 else ''} is outside "
            "the signed 64-bit range: send it as a string"
        )
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONRejected(f"number {text[:_MESSAGE_VALUE_MAX]} overflows: send it as a string")
    return value


def _json_constant(text: str) -> float:
    raise _JSONRejected(f"{text} is not JSON: send null or a string")


def _json_depth(raw: str) -> int:
    """The deepest bracket nesting outside strings, in one linear pass (no recursion)."""
    depth = deepest = 0
    in_string = False
    for token in _JSON_TOKENS.findall(raw):
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _load_json(raw: str, *, what: str) -> JSON:
    """Parse bounded JSON: depth, 64-bit integers, finite numbers, encodable strings.

    Raises:
        ValueError: with a message naming ``what`` and the rule broken.
    """
    deepest = _json_depth(raw)
    if deepest > JSON_MAX_DEPTH:
        raise _JSONRejected(
            f"{what} is nested {deepest} levels deep, over the limit of {JSON_MAX_DEPTH}: "
            "flatten it"
        )
    try:
        value = json.loads(
            raw, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
        )
    except json.JSONDecodeError as exc:
        raise _JSONRejected(f"{what} is not valid JSON ({exc.msg} at {exc.pos})") from None
    except RecursionError:  # not reached after the depth check; kept as a last guard
        raise _JSONRejected(f"{what} is nested too deep: flatten it") from None
    except _JSONRejected as exc:
        raise _JSONRejected(f"{what}: {exc}") from None
    try:  # "\ud800" parses to a lone surrogate, which no Redis write can encode
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _JSONRejected(
            f"{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff): send valid text"
        ) from None
    value = cast(JSON, value)  # json.loads makes nothing else
    marker = _serializer_marker(value, "")
    if marker is not None:
        where = repr(marker[:_MESSAGE_VALUE_MAX]) if marker else "its top"
        raise _JSONRejected(
            f"{what} holds an object at {where} shaped like "
            "a checkpoint serializer marker (a LangChain lc envelope or a __send__/__interrupt__/"
            "__delta_snapshot__/__bytes__ key), which the checkpoint store would read back "
            "as something else: rename its keys"
        )
    return value


_MARKER_KEYS = ("__send__", "__interrupt__", "__delta_snapshot__")


def _serializer_marker(value: object, path: str) -> str | None:
    """Where ``value`` holds an object the Redis checkpoint serializer would revive.

    Its loader turns LangChain envelopes (``{"lc": 1|2, "type": …}``) and LangGraph's
    markers (``{"__send__": true, …}``, ``{"__bytes__": …}``) into objects, or None, so
    such JSON stored in a workflow's state would come back as something else.
    Recursion is bounded by :data:`JSON_MAX_DEPTH` (checked first).
    """
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _serializer_marker(item, f"{path}[{i}]")) is not None:
                return found
    elif isinstance(value, dict):
        lc = value.get("lc")
        if (
            (lc in (1, 2) and "type" in value)  # as the loader compares: true, 1.0 too
            or any(value.get(key) is True for key in _MARKER_KEYS)
            or (len(value) == 1 and "__bytes__" in value)
        ):
            return path
        for key, item in value.items():
            if (found := _serializer_marker(item, f"{path}.{key}" if path else key)) is not None:
                return found
    return None


def _metadata(raw: str) -> dict[str, JSON]:
    try:
        value = _load_json(raw, what="metadata")
    except _JSONRejected as exc:
        raise InvalidEntryError("invalid_metadata", str(exc)) from None
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
    max_entry_bytes: int = 128 * 1024,
) -> Event:
    """Validate one ``ctxd:in`` entry.

    Args:
        entry_id: the stream entry id.
        fields: the entry's fields, as :func:`decode_fields` returns them.
        max_content_bytes: the content size limit in bytes.
        max_fields: the most fields an entry may have (unknown fields included).
        max_entry_bytes: the most bytes an entry's names and values may have in all.

    Raises:
        InvalidEntryError: with a reason tag and an actionable message; nothing else,
            whatever the fields hold.
    """
    try:
        check_entry(fields, max_fields=max_fields, max_entry_bytes=max_entry_bytes)
        return _parse(entry_id, fields, max_content_bytes)
    except InvalidEntryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes: never past this point
        raise as_invalid_entry(exc) from None


def routing_key(raw: RawFields, settings: Settings) -> str:
    """The workflow id of a raw ``ctxd:in`` entry, which is all the router needs.

    An entry's content is validated once, by the partition owner that runs it
    (:func:`parse_entry`), because producers may also append straight to a partition
    stream. The router checks only what moving the entry needs: the whole-entry limits
    (a move copies every field inside one script) and this one field. An entry that
    fails them cannot be moved and goes to the DLQ from the router.

    Raises:
        InvalidEntryError: a whole-entry limit, ``missing_workflow_id``,
            ``invalid_workflow_id`` or ``invalid_utf8``; nothing else.
    """
    try:
        check_entry(raw, max_fields=settings.max_fields, max_entry_bytes=settings.max_entry_bytes)
        value = raw.get(b"workflow_id", raw.get("workflow_id"))  # type: ignore[call-overload]
        fields: dict[str, str | bytes] = {}
        if value is not None:
            try:
                fields["workflow_id"] = value.decode() if isinstance(value, bytes) else value
            except UnicodeDecodeError:
                fields["workflow_id"] = value
        return _workflow_id(fields)
    except InvalidEntryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the bytes: never past this point
        raise as_invalid_entry(exc) from None


def _workflow_id(fields: Mapping[str, str | bytes]) -> str:
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
    return workflow_id


def _parse(entry_id: str, fields: Mapping[str, str | bytes], max_content_bytes: int) -> Event:
    workflow_id = _workflow_id(fields)
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
    if event_id is not None and _CONTROL_CHARS.search(event_id):
        raise InvalidEntryError(
            "invalid_event_id",
            f"event_id {event_id[:_MESSAGE_VALUE_MAX]!r} contains control characters: "
            "use printable text",
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
    value: JSON = None
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
            value = _load_json(raw, what="resume value") if raw is not None else None
        except _JSONRejected as exc:
            raise InvalidEntryError("invalid_value", str(exc)) from None
        return _Control(control, value=value)
    if control == "rollback":
        checkpoint_id = _text(fields, "checkpoint_id", _OTHER_FIELD_MAX)
        if not checkpoint_id:
            raise InvalidEntryError(
                "missing_checkpoint_id",
                "a rollback needs checkpoint_id: see `ctxd state WORKFLOW_ID --history`",
            )
        if not _CHECKPOINT_ID.fullmatch(checkpoint_id):
            raise InvalidEntryError(
                "invalid_checkpoint_id",
                f"checkpoint_id {checkpoint_id[:_MESSAGE_VALUE_MAX]!r} is not a checkpoint id: "
                "copy one from `ctxd state WORKFLOW_ID --history`",
            )
        return _Control(control, checkpoint_id=checkpoint_id)
    raise InvalidEntryError(
        "invalid_control", f"control {control[:60]!r} is not one of resume, rollback"
    )
