"""Per-class counts and the scene density state (normal / warning / heavy / jam).

Occupancy is ``detections / capacity`` where ``capacity`` is how many objects the camera's
view holds when it is full (configured per camera). The state has hysteresis so it does not
flicker around a threshold: a level is **entered** when occupancy reaches its enter
threshold (``>=``) and **left** when occupancy falls to its leave threshold (``<=``):

=========  =====  =====
level      enter  leave
=========  =====  =====
warning    0.3    0.2
heavy      0.6    0.5
jam        0.8    0.7
=========  =====  =====

Several levels can be crossed on one frame (normal → jam on a sudden 0.9).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

_EPS = 1e-9  # occupancy is a ratio of small ints; guard the >= / <= against rounding


class DensityState(IntEnum):
    NORMAL = 0
    WARNING = 1
    HEAVY = 2
    JAM = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DensityThresholds:
    """Enter/leave occupancy thresholds of warning, heavy and jam (in that order)."""

    enter: tuple[float, float, float] = (0.3, 0.6, 0.8)
    leave: tuple[float, float, float] = (0.2, 0.5, 0.7)

    def __post_init__(self) -> None:
        if len(self.enter) != 3 or len(self.leave) != 3:
            raise ValueError("enter and leave need exactly three thresholds (warning, heavy, jam)")
        if list(self.enter) != sorted(self.enter) or list(self.leave) != sorted(self.leave):
            raise ValueError(f"thresholds must increase: enter={self.enter} leave={self.leave}")
        for e, lv in zip(self.enter, self.leave):
            if not lv < e:
                raise ValueError(f"each leave threshold must be below its enter: {lv} >= {e}")


class _HasClass(Protocol):
    class_id: int
    class_name: str


def count_per_class(
    detections: Iterable[_HasClass], class_names: Sequence[str] | None = None
) -> dict[str, int]:
    """``{class_name: count}``; every name in ``class_names`` appears, zeros included."""
    counts: dict[str, int] = {n: 0 for n in class_names or ()}
    for d in detections:
        name = d.class_name or (
            class_names[d.class_id]
            if class_names and 0 <= d.class_id < len(class_names)
            else str(d.class_id)
        )
        counts[name] = counts.get(name, 0) + 1
    return counts


class DensityTracker:
    """Occupancy → density state with hysteresis (see the module docstring)."""

    def __init__(self, capacity: float, thresholds: DensityThresholds | None = None) -> None:
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = float(capacity)
        self.thresholds = thresholds or DensityThresholds()
        self.state = DensityState.NORMAL
        self.occupancy = 0.0

    def update(self, n_detections: int) -> tuple[DensityState, bool]:
        """Feed one frame's detection count; returns ``(state, changed)``."""
        occ = n_detections / self.capacity
        self.occupancy = occ
        enter, leave = self.thresholds.enter, self.thresholds.leave
        state = int(self.state)
        while state < DensityState.JAM and occ >= enter[state] - _EPS:  # enter[state] = next up
            state += 1
        while state > DensityState.NORMAL and occ <= leave[state - 1] + _EPS:
            state -= 1
        new = DensityState(state)
        changed = new != self.state
        self.state = new
        return new, changed
