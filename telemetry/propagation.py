"""Trace context carried through Redis stream entries as ``traceparent``/``tracestate``.

Both directions use the W3C TraceContext propagator directly rather than the global one
(which a library or ``OTEL_PROPAGATORS`` could replace), so the stream contract does not
depend on process-wide state.

redis-py returns entry fields as ``bytes`` unless the client decodes responses;
``opentelemetry.propagate.extract`` on such a dict silently yields an empty context.
:func:`extract_context` reads either form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeAlias, cast

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["StreamFields", "extract_context", "inject_fields"]

StreamFields: TypeAlias = (
    Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]
)
"""A stream entry's fields as redis-py returns them (bytes) or as text."""

_PROPAGATOR: Final = TraceContextTextMapPropagator()


class _StreamFieldsGetter(Getter[StreamFields]):
    """Reads propagation fields whose keys and values may be bytes or text."""

    def get(self, carrier: StreamFields, key: str) -> list[str] | None:
        # Mapping is invariant in its key type: look keys up through the widest view.
        fields = cast("Mapping[bytes | str, bytes | str]", carrier)
        value = fields.get(key)
        if value is None:
            value = fields.get(key.encode("ascii"))
        if value is None:
            return None
        if isinstance(value, bytes):
            # traceparent/tracestate are ASCII; anything else fails validation anyway.
            return [value.decode("ascii", errors="replace")]
        return [value]

    def keys(self, carrier: StreamFields) -> list[str]:
        return [
            key.decode("ascii", errors="replace") if isinstance(key, bytes) else key
            for key in carrier
        ]


_GETTER: Final = _StreamFieldsGetter()


def inject_fields(context: Context | None = None) -> dict[str, str]:
    """Return the trace-context fields to add to a stream entry.

    Call it inside the ``send`` span so the consumer's ``process`` span becomes its
    child. Unsampled spans propagate too (their ``traceparent`` has flags ``00``).

    Args:
        context: the context to propagate; the current one by default.

    Returns:
        ``{"traceparent": ..., "tracestate": ...}`` with only the non-empty fields; an
        empty dict when there is no valid span.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return {key: value for key, value in carrier.items() if value}


def extract_context(fields: StreamFields) -> Context:
    """Return a context holding the remote span described by an entry's fields.

    The result is built from an empty context, not the current one, so it never mixes
    the consumer's own state into the producer's.

    Args:
        fields: the entry's fields, bytes (redis-py's default) or text; other fields are
            ignored.

    Returns:
        A context whose span is the producer's (check
        ``trace.get_current_span(ctx).get_span_context().is_valid``); an empty context
        when the fields carry no valid ``traceparent``.
    """
    return _PROPAGATOR.extract(fields, context=Context(), getter=_GETTER)
