"""Which frames leave the camera: samplers, importance and a per-camera hourly budget.

Samplers (each that fires adds its name to the frame's ``reasons``):

* ``base_rate`` — a uniform random share of all frames (``base_rate``, 1 % by default),
  drawn from a seeded generator (one draw per frame), so a run is reproducible.
* ``low_confidence`` — any detection with confidence in ``[lo, hi)`` of
  ``low_confidence_band`` (the model is unsure: label these first).
* ``rare_class`` — any detection of a class named in ``rare_classes``.
* ``crowded`` — more than ``crowded_threshold`` detections (20).
* ``edge_case`` — the caller flags the frame (the agent does so when the density state
  changes or the image is unusually dark/bright/blurred; see ``edge_agent.agent``).

``importance`` is the product of the multipliers of the reasons that fired (edge case ×2,
low confidence ×1.5, crowded ×1.3, rare class ×1.8, base rate ×1), capped at 10.

Budget: a token bucket per camera holding ``hourly_budget`` frames, refilled at
``hourly_budget / 3600`` frames per second (starts full). A sampled frame costs one token.
When the bucket is empty the policy decides:

* ``"stop"`` — nothing more is sampled until a token has been refilled;
* ``"importance"`` (default) — a frame is still taken if its importance is strictly greater
  than the mean importance of the frames taken in the last hour, borrowing a token; the
  debt is bounded (``overdraft``, 10 % of the hourly budget, at least one frame) and repaid by
  the refill before ordinary frames are taken again, so the long-run rate stays within the
  budget while the rare interesting frame still gets through.

Run-time changes (the camera's configuration, ``edge_agent.camera_config``): ``set_rates``
changes the base rate and the hourly budget between two frames; the bucket keeps its fill
fraction (a full bucket stays full, an empty one empty, a debt becomes a proportional debt),
so the new budget governs from the change on, as if it had always been the budget.

Times are seconds (the frame's capture time), passed in, so tests need no clock. When that
clock steps back (an NTP correction of a clock hours fast), the bucket and the hour of taken
frames are re-based on the new clock: the step refills nothing and costs nothing, and
sampling goes on at the budget's rate (not held off until the clock passes its old reading).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

REASON_BASE_RATE = "base_rate"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_RARE_CLASS = "rare_class"
REASON_CROWDED = "crowded"
REASON_EDGE_CASE = "edge_case"

DEFAULT_MULTIPLIERS: Mapping[str, float] = {
    REASON_BASE_RATE: 1.0,
    REASON_EDGE_CASE: 2.0,
    REASON_LOW_CONFIDENCE: 1.5,
    REASON_CROWDED: 1.3,
    REASON_RARE_CLASS: 1.8,
}


class _HasConfidence(Protocol):
    class_id: int
    class_name: str
    confidence: float


@dataclass
class SamplerConfig:
    """Sampler settings (per camera); see the module docstring."""

    base_rate: float = 0.01
    low_confidence_band: tuple[float, float] = (0.25, 0.5)
    rare_classes: frozenset[str] = frozenset()
    crowded_threshold: int = 20
    multipliers: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MULTIPLIERS))
    max_importance: float = 10.0
    hourly_budget: float | None = 360.0
    budget_policy: Literal["importance", "stop"] = "importance"
    overdraft_fraction: float = 0.1
    seed: int = 0
    edge_cases: bool = True  # honour the caller's edge-case flag

    def __post_init__(self) -> None:
        # nan passes every ``x <= 0`` test and an infinite budget makes the token bucket's
        # refill inf - inf (nan): no number here may be either.
        numbers = [("base_rate", self.base_rate), ("max_importance", self.max_importance),
                   ("overdraft_fraction", self.overdraft_fraction),
                   *(("low_confidence_band", v) for v in self.low_confidence_band),
                   *((f"multipliers[{k!r}]", v) for k, v in self.multipliers.items())]
        if self.hourly_budget is not None:
            numbers.append(("hourly_budget", self.hourly_budget))
        for name, value in numbers:
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.overdraft_fraction < 0 or any(v < 0 for v in self.multipliers.values()):
            raise ValueError("overdraft_fraction and multipliers must be >= 0")
        if not 0.0 <= self.base_rate <= 1.0:
            raise ValueError(f"base_rate must be in [0, 1], got {self.base_rate}")
        lo, hi = self.low_confidence_band
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"low_confidence_band must satisfy 0 <= lo <= hi <= 1, got {lo, hi}")
        if self.hourly_budget is not None and self.hourly_budget <= 0:
            raise ValueError(f"hourly_budget must be > 0 or None, got {self.hourly_budget}")
        if self.budget_policy not in ("importance", "stop"):
            raise ValueError(
                f"budget_policy must be 'importance' or 'stop', got {self.budget_policy!r}"
            )
        if self.max_importance < 1.0:
            raise ValueError(f"max_importance must be >= 1, got {self.max_importance}")
        self.rare_classes = frozenset(self.rare_classes)
        self.multipliers = {**DEFAULT_MULTIPLIERS, **self.multipliers}


@dataclass(frozen=True)
class SampleDecision:
    """What the samplers decided for one frame."""

    sampled: bool
    reasons: tuple[str, ...]  # samplers that fired (also set when the budget refused it)
    importance: float
    over_budget: bool = False  # taken although the bucket was empty (importance policy)
    refused_by_budget: bool = False  # a sampler fired but the budget said no


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; the level may go negative."""

    def __init__(self, capacity: float, rate: float, now: float | None = None) -> None:
        self.capacity = float(capacity)
        self.rate = float(rate)
        self.tokens = float(capacity)
        self._t = now

    def refill(self, now: float) -> float:
        """The level at ``now``. A clock that steps back re-bases the bucket's time: the step
        refills nothing, and the refill goes on from ``now`` (waiting for the clock to pass
        the last time seen would stop sampling for as long as the step)."""
        if self._t is not None and now > self._t:
            self.tokens = min(self.capacity, self.tokens + (now - self._t) * self.rate)
        self._t = now
        return self.tokens


class FrameSampler:
    """Applies ``SamplerConfig`` frame by frame (one instance per camera, not thread-safe)."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        self._rng = random.Random(self.config.seed)
        budget = self.config.hourly_budget
        self.bucket = TokenBucket(budget, budget / 3600.0) if budget is not None else None
        self.overdraft = max(1.0, self.config.overdraft_fraction * budget) if budget else 0.0
        self._taken: deque[tuple[float, float]] = deque()  # (time, importance), last hour
        self._taken_sum = 0.0
        self._now: float | None = None  # the latest time ``decide`` was given
        self.frames_seen = 0
        self.frames_sampled = 0
        self.refused_by_budget = 0
        self.over_budget = 0

    def set_rates(self, base_rate: float, hourly_budget: float | None, *, now: float) -> None:
        """Change the base rate and the hourly budget (``None``: no budget) from now on.
        Call it from the thread that calls ``decide`` (the sampler is not thread-safe);
        ``ValueError`` (nothing changed) for values ``SamplerConfig`` refuses."""
        config = dataclasses.replace(self.config, base_rate=base_rate,
                                     hourly_budget=hourly_budget)
        if hourly_budget is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(hourly_budget, hourly_budget / 3600.0, now)
        else:
            fill = self.bucket.refill(now) / self.bucket.capacity
            self.bucket.capacity = float(hourly_budget)
            self.bucket.rate = hourly_budget / 3600.0
            self.bucket.tokens = fill * hourly_budget
        self.overdraft = (max(1.0, config.overdraft_fraction * hourly_budget)
                          if hourly_budget else 0.0)
        self.config = config

    def reasons_for(
        self, detections: Iterable[_HasConfidence], *, edge_case: bool = False, draw: float = 1.0
    ) -> list[str]:
        """The samplers that fire for these detections (``draw`` is the base-rate uniform)."""
        cfg = self.config
        dets = list(detections)
        reasons = []
        if draw < cfg.base_rate:
            reasons.append(REASON_BASE_RATE)
        if edge_case and cfg.edge_cases:
            reasons.append(REASON_EDGE_CASE)
        lo, hi = cfg.low_confidence_band
        if any(lo <= d.confidence < hi for d in dets):
            reasons.append(REASON_LOW_CONFIDENCE)
        if cfg.rare_classes and any(d.class_name in cfg.rare_classes for d in dets):
            reasons.append(REASON_RARE_CLASS)
        if len(dets) > cfg.crowded_threshold:
            reasons.append(REASON_CROWDED)
        return reasons

    def importance_of(self, reasons: Iterable[str]) -> float:
        value = 1.0
        for r in reasons:
            value *= self.config.multipliers.get(r, 1.0)
        return min(value, self.config.max_importance)

    def _mean_taken(self, now: float) -> float:
        while self._taken and self._taken[0][0] <= now - 3600.0:
            self._taken_sum -= self._taken.popleft()[1]
        return self._taken_sum / len(self._taken) if self._taken else float("inf")

    def decide(
        self, detections: Iterable[_HasConfidence], *, now: float, edge_case: bool = False
    ) -> SampleDecision:
        """Sample this frame or not; ``now`` is its capture time in seconds."""
        self.frames_seen += 1
        if self._now is not None and now < self._now:  # the clock stepped back: the hour's
            step = self._now - now  # taken frames keep their age on the new clock
            self._taken = deque((t - step, v) for t, v in self._taken)
        self._now = now
        if self.bucket is not None:  # every frame: a step back is measured from the last one
            self.bucket.refill(now)
        draw = self._rng.random()  # always one draw per frame: reproducible with the seed
        reasons = self.reasons_for(detections, edge_case=edge_case, draw=draw)
        if not reasons:
            return SampleDecision(False, (), 1.0)
        importance = self.importance_of(reasons)
        over = False
        if self.bucket is not None:
            tokens = self.bucket.refill(now)
            if tokens < 1.0:
                allowed = (
                    self.config.budget_policy == "importance"
                    and tokens - 1.0 >= -self.overdraft - 1e-9
                    and importance > self._mean_taken(now)
                )
                if not allowed:
                    self.refused_by_budget += 1
                    return SampleDecision(False, tuple(reasons), importance, refused_by_budget=True)
                over = True
                self.over_budget += 1
            self.bucket.tokens -= 1.0
        self._mean_taken(now)
        self._taken.append((now, importance))
        self._taken_sum += importance
        self.frames_sampled += 1
        return SampleDecision(True, tuple(reasons), importance, over_budget=over)
