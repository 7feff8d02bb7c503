"""Test analyzer plug-ins that misbehave in odd ways on an event whose text contains a
trigger word; every other event gets the heuristic analysis.

Loaded by file path, e.g. ``CTXD_ANALYZER=tests/actors/plugins/odd_analyzer.py:stray_cancel``.
"""

from __future__ import annotations

import asyncio

from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer


def _says(request: AnalysisRequest, word: str) -> bool:
    return bool(request.window) and word in request.window[-1]


async def stray_cancel(request: AnalysisRequest) -> AnalysisResult:
    """Raise ``CancelledError`` without being cancelled, as a client library whose own
    timeout or closed session leaks one does."""
    if _says(request, "cancelme"):
        raise asyncio.CancelledError("the HTTP session was closed")
    return await heuristic_analyzer(request)


async def exits(request: AnalysisRequest) -> AnalysisResult:
    """Call ``sys.exit`` (a careless library's way to give up)."""
    if _says(request, "exitnow"):
        raise SystemExit(3)
    return await heuristic_analyzer(request)


async def interrupts(request: AnalysisRequest) -> AnalysisResult:
    """Raise ``KeyboardInterrupt`` (nobody pressed Ctrl-C)."""
    if _says(request, "ctrlc"):
        raise KeyboardInterrupt
    return await heuristic_analyzer(request)


async def group_with_interrupt(request: AnalysisRequest) -> AnalysisResult:
    """Raise a ``BaseExceptionGroup`` holding a ``KeyboardInterrupt`` and a ValueError."""
    if _says(request, "grouped"):
        raise BaseExceptionGroup("the fan-out failed", [KeyboardInterrupt(), ValueError("x")])
    return await heuristic_analyzer(request)


async def lone_surrogate(request: AnalysisRequest) -> AnalysisResult:
    """Return an analysis no Redis write can encode."""
    if _says(request, "surrogate"):
        return AnalysisResult("half a character: \ud800")
    return await heuristic_analyzer(request)


async def wrong_types(request: AnalysisRequest) -> AnalysisResult:
    """Return what the contract does not allow: a number as the analysis, a set or a NaN
    among the fields, or no AnalysisResult at all."""
    if _says(request, "number"):
        return AnalysisResult(12345)  # type: ignore[arg-type]
    if _says(request, "setfield"):
        return AnalysisResult("fine", {"tags": {"a", "b"}})  # type: ignore[dict-item]
    if _says(request, "nanfield"):
        return AnalysisResult("fine", {"score": float("nan")})
    if _says(request, "plaindict"):
        return {"analysis": "fine"}  # type: ignore[return-value]
    return await heuristic_analyzer(request)
