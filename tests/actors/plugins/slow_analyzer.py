"""A test analyzer plug-in: the heuristic analyzer after a pause.

``SLOW_ANALYZER_SECONDS`` (default 2) is how long each analysis waits, so a test
can act while an event is in progress (SIGTERM during a run, a second event arriving).
Loaded by file path: ``CTXD_ANALYZER=tests/actors/plugins/slow_analyzer.py:analyze``.
"""

from __future__ import annotations

import os

import anyio

from graph.analysis import AnalysisRequest, AnalysisResult, heuristic_analyzer


async def analyze(request: AnalysisRequest) -> AnalysisResult:
    """Wait, then analyze as the default analyzer does."""
    await anyio.sleep(float(os.environ.get("SLOW_ANALYZER_SECONDS", "2")))
    return await heuristic_analyzer(request)


async def hang_on_boom(request: AnalysisRequest) -> AnalysisResult:
    """Hang (past any event timeout) on an event whose text contains "boom"; a poison
    event, since the graph turns analyzer exceptions into fallbacks but a timeout fails
    the run."""
    if request.window and "boom" in request.window[-1]:
        await anyio.sleep(3600)
    return await heuristic_analyzer(request)
