"""structlog set-up: JSON lines with trace ids, contextvars, stdlib routing, console on a TTY."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span

from telemetry.logging import configure_logging, redact_url, register_secrets
from telemetry.settings import TelemetryConfigError
from telemetry.testing import capture_spans


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _ids(span: Span) -> dict[str, str]:
    context = span.get_span_context()
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "trace_flags": format(context.trace_flags, "02x"),
    }


def test_json_lines_carry_the_current_span_ids() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    with capture_spans() as capture, capture.tracer.start_as_current_span("work") as span:
        structlog.get_logger().info("processed", entries=3)
    (line,) = _lines(stream)
    assert {key: line[key] for key in ("trace_id", "span_id", "trace_flags")} == _ids(span)
    assert int(line["trace_flags"], 16) & 0x01  # sampled
    assert (line["event"], line["level"], line["entries"]) == ("processed", "info", 3)
    assert line["timestamp"].endswith("Z")


def test_unsampled_spans_keep_their_ids_in_logs() -> None:
    """structlog's documented processor checks is_recording() and would drop these."""
    stream = io.StringIO()
    configure_logging(stream=stream)
    with (
        capture_spans(sampler=ALWAYS_OFF) as capture,
        capture.tracer.start_as_current_span("unsampled") as span,
    ):
        assert not span.is_recording()
        structlog.get_logger().warning("still traceable")
    (line,) = _lines(stream)
    assert {key: line[key] for key in ("trace_id", "span_id", "trace_flags")} == _ids(span)
    assert not int(line["trace_flags"], 16) & 0x01


def test_no_span_no_ids() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    structlog.get_logger().info("idle")
    (line,) = _lines(stream)
    assert not {"trace_id", "span_id", "trace_flags"} & line.keys()


def test_contextvars_appear_on_every_line() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    log = structlog.get_logger()
    with structlog.contextvars.bound_contextvars(workflow_id="wf-9"):
        log.info("one")
        logging.getLogger("ctxd.stdlib").info("two")
    log.info("three")
    assert [line.get("workflow_id") for line in _lines(stream)] == ["wf-9", "wf-9", None]


def test_stdlib_logging_goes_through_structlog() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    with capture_spans() as capture, capture.tracer.start_as_current_span("stdlib") as span:
        logging.getLogger("redis.connection").warning("retrying %s", "XREADGROUP")
    (line,) = _lines(stream)
    assert line["event"] == "retrying XREADGROUP"
    assert (line["level"], line["logger"]) == ("warning", "redis.connection")
    assert line["trace_id"] == _ids(span)["trace_id"]


def test_level_filters_both_structlog_and_stdlib() -> None:
    stream = io.StringIO()
    configure_logging(level="warning", stream=stream)
    structlog.get_logger().info("dropped")
    logging.getLogger("x").info("dropped too")
    structlog.get_logger().error("kept")
    assert [line["event"] for line in _lines(stream)] == ["kept"]


def test_exceptions_become_structured_in_json() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    try:
        raise KeyError("workflow_id")
    except KeyError:
        structlog.get_logger().exception("invalid entry")
        logging.getLogger("x").exception("stdlib too")
    structlog_line, stdlib_line = _lines(stream)
    for line in (structlog_line, stdlib_line):
        (frame,) = line["exception"]
        assert frame["exc_type"] == "KeyError"


def test_very_long_values_are_cut() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, max_value_length=100)
    structlog.get_logger().info("big", payload="x" * 1000)
    (line,) = _lines(stream)
    assert line["payload"] == "x" * 100 + "…[900 more characters]"


def test_console_renderer_on_a_terminal() -> None:
    stream = _Terminal()
    configure_logging(stream=stream)
    structlog.get_logger().info("hello console", workflow_id="wf-1")
    logging.getLogger("x").info("stdlib on console")
    output = stream.getvalue()
    assert "hello console" in output
    assert "stdlib on console" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.splitlines()[0])


def test_json_can_be_forced_on_a_terminal() -> None:
    stream = _Terminal()
    configure_logging(stream=stream, json=True)
    structlog.get_logger().info("json anyway")
    assert _lines(stream)[0]["event"] == "json anyway"


def test_configure_logging_can_be_called_again() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    structlog.get_logger().info("to first")
    configure_logging(stream=second)
    structlog.get_logger().info("to second")
    logging.getLogger("x").warning("stdlib to second")
    assert [line["event"] for line in _lines(first)] == ["to first"]
    assert [line["event"] for line in _lines(second)] == ["to second", "stdlib to second"]


def test_bad_level_is_a_clear_error() -> None:
    with pytest.raises(TelemetryConfigError, match=r"log level 'loud'.*debug, info"):
        configure_logging(level="loud")


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://alice:s3cret@db:6379/0", "redis://***@db:6379/0"),
        ("rediss://:s3cret@db.example:6380", "rediss://***@db.example:6380"),
        ("redis://db:6379/0", "redis://db:6379/0"),
        (
            "redis://db:6379/0?password=s3cret&socket_timeout=5",
            "redis://db:6379/0?password=***&socket_timeout=5",
        ),
        ("unix:///run/redis.sock?db=1&password=p", "unix:///run/redis.sock?db=1&password=***"),
        ("redis://[::1:6379", "redis://[::1:6379"),
        ("db:6379", "<unparseable url>"),
        # Characters URL parsing stops at: the last "@" is where the host starts.
        ("redis://u:s3c#ret@db:6379/0", "redis://***@db:6379/0"),
        ("redis://u:s3c/r?et@db:6379/0", "redis://***@db:6379/0"),
        ("redis://u:s3c@r:et@db:6379", "redis://***@db:6379"),
        ("redis://u:s3c%23ret%2F@db", "redis://***@db"),
        ("redis://alice@db:6379", "redis://***@db:6379"),
        ("unix://u:s3cret@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
        (
            "redis://db?username=u&password=s3c#r&et&db=1",
            "redis://db?username=***&password=***&et&db=1",
        ),
    ],
)
def test_redact_url_hides_credentials(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    for part in ("s3c", "ret", "alice"):
        assert part not in redact_url(url)


@pytest.mark.parametrize("use_json", [True, False])
def test_registered_secrets_never_reach_a_log_line(use_json: bool) -> None:
    """A registered password is masked in messages, values and tracebacks alike."""
    secret = 'pa"ss#w@rd\\x-1234'
    register_secrets(secret)
    stream = io.StringIO()
    configure_logging(stream=stream, json=use_json, cache_logger_on_first_use=False)
    log = structlog.get_logger()
    log.info(f"connecting with {secret}", url=f"redis://u:{secret}@db")
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        log.exception("failed")
        logging.getLogger("lib").exception("stdlib failed")
    text = stream.getvalue()
    assert "connecting with ***" in text
    assert "failed" in text
    assert "ValueError" in text
    assert secret not in text
    assert json.dumps(secret)[1:-1] not in text


def test_chatty_third_party_info_lines_are_quieted() -> None:
    stream = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in ("redisvl", "langgraph")}
    try:
        configure_logging(stream=stream, json=True, level="debug")
        logging.getLogger("redisvl.index.index").info("Index already exists, not overwriting.")
        logging.getLogger("langgraph.checkpoint.redis.aio").info("Redis client is a standalone")
        logging.getLogger("langgraph.checkpoint.redis.aio").warning("a real problem")
        logging.getLogger("ctxd.x").debug("ours")
        assert [line["event"] for line in _lines(stream)] == ["a real problem", "ours"]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
