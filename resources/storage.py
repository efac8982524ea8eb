"""Where the platform keeps frames, datasets and run artifacts.

Frame store layout (shared contract with the fleet gateway, see ``roadloop.data.frames``)::

    <frame_store>/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg   the frame (written first)
    <frame_store>/<camera_id>/<YYYY-MM-DD>/<frame_id>.json  its FrameRecord (written last)

A sidecar's presence means the frame is complete: both files are written to a temporary
name and renamed into place, so a crash never leaves a frame that readers pick up half-way.
Each top-level folder is one camera, i.e. one dynamic partition of ``sampled_edge_frames``.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from roadloop.data.curation import DedupePolicy
from roadloop.data.frame_records import FrameStorage
from roadloop.data.object_frames import open_frame_store


class FrameStoreResource(dg.ConfigurableResource):
    """The frame store that replayed cameras and the fleet gateway write into, and the
    near-duplicate policy applied when its frames are read (see ``DedupePolicy``)."""

    root: str  # the folder store, or the local image cache of an object store (``url``)
    url: str | None = Field(
        default=None, description="s3://bucket/prefix: frames in S3-compatible object storage "
        "(roadloop.data.object_frames); unset: the folder at root.")
    s3_endpoint_url: str | None = None
    dedupe_max_hamming: int = 4
    dedupe_max_age_s: float | None = 600.0
    dedupe_per_camera_max_hamming: dict[str, int] = Field(default_factory=dict)

    def store(self) -> FrameStorage:
        """The store ``url`` names (its images cached under ``root``), else the folder at
        ``root``: ``open_frame_store``, as ``roadloop privacy`` opens it from the settings."""
        return open_frame_store(self.url or self.root, cache_dir=Path(self.root),
                                endpoint_url=self.s3_endpoint_url)

    def dedupe_policy(self) -> DedupePolicy:
        return DedupePolicy(
            max_hamming=self.dedupe_max_hamming,
            max_age_s=self.dedupe_max_age_s,
            per_camera_max_hamming=self.dedupe_per_camera_max_hamming,
        )


class ArtifactStoreResource(dg.ConfigurableResource):
    """Local folder for per-run outputs (weights, ONNX files, reports) before MLflow logs them,
    and the location of the review export that hands annotators' labels from ``reviewed_labels``
    (writer) to ``curated_dataset`` and ``label_quality`` (readers)."""

    root: str
    review_export_dir: str | None = Field(
        default=None,
        description="Where reviewed_labels writes the current review export (a YOLO folder "
        "plus its record); unset means <root>/reviewed_labels/export.",
    )

    def path(self, *parts: str) -> Path:
        p = Path(self.root).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def review_export_path(self) -> Path:
        """The review export folder (its parent exists; the folder appears with the first
        export, and readers take a missing one as an empty export)."""
        if self.review_export_dir:
            p = Path(self.review_export_dir)
            p.parent.mkdir(parents=True, exist_ok=True)
            return p
        return self.path("reviewed_labels") / "export"
