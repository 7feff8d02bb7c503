"""Jepsen-style history checking: every input id in, every output/DLQ id out."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Verdict", "check_history"]


@dataclass(frozen=True)
class Verdict:
    """What the checker found."""

    lost: list[str]
    duplicated: list[str]
    reordered: list[str]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered)


def check_history(
    inputs: Sequence[tuple[str, str]],
    outputs: Sequence[tuple[str, str]],
    dead: Sequence[str],
) -> Verdict:
    """``inputs``: (workflow_id, event_id) in input order; ``outputs``: (workflow_id,
    event_id) in output-stream order; ``dead``: event ids in the DLQ."""
    seen: dict[str, int] = defaultdict(int)
    for _, event_id in outputs:
        seen[event_id] += 1
    for event_id in dead:
        seen[event_id] += 1
    position = {event_id: i for i, (_, event_id) in enumerate(inputs)}
    lost = [e for _, e in inputs if seen[e] == 0]
    duplicated = sorted(e for e, count in seen.items() if count > 1)
    reordered: list[str] = []
    last: dict[str, int] = {}
    for workflow_id, event_id in outputs:
        here = position.get(event_id, -1)
        if here < last.get(workflow_id, -1):
            reordered.append(event_id)
        last[workflow_id] = max(here, last.get(workflow_id, -1))
    return Verdict(lost=lost, duplicated=duplicated, reordered=reordered)
