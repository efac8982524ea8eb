"""Labelled sources for the seed dataset: the shared real datasets, or a synthetic fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg

from roadloop.data.datasets import SourceSpec, default_sources, make_synthetic_dataset
from roadloop.errors import MissingDataError
from roadloop.settings import get_settings

log = logging.getLogger(__name__)


class LabelledSourcesResource(dg.ConfigurableResource):
    """Which labelled datasets seed ``curated_dataset``.

    ``shared_dir`` holds ``datasets/atl_v2`` and ``datasets/manaus_v4``. When it is absent
    and ``synthetic_fallback`` is on, a small generated dataset (clearly marked synthetic)
    stands in so the loop still runs end to end.
    """

    shared_dir: str
    taxonomy_file: str
    replay_fraction: float = 0.3
    synthetic_fallback: bool = True
    synthetic_dir: str | None = None
    # Cap per source and split (deterministic subset) — for tests and quick demos.
    max_frames_per_split: int | None = None

    def sources(self) -> tuple[list[SourceSpec], bool]:
        """The sources to curate, and whether they are synthetic."""
        settings = get_settings().model_copy(update={"shared_dir": Path(self.shared_dir)})
        try:
            return default_sources(settings), False
        except MissingDataError:
            if not self.synthetic_fallback:
                raise
            out = Path(self.synthetic_dir or Path(self.shared_dir).parent / "synthetic")
            log.warning("No real datasets under %s: using a SYNTHETIC dataset at %s", self.shared_dir, out)
            return [make_synthetic_dataset(out)], True
