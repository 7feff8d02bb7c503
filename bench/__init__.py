"""ctxd's benchmark: the seed-style pipeline against ``ctxd run``, on the same workload.

Run it with ``make bench`` (or ``python -m bench --help``); docs/performance.md explains
what it measures and records the results.
"""

from __future__ import annotations

__all__: list[str] = []
