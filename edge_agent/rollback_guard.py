"""Self-rollback on the agent: ``RollbackGuard`` watches a freshly swapped-in model and says
when to take it back; ``GuardLimits`` are its limits.

After a swap the updater arms the guard for the new model (with the previous model's recent
detect latency P95 as the baseline, if it was measured; the updater keeps that baseline in
``updater.json`` and re-arms the guard with it when a restarted agent restores the new model,
so a restart does not switch the relative budget off). The frame loop feeds it every frame's
latency and every detector failure (``record``); each heartbeat closes a window
(``end_window``). A window is *bad* when the new model's detect latency P95 exceeds
``latency_budget_ms`` (when unset: ``relative_latency`` × the previous model's recent P95, if it
was measured) or its error rate (detector failures / frames) exceeds ``max_error_rate``;
``bad_windows`` bad windows in a row and ``end_window`` returns the reason to swap back. A window
with fewer than ``min_frames`` frames gives no verdict: it neither breaks nor resets the streak.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class GuardLimits:
    """When a freshly swapped-in model is taken back (see the module docstring)."""

    latency_budget_ms: float | None = None
    max_error_rate: float = 0.01
    bad_windows: int = 3
    relative_latency: float = 3.0  # used when latency_budget_ms is None
    min_frames: int = 1  # a window with fewer frames (+ errors) gives no verdict

    def __post_init__(self) -> None:
        if self.bad_windows < 1:
            raise ValueError(f"bad_windows (--rollback-after) must be >= 1, got {self.bad_windows}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise ValueError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")


class RollbackGuard:
    """Counts consecutive bad heartbeat windows of the model it is armed for (thread-safe)."""

    def __init__(self, limits: GuardLimits | None = None) -> None:
        self.limits = limits or GuardLimits()
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=200)
        self._recent_sha: str | None = None
        self.armed_sha: str | None = None
        self.baseline_p95: float | None = None
        self.bad_streak = 0
        self.last_problem: str | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self._lat: list[float] = []
        self._frames = 0
        self._errors = 0

    def record(self, sha256: str, latency_ms: float | None = None, *, error: bool = False) -> None:
        with self._lock:
            if latency_ms is not None:
                if sha256 != self._recent_sha:
                    self._recent.clear()
                    self._recent_sha = sha256
                self._recent.append(latency_ms)
            if self.armed_sha is None or sha256 != self.armed_sha:
                return
            if error:
                self._errors += 1
            else:
                self._frames += 1
                if latency_ms is not None:
                    self._lat.append(latency_ms)

    def recent_p95(self, sha256: str, min_frames: int = 10) -> float | None:
        """P95 of the last (up to 200) latencies of ``sha256``, if it served enough frames."""
        with self._lock:
            if self._recent_sha != sha256 or len(self._recent) < min_frames:
                return None
            return float(np.percentile(list(self._recent), 95))

    def budget_ms(self) -> float | None:
        if self.limits.latency_budget_ms is not None:
            return self.limits.latency_budget_ms
        if self.baseline_p95 is not None:
            return self.limits.relative_latency * self.baseline_p95
        return None

    def arm(self, sha256: str, baseline_p95: float | None = None) -> None:
        with self._lock:
            self.armed_sha = sha256
            self.baseline_p95 = baseline_p95
            self.bad_streak = 0
            self.last_problem = None
            self._reset_window()

    def disarm(self) -> None:
        with self._lock:
            self.armed_sha = None
            self.bad_streak = 0
            self._reset_window()

    def end_window(self) -> str | None:
        """Close the window; the reason to roll back when the bad streak reached the limit."""
        with self._lock:
            frames, errors, lat = self._frames, self._errors, self._lat
            self._reset_window()
            if self.armed_sha is None:
                return None
            n = frames + errors
            if n < self.limits.min_frames:
                return None  # no verdict: an idle window neither breaks nor resets the streak
            problems = []
            budget = self.budget_ms()
            p95 = float(np.percentile(lat, 95)) if lat else None
            if budget is not None and p95 is not None and p95 > budget:
                problems.append(f"latency P95 {p95:.1f} ms > budget {budget:.1f} ms")
            rate = errors / n
            if rate > self.limits.max_error_rate:
                problems.append(
                    f"error rate {rate:.1%} > {self.limits.max_error_rate:.1%} "
                    f"({errors} failed of {n} frames)"
                )
            if not problems:
                self.bad_streak = 0
                return None
            self.bad_streak += 1
            self.last_problem = "; ".join(problems)
            logger.warning(
                "model %s: bad heartbeat window %d/%d: %s",
                self.armed_sha[:12],
                self.bad_streak,
                self.limits.bad_windows,
                self.last_problem,
            )
            if self.bad_streak >= self.limits.bad_windows:
                return f"{self.last_problem} for {self.bad_streak} consecutive heartbeat windows"
            return None


__all__ = ["GuardLimits", "RollbackGuard"]
