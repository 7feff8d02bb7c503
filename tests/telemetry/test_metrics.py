"""ctxd's instruments, read through an in-memory reader."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, NumberDataPoint

from telemetry.metrics import BREAKER_STATES, DURATION_BUCKETS, StreamReading
from telemetry.testing import capture_metrics


def _values(points: Sequence[object], key: str) -> dict[object, float]:
    values: dict[object, float] = {}
    for point in points:
        assert isinstance(point, NumberDataPoint)
        values[(point.attributes or {})[key]] = point.value
    return values


def test_histograms_in_seconds_use_second_buckets_even_without_a_view() -> None:
    with capture_metrics() as capture:
        capture.instruments.process_duration.record(0.2)
        capture.instruments.node_duration.record(12.0)
        for name in ("messaging.process.duration", "ctxd.graph.node.duration"):
            (point,) = capture.points(name)
            assert isinstance(point, HistogramDataPoint)
            assert tuple(point.explicit_bounds) == DURATION_BUCKETS


def test_breaker_state_is_one_for_the_current_state_and_zero_for_the_others() -> None:
    with capture_metrics() as capture:
        capture.instruments.record_breaker_state("analysis", "closed")
        capture.instruments.record_breaker_state("analysis", "open")
        capture.instruments.record_breaker_state("decision", "half_open")
        points = capture.points("ctxd.circuit_breaker.state")
    analysis = [
        p for p in points if (p.attributes or {})["ctxd.circuit_breaker.name"] == "analysis"
    ]
    assert _values(list(analysis), "ctxd.circuit_breaker.state") == {
        "closed": 0,
        "open": 1,
        "half_open": 0,
        "forced_open": 0,
    }
    assert len(points) == 2 * len(BREAKER_STATES)


def test_unknown_breaker_state_is_refused() -> None:
    with capture_metrics() as capture, pytest.raises(ValueError, match=r"'ajar'.*closed, open"):
        capture.instruments.record_breaker_state("analysis", "ajar")


def test_stream_gauges_report_the_registered_readings_until_unregistered() -> None:
    readings = [StreamReading("ctxd:in", "ctxd", pending=4, lag=10)]
    with capture_metrics() as capture:
        unregister = capture.instruments.register_stream_gauges(lambda: readings)
        assert _values(capture.points("ctxd.stream.pending"), "messaging.destination.name") == {
            "ctxd:in": 4
        }
        readings = [StreamReading("ctxd:in", "ctxd", pending=1, lag=None)]
        assert _values(capture.points("ctxd.stream.pending"), "messaging.destination.name") == {
            "ctxd:in": 1
        }
        assert capture.points("ctxd.stream.lag") == []  # lag unknown: no point
        unregister()
        unregister()
        assert capture.instruments.stream_readings() == []


def test_a_failing_stream_source_is_logged_and_does_not_hide_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> list[StreamReading]:
        raise ConnectionError("source did I/O after all")

    with capture_metrics() as capture:
        capture.instruments.register_stream_gauges(broken)
        capture.instruments.register_stream_gauges(
            lambda: [StreamReading("ctxd:actor:analysis", "workers", pending=2, lag=0)]
        )
        with caplog.at_level(logging.WARNING, logger="telemetry.metrics"):
            lag = _values(capture.points("ctxd.stream.lag"), "messaging.consumer.group.name")
    assert lag == {"workers": 0}
    assert "stream gauge source" in caplog.text
