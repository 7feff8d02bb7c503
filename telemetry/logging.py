"""structlog set-up: JSON lines off a terminal, a readable console on one.

Every line, from structlog or from the standard library's ``logging``, goes through the
same processors:

* values bound with ``structlog.contextvars.bind_contextvars`` (``workflow_id``…);
* ``trace_id``, ``span_id`` and ``trace_flags`` (lowercase hex) whenever the current
  span context is valid, sampled or not. structlog's documented OpenTelemetry processor
  checks ``is_recording()`` and would drop the ids of unsampled traces, which are
  exactly the ones a log line is needed to find;
* level, ISO-8601 UTC timestamp, stack info, and a cap on very long string values.

JSON output turns exceptions into structured ``exception`` lists (``dict_tracebacks``).
Secrets registered with :func:`register_secrets` (the passwords of the configured URLs)
are masked in every finished line, tracebacks included; :func:`redact_url` makes a URL
safe to log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Final, TextIO

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from telemetry.settings import TelemetryConfigError

__all__ = [
    "QUIET_LOGGERS",
    "add_trace_context",
    "configure_logging",
    "redact_url",
    "register_secrets",
    "scrub_secrets",
]

_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
_UNCAPPED_KEYS: Final = frozenset({"exception", "stack"})
_MASK: Final = "***"
_SECRET_QUERY: Final = re.compile(r"(?i)([?&](?:password|username|user)=)[^&]*")
_MIN_SECRET: Final = 4
_SECRETS: set[str] = set()
QUIET_LOGGERS: Final[tuple[str, ...]] = ("redisvl", "langgraph")
"""Third-party loggers whose INFO lines are routine ("Index already exists", "Redis
client is a standalone client"); :func:`configure_logging` caps them at WARNING."""


def add_trace_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: add the current span's ids as lowercase hex.

    Adds ``trace_id`` (32 digits), ``span_id`` (16) and ``trace_flags`` (2) whenever the
    current span context is valid, whether or not it is sampled. Values the caller set
    explicitly are kept.
    """
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
        event_dict.setdefault("trace_flags", format(span_context.trace_flags, "02x"))
    return event_dict


class _CapLongValues:
    """structlog processor: shorten string values longer than ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if key in _UNCAPPED_KEYS:
                continue
            if isinstance(value, str) and len(value) > self._limit:
                cut = len(value) - self._limit
                event_dict[key] = f"{value[: self._limit]}…[{cut} more characters]"
        return event_dict


class _CtxdHandler(logging.StreamHandler[TextIO]):
    """The root handler configure_logging installs; marked so a later call replaces it."""


def _min_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = level.strip().lower()
    if name not in _LEVELS:
        raise TelemetryConfigError(
            f"log level {level!r} is not supported; use one of {', '.join(_LEVELS)}"
        )
    return logging.getLevelNamesMapping()[name.upper()]


def _wants_json(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return not (callable(isatty) and isatty())
    except ValueError:  # a closed stream
        return True


def configure_logging(
    *,
    level: str | int = "info",
    json: bool | None = None,
    stream: TextIO | None = None,
    max_value_length: int = 4096,
    cache_logger_on_first_use: bool = True,
    quiet: tuple[str, ...] = QUIET_LOGGERS,
) -> None:
    """Configure structlog and route the standard library's logging through it.

    Safe to call again (tests do): structlog is reset first and the root handler
    installed by an earlier call is replaced; other handlers are left alone. Loggers
    already *used* under ``cache_logger_on_first_use=True`` keep the configuration they
    were first used with, so tests that reconfigure should create their loggers after
    configuring (``structlog.get_logger()`` in the test) or pass ``False``.

    Args:
        level: the minimum level, ``debug`` to ``critical`` (or a ``logging`` number).
        json: JSON lines if true, the console renderer if false; by default JSON unless
            ``stream`` is a terminal.
        stream: where lines go; ``sys.stdout`` (looked up at call time) by default.
        max_value_length: string values longer than this are cut, with a marker.
        cache_logger_on_first_use: structlog's speed-up; see above.
        quiet: standard-library loggers set to WARNING (unless ``level`` is higher):
            chatty libraries whose INFO lines say nothing to an operator.

    Raises:
        TelemetryConfigError: ``level`` is not a level name.
    """
    min_level = _min_level(level)
    out = sys.stdout if stream is None else stream
    use_json = _wants_json(out) if json is None else json

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_trace_context,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: list[Processor]
    if use_json:
        renderer = [
            structlog.processors.dict_tracebacks,
            _CapLongValues(max_value_length),
            _scrubbed(structlog.processors.JSONRenderer()),
        ]
    else:
        renderer = [
            _CapLongValues(max_value_length),
            _scrubbed(structlog.dev.ConsoleRenderer()),
        ]

    structlog.reset_defaults()
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=cache_logger_on_first_use,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            *shared,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = _CtxdHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CtxdHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(min_level)
    for name in quiet:
        logging.getLogger(name).setLevel(max(min_level, logging.WARNING))


def redact_url(url: str) -> str:
    """Hide credentials in a connection URL so it can be logged.

    Everything between ``://`` and the last ``@`` (the user information, whatever
    characters it holds: ``#``, ``/``, ``?``, ``@`` or ``%``-escapes) becomes ``***``,
    and the values of ``password``/``username``/``user`` query parameters (which
    redis-py also accepts) become ``***`` up to the next ``&``, ``#`` included.
    ``redis://alice:s3cret@db:6379/0`` → ``redis://***@db:6379/0``.

    Args:
        url: a URL such as ``redis://``, ``rediss://`` or ``unix://``.

    Returns:
        The URL without secrets; ``"<unparseable url>"`` if it has no scheme.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparseable url>"
    if "@" in rest:
        # URL parsers stop the user information at "#", "/" or "?", but a password
        # may hold them: the last "@" is where the host part really starts.
        rest = f"{_MASK}@{rest.rpartition('@')[2]}"
    rest = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}{_MASK}", rest)
    return f"{scheme}://{rest}"


def register_secrets(*secrets: str) -> None:
    """Add strings that must never appear in a log line (a password, say).

    Every line rendered by :func:`configure_logging`'s processors, exception tracebacks
    included, has them replaced by ``***`` (also in their JSON-escaped form). Strings
    shorter than 4 characters are not registered: masking them would mangle every line.
    """
    for secret in secrets:
        if len(secret) >= _MIN_SECRET:
            _SECRETS.add(secret)
            _SECRETS.add(json.dumps(secret)[1:-1])


def scrub_secrets(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``, longest first."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def _scrubbed(renderer: Processor) -> Processor:
    """``renderer`` whose finished line has every registered secret masked."""

    def render(
        logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> str | bytes | bytearray | tuple[object, ...] | Mapping[str, object]:
        rendered = renderer(logger, method_name, event_dict)
        if _SECRETS and isinstance(rendered, str):
            return scrub_secrets(rendered)
        return rendered

    return render
