"""Per-class counts and the scene density state (normal / warning / heavy / jam).

Occupancy is ``detections / capacity`` where ``capacity`` is how many objects the camera's
view holds when it is full (configured per camera). The state has hysteresis so it does not
flicker around a threshold: a level is **entered** when occupancy reaches its enter
threshold (``>=``) and **left** when occupancy falls to its leave threshold (``<=``) *and*
the count is at least two vehicles below the level's enter count:

=========  =====  =====
level      enter  leave
=========  =====  =====
warning    0.3    0.2
heavy      0.6    0.5
jam        0.8    0.7
=========  =====  =====

Why the second condition: occupancy moves in whole vehicles, and at small capacities the
enter and leave thresholds fall on neighbouring counts (capacity 10: jam at 8, leave at 7),
so one vehicle arriving and leaving flipped the state on every frame (jam, heavy, jam, …
and a ``jam_cleared`` event on every dip). Requiring a gap of two counts leaves at least one
count (one vehicle) between entering and leaving, in which the state holds. Where the
thresholds are further apart (capacity 20: jam at 16, leave at 14) nothing changes. A level
entered by a single vehicle is left when the view is empty (no count is below zero).

Several levels can be crossed on one frame (normal → jam on a sudden 0.9).
"""

from __future__ import annotations

import math
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

    def level_counts(self) -> list[tuple[int, int]]:
        """Per level (warning, heavy, jam): ``(enter_n, leave_n)``, the fewest vehicles that
        enter it and the most at which it is left (see the module docstring)."""
        out = []
        for enter, leave in zip(self.thresholds.enter, self.thresholds.leave):
            enter_n = math.ceil(enter * self.capacity - _EPS)  # fewest n with n/cap >= enter
            leave_n = math.floor(leave * self.capacity + _EPS)  # most n with n/cap <= leave
            out.append((enter_n, max(min(leave_n, enter_n - 2), 0)))
        return out

    def update(self, n_detections: int) -> tuple[DensityState, bool]:
        """Feed one frame's detection count; returns ``(state, changed)``."""
        self.occupancy = n_detections / self.capacity
        levels = self.level_counts()
        state = int(self.state)
        while state < DensityState.JAM and n_detections >= levels[state][0]:  # next level up
            state += 1
        while state > DensityState.NORMAL and n_detections <= levels[state - 1][1]:
            state -= 1
        new = DensityState(state)
        changed = new != self.state
        self.state = new
        return new, changed
