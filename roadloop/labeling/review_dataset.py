"""The FiftyOne review dataset: its fields, tags, saved views and App set-up.

One persistent FiftyOne dataset (default ``roadloop-review``) holds every frame that was
ever sent for review. Per sample:

- ``predictions``: the model's boxes (``fo.Detections``, relative ``[x, y, w, h]``), shown as
  pre-annotations;
- ``ground_truth``: what annotators correct in the App (initialised from ``predictions``);
- ``al_score``, ``camera_id``, ``frame_id``, ``batch_id``, ``frame_key`` (``camera/frame``,
  unique), ``model_version``, ``split``, ``source_image`` (for seed frames pulled in by
  label-quality checks), ``review_error``, ``label_issue_score``.

Tags drive the workflow (the App's tag editor is the annotators' only control):

- ``reviewed``: an annotator (or the simulated oracle) finished the sample;
- ``imported``: its labels went into a curated dataset version;
- ``review_error``: the last import rejected its labels (message in ``review_error``);
  the ``reviewed`` tag was removed, so it is back in the queue;
- ``label_issue``: label-quality checks doubt its labels; held out of training until an
  annotator re-reviews it (tags it ``reviewed`` again).

Saved views: ``review_queue`` (not yet reviewed, highest ``al_score`` first), one
``batch_<id>`` per pushed batch, ``label_issues`` (for re-review, worst first).

``ReviewStore`` (``review_store``) works on this dataset; this module only says what it
looks like (``init_review_dataset`` on creation) and where the App shows it (``app_url``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from roadloop.data.datasets import Taxonomy
from roadloop.labeling.fiftyone_setup import import_eta_tolerantly

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "roadloop-review"
TAG_REVIEWED = "reviewed"
TAG_IMPORTED = "imported"
TAG_REVIEW_ERROR = "review_error"
TAG_LABEL_ISSUE = "label_issue"
VIEW_QUEUE = "review_queue"
VIEW_LABEL_ISSUES = "label_issues"


def init_review_dataset(fo, ds, taxonomy: Taxonomy) -> None:
    """Set up a new (empty) review dataset: fields, unique ``frame_key``, the taxonomy as its
    classes, the App's look and the common saved views."""
    for name, ftype in (
        ("frame_key", fo.StringField),
        ("camera_id", fo.StringField),
        ("frame_id", fo.StringField),
        ("batch_id", fo.StringField),
        ("model_version", fo.StringField),
        ("split", fo.StringField),
        ("source", fo.StringField),
        ("source_ref", fo.StringField),
        ("labels_ref", fo.StringField),
        ("source_image", fo.StringField),
        ("review_error", fo.StringField),
        ("annotated_by", fo.StringField),
        ("al_score", fo.FloatField),
        ("label_issue_score", fo.FloatField),
    ):
        ds.add_sample_field(name, ftype)
    ds.add_sample_field("label_issue_types", fo.ListField, subfield=fo.StringField)
    for name in ("predictions", "ground_truth", "suspect_boxes"):
        ds.add_sample_field(name, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    ds.create_index("frame_key", unique=True)
    ds.default_classes = list(taxonomy.classes)
    ds.classes = {"ground_truth": list(taxonomy.classes)}
    ds.info = {
        "about": "roadloop active-learning review: correct `ground_truth`, then tag the "
        "sample `reviewed`. `predictions` are the model's pre-annotations.",
    }
    configure_app(fo, ds)
    ds.save()
    save_common_views(fo, ds)


def configure_app(fo, ds) -> None:
    """Colours per field and a ``review`` sidebar group first, so annotators see the
    pre-annotations (orange), their corrections (teal) and why a frame is queued."""
    ds.app_config.color_scheme = fo.ColorScheme(
        color_by="field",
        fields=[
            {"path": "predictions", "fieldColor": "#ff9f1c"},
            {"path": "ground_truth", "fieldColor": "#2ec4b6"},
            {"path": "suspect_boxes", "fieldColor": "#e71d36"},
        ],
    )
    review_paths = [
        "al_score",
        "batch_id",
        "camera_id",
        "frame_id",
        "review_error",
        "label_issue_score",
        "label_issue_types",
        "annotated_by",
        "model_version",
        "split",
    ]
    try:
        groups = fo.DatasetAppConfig.default_sidebar_groups(ds)
        for g in groups:
            g.paths = [p for p in g.paths if p not in review_paths]
        tags = [g for g in groups if g.name == "tags"]
        rest = [g for g in groups if g.name != "tags"]
        ds.app_config.sidebar_groups = (
            tags + [fo.SidebarGroupDocument(name="review", paths=review_paths)] + rest
        )
    except Exception as exc:  # noqa: BLE001 - cosmetic only: never block the review dataset
        logger.warning("could not configure the FiftyOne sidebar: %s", exc)


def save_common_views(fo, ds) -> None:
    """Save (or refresh) the review queue and label-issue views."""
    F = fo.ViewField

    queue = ds.match_tags([TAG_REVIEWED, TAG_IMPORTED], bool=False).sort_by(
        F("al_score"), reverse=True
    )
    ds.save_view(
        VIEW_QUEUE,
        queue,
        description="Frames waiting for review, most informative first",
        overwrite=True,
    )
    issues = ds.match_tags(TAG_LABEL_ISSUE).sort_by(F("label_issue_score"), reverse=True)
    ds.save_view(
        VIEW_LABEL_ISSUES,
        issues,
        description="Labels in doubt: re-review, then tag `reviewed`",
        overwrite=True,
    )


def ensure_label_schemas(ds, classes: Sequence[str]) -> None:
    """In-App annotation (FiftyOne >= 1.13): ``ground_truth`` editable with the taxonomy
    as a dropdown, the model's boxes read-only. Needs samples (the media type) first."""
    if not hasattr(ds, "set_label_schemas") or len(ds) == 0:
        return
    try:
        if "ground_truth" in ds.label_schemas:
            return
        schemas = ds.generate_label_schemas(
            ["ground_truth", "predictions", "suspect_boxes"], scan_samples=False
        )
        schemas["ground_truth"].update(component="dropdown", classes=list(classes))
        # Annotators edit boxes and classes; the model-only attributes stay out of the form.
        schemas["ground_truth"]["attributes"] = [
            a
            for a in schemas["ground_truth"].get("attributes", [])
            if a.get("name") in ("id", "tags")
        ]
        schemas["predictions"]["read_only"] = True
        schemas["suspect_boxes"]["read_only"] = True
        ds.set_label_schemas(schemas)
        ds.active_label_schemas = ["ground_truth"]
    except Exception as exc:  # noqa: BLE001 - Explore view and tagging work without it
        logger.warning("could not set FiftyOne annotation schemas: %s", exc)


def app_url(
    dataset_name: str, port: int, address: str = "127.0.0.1", view: str | None = VIEW_QUEUE
) -> str:
    """The FiftyOne App URL of the review dataset (optionally a saved view)."""
    from urllib.parse import quote

    import_eta_tolerantly()
    from fiftyone.core.utils import to_slug

    url = f"http://{address}:{port}/datasets/{quote(dataset_name)}"
    if view:
        url += f"?view={quote(to_slug(view))}"
    return url


__all__ = [
    "DEFAULT_DATASET",
    "TAG_IMPORTED",
    "TAG_LABEL_ISSUE",
    "TAG_REVIEWED",
    "TAG_REVIEW_ERROR",
    "VIEW_LABEL_ISSUES",
    "VIEW_QUEUE",
    "app_url",
    "configure_app",
    "ensure_label_schemas",
    "init_review_dataset",
    "save_common_views",
]
