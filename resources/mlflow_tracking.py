"""MLflow tracking server / registry as a Dagster resource."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from roadloop.models.tracking import Tracker


class MlflowResource(dg.ConfigurableResource):
    """sqlite backend + local artifact root by default; a server URL in production."""

    tracking_uri: str
    experiment: str = "roadloop"
    artifact_root: str | None = None  # a folder, or an s3:// URI (settings.mlflow_artifact_uri)
    s3_endpoint_url: str | None = None  # of a non-AWS object store (MinIO, Ceph)
    registered_model_name: str = "roadloop-detector"
    # Where people open the MLflow UI (links in Dagster metadata); `roadloop serve` serves it here.
    ui_url: str = "http://127.0.0.1:5000"

    def tracker(self) -> Tracker:
        root: Path | str | None = None
        if self.artifact_root and "://" in self.artifact_root:
            root = self.artifact_root
            if self.s3_endpoint_url:  # MLflow's S3 client reads its endpoint from here
                os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", self.s3_endpoint_url)
        elif self.artifact_root:
            root = Path(self.artifact_root)
        return Tracker(self.tracking_uri, self.experiment, root)
