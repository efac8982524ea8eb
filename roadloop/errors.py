"""Exception classes shared across roadloop.

Every error roadloop raises on purpose derives from :class:`RoadloopError`, so callers (the
Dagster ops, the CLI) can tell an expected, explained failure from a bug.
"""

from __future__ import annotations

from pathlib import Path


class RoadloopError(Exception):
    """Base class of every deliberate roadloop failure."""


class InvalidInputError(RoadloopError):
    """An input file is malformed; ``path`` names it and the message says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class EmptyDatasetError(RoadloopError):
    """A dataset (or one of its required splits) ended up with no usable frames."""


class MissingDataError(RoadloopError):
    """Expected data (a folder, a file, a dataset) is not there."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(message)
