"""Test analyzer plug-ins that fail on an event whose text contains "boom".

Loaded by file path, e.g.
``CTXD_ANALYZER=tests/actors/plugins/boom_analyzer.py:raise_on_boom``; every other event
gets the heuristic analysis.
"""

from __future__ import annotations

from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer


class Boom(BaseException):
    """A careless plug-in's own signal: a BaseException, not an Exception."""


def _booming(request: AnalysisRequest) -> bool:
    return bool(request.window) and "boom" in request.window[-1]


async def raise_on_boom(request: AnalysisRequest) -> AnalysisResult:
    """Raise an ordinary exception (a failed analysis step) on "boom"."""
    if _booming(request):
        raise RuntimeError("the analysis backend refused the text (boom)")
    return await heuristic_analyzer(request)


async def base_exception_on_boom(request: AnalysisRequest) -> AnalysisResult:
    """Raise a BaseException subclass on "boom"."""
    if _booming(request):
        raise Boom("the plug-in blew up on boom")
    return await heuristic_analyzer(request)
