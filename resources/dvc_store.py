"""Dataset versioning with DVC: a local remote by default, any DVC remote URL by config."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from roadloop.data.versioning import DvcStore


class DvcResource(dg.ConfigurableResource):
    repo_dir: str
    remote_url: str
    s3_endpoint_url: str | None = None  # an s3:// remote on a non-AWS server (MinIO, Ceph)

    def store(self) -> DvcStore:
        store = DvcStore(Path(self.repo_dir), self.remote_url, self.s3_endpoint_url)
        store.ensure()
        return store

    @property
    def curated_dir(self) -> Path:
        return Path(self.repo_dir) / "data" / "curated"
