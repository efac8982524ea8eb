"""The FiftyOne review dataset (active-learning queue, annotator reviews) as a resource."""

from pathlib import Path

import dagster as dg

from roadloop.labeling.review_dataset import DEFAULT_DATASET, VIEW_QUEUE, app_url
from roadloop.labeling.review_store import ReviewStore
from roadloop.settings import get_settings


class FiftyOneResource(dg.ConfigurableResource):
    """Where the review dataset lives: a local MongoDB under ``<home>/fiftyone`` (started by
    FiftyOne on first use) or, when ``database_uri`` is set, an existing MongoDB.
    ``database_dir`` unset means ``<settings home>/fiftyone``."""

    database_dir: str | None = None
    database_uri: str | None = None
    dataset_name: str = DEFAULT_DATASET
    app_port: int = 5151
    taxonomy_file: str | None = None

    def store(self) -> ReviewStore:
        from roadloop.data.datasets import load_taxonomy

        taxonomy = load_taxonomy(Path(self.taxonomy_file)) if self.taxonomy_file else None
        return ReviewStore(
            self.dataset_name,
            database_dir=None if self.database_uri else self.resolved_database_dir(),
            database_uri=self.database_uri,
            taxonomy=taxonomy,
        )

    def resolved_database_dir(self) -> Path:
        return Path(self.database_dir) if self.database_dir else get_settings().home / "fiftyone"

    def app_url(self, view: str | None = VIEW_QUEUE) -> str:
        return app_url(self.dataset_name, self.app_port, view=view)
