"""The serving model on the agent: ``LoadedModel`` (a detector ready to serve, with where it
came from) and ``ModelSlot`` (holds the one that serves).

The frame loop reads ``ModelSlot.current`` once per frame, so a swap (``ModelSlot.swap``, from
the updater's thread) always lands between two frames and a frame never mixes two models. The
model a swap replaces is returned to the caller, which keeps it loaded as *previous*.

Fault injection (tests, rollout drills): ``EDGE_AGENT_FAULT_MODEL_DELAY_MS="<sha256 prefix>=
<ms>[,…]"`` makes every detect of a model whose SHA-256 starts with the prefix take ``ms``
longer (in the pipeline and in shadow runs) — a "slow model" without building one
(``fault_delay_s``; ``LoadedModel.delay_s`` carries it).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FAULT_DELAY_ENV = "EDGE_AGENT_FAULT_MODEL_DELAY_MS"
_delay_cache: tuple[str, list[tuple[str, float]]] | None = None


def fault_delay_s(sha256: str) -> float:
    """Artificial per-detect delay for a model (``EDGE_AGENT_FAULT_MODEL_DELAY_MS``), seconds."""
    global _delay_cache
    spec = os.environ.get(FAULT_DELAY_ENV, "")
    if not spec:
        return 0.0
    if _delay_cache is None or _delay_cache[0] != spec:
        rules = []
        for part in spec.split(","):
            prefix, _, ms = part.strip().partition("=")
            try:
                rules.append((prefix.strip().lower(), float(ms) / 1e3))
            except ValueError:
                logger.warning(
                    "%s: ignoring %r (expected <sha256 prefix>=<ms>)", FAULT_DELAY_ENV, part
                )
        _delay_cache = (spec, rules)
    for prefix, delay in _delay_cache[1]:
        if prefix and sha256.startswith(prefix):
            return delay
    return 0.0


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A detector ready to serve, with where it came from."""

    detector: Any  # OnnxDetector (or anything with detect/last_timings/class_names)
    sha256: str
    path: Path
    model_version: str | None = None  # the manifest's label; None for the --model baseline
    rollout_id: str | None = None
    delay_s: float = 0.0  # fault injection (EDGE_AGENT_FAULT_MODEL_DELAY_MS)

    @classmethod
    def from_detector(
        cls,
        detector: Any,
        *,
        model_version: str | None = None,
        rollout_id: str | None = None,
        path: Path | None = None,
    ) -> LoadedModel:
        sha = str(detector.model_sha256)
        return cls(
            detector=detector,
            sha256=sha,
            path=Path(path or detector.model_path),
            model_version=model_version,
            rollout_id=rollout_id,
            delay_s=fault_delay_s(sha),
        )

    def record(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "path": str(self.path),
            "model_version": self.model_version,
            "rollout_id": self.rollout_id,
            "since": datetime.now(UTC).isoformat(),
        }


class ModelSlot:
    """Holds the serving model. Readers take ``current`` once per frame (a plain reference
    read, atomic); ``swap`` replaces it under a lock, so a swap always lands between frames
    and a frame never mixes two models."""

    def __init__(self, model: LoadedModel | Any) -> None:
        self._current = (
            model if isinstance(model, LoadedModel) else LoadedModel.from_detector(model)
        )
        self._lock = threading.Lock()
        self.swaps = 0

    @property
    def current(self) -> LoadedModel:
        return self._current

    @property
    def detector(self) -> Any:
        return self._current.detector

    @property
    def sha256(self) -> str:
        return self._current.sha256

    def swap(self, new: LoadedModel) -> LoadedModel:
        """Serve ``new`` from the next frame on; returns the model it replaced."""
        with self._lock:
            old, self._current = self._current, new
            self.swaps += 1
        return old


__all__ = ["FAULT_DELAY_ENV", "LoadedModel", "ModelSlot", "fault_delay_s"]
