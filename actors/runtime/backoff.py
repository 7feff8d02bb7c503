"""Exponential backoff with jitter, shared by the supervisor and the circuit breaker."""

from __future__ import annotations

import math
import random

__all__ = ["jittered_backoff"]


def jittered_backoff(
    base: float, multiplier: float, attempt: int, cap: float, jitter: float, rng: random.Random
) -> float:
    """``base·multiplier^attempt``, capped, spread by ±jitter, capped again.

    Args:
        base: the first wait, in seconds; 0 or less means no wait at all.
        multiplier: growth per attempt.
        attempt: 0 for the first wait.
        cap: the longest wait, jitter included.
        jitter: the relative spread (0.2 = ±20%).
        rng: the random source (seeded in tests).
    """
    if base <= 0.0:
        return 0.0
    if multiplier > 1.0 and attempt * math.log(multiplier) >= math.log(cap / base):
        wait = cap  # also keeps multiplier**attempt from overflowing
    else:
        wait = min(base * multiplier**attempt, cap)
    if jitter:
        wait *= 1.0 + rng.uniform(-jitter, jitter)
    return min(wait, cap)
