"""Errors the edge agent raises on purpose (kept free of roadloop so the agent ships alone)."""

from __future__ import annotations

from pathlib import Path


class EdgeAgentError(Exception):
    """Base class of every deliberate edge-agent failure."""


class InvalidModelError(EdgeAgentError, ValueError):
    """A model file cannot serve as a detector; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
