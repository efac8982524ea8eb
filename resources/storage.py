"""Where the platform keeps frames, datasets and run artifacts.

Frame store layout (shared contract with the fleet gateway, see ``roadloop.frames``)::

    <frame_store>/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg   the frame (written first)
    <frame_store>/<camera_id>/<YYYY-MM-DD>/<frame_id>.json  its FrameRecord (written last)

A sidecar's presence means the frame is complete: both files are written to a temporary
name and renamed into place, so a crash never leaves a frame that readers pick up half-way.
Each top-level folder is one camera, i.e. one dynamic partition of ``sampled_edge_frames``.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from roadloop.frames import FrameStore


class FrameStoreResource(dg.ConfigurableResource):
    """The frame store that replayed cameras and the fleet gateway write into."""

    root: str

    def store(self) -> FrameStore:
        return FrameStore(Path(self.root))


class ArtifactStoreResource(dg.ConfigurableResource):
    """Local folder for per-run outputs (weights, ONNX files, reports) before MLflow logs them."""

    root: str

    def path(self, *parts: str) -> Path:
        p = Path(self.root).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p
