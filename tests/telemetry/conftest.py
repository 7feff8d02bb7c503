"""Fixtures for the telemetry tests: a real OTLP receiver, and logging state restored."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from telemetry.testing import OtlpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """An in-process OTLP receiver (gRPC and HTTP) on loopback, stopped after the test."""
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo configure_logging: structlog defaults, root handlers and level, contextvars."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
