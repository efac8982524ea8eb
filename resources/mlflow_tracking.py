"""MLflow tracking server / registry as a Dagster resource."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from roadloop.models.tracking import Tracker


class MlflowResource(dg.ConfigurableResource):
    """sqlite backend + local artifact root by default; a server URL in production."""

    tracking_uri: str
    experiment: str = "roadloop"
    artifact_root: str | None = None
    registered_model_name: str = "roadloop-detector"
    # Where people open the MLflow UI (links in Dagster metadata); `roadloop serve` serves it here.
    ui_url: str = "http://127.0.0.1:5000"

    def tracker(self) -> Tracker:
        root = Path(self.artifact_root) if self.artifact_root else None
        return Tracker(self.tracking_uri, self.experiment, root)
