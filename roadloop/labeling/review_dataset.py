"""The FiftyOne review dataset: its fields, tags, saved views and App set-up.

One persistent FiftyOne dataset (default ``roadloop-review``) holds every frame that was
ever sent for review. Per sample:

- ``predictions``: the model's boxes (``fo.Detections``, relative ``[x, y, w, h]``), read-only,
  complete (every box the queue got, with confidences);
- ``ground_truth``: what annotators correct in the App; starts as a draft of the predictions
  (confident boxes only, one per object: ``drafts.draft_boxes``), so the two render apart;
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

Saved views, named for the annotator's task (the App's view bar lists them by name):
``to review`` (not yet reviewed, highest ``al_score`` first), ``reviewed`` (done, waiting for
or past import), ``label issues`` (for re-review, worst first), one ``batch_<id>`` per pushed
batch. The instructions are the dataset's ``description`` (shown under its name in the App);
the sidebar puts the review fields first and folds away those most samples leave empty.

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
VIEW_QUEUE = "to review"
VIEW_REVIEWED = "reviewed"
VIEW_LABEL_ISSUES = "label issues"
_LEGACY_VIEWS = ("review_queue", "label_issues")  # names before the views were renamed

DESCRIPTION = (
    "Traffic-camera frames to label. How to review: open the saved view 'to review' "
    "(most informative first). Correct the teal `ground_truth` boxes (a draft of the model's "
    "confident boxes: move, relabel, delete, add), then tag the sample `reviewed`. Orange "
    "`predictions` are every box the model gave (read-only, for reference). Tagged samples are "
    "imported into the next dataset version; a rejected edit comes back with a `review_error` "
    "tag and the reason in `review_error`. 'label issues' lists labels to re-check."
)
PREDICTIONS_COLOR = "#ff9f1c"  # orange: the model
GROUND_TRUTH_COLOR = "#2ec4b6"  # teal: the annotator's draft
SUSPECT_COLOR = "#e71d36"  # red: boxes label-quality checks doubt
REVIEW_PATHS = ("al_score", "camera_id", "frame_id", "batch_id", "review_error")
# Set on few samples (label issues, seed frames, provenance): a folded sidebar group.
DETAIL_PATHS = (
    "label_issue_score",
    "label_issue_types",
    "suspect_boxes",
    "annotated_by",
    "model_version",
    "split",
    "source",
    "source_ref",
    "labels_ref",
    "source_image",
    "frame_key",
)


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
    ds.info = {"about": DESCRIPTION}
    save_common_views(fo, ds)


def configure_app(fo, ds) -> None:
    """What the App shows: the instructions as the dataset description, one colour per label
    field (model orange, draft teal, doubted boxes red), the draft and the predictions on by
    default, and a ``review`` sidebar group first with rarely-set fields folded away."""
    ds.description = DESCRIPTION
    ds.app_config.color_scheme = fo.ColorScheme(
        color_by="field",
        fields=[
            {"path": "predictions", "fieldColor": PREDICTIONS_COLOR},
            {"path": "ground_truth", "fieldColor": GROUND_TRUTH_COLOR},
            {"path": "suspect_boxes", "fieldColor": SUSPECT_COLOR},
        ],
    )
    ds.app_config.active_fields = fo.ActiveFields(paths=["ground_truth", "predictions"])
    try:
        groups = fo.DatasetAppConfig.default_sidebar_groups(ds)
        moved = set(REVIEW_PATHS) | set(DETAIL_PATHS)
        for g in groups:
            g.paths = [p for p in g.paths if p not in moved]
        tags = [g for g in groups if g.name == "tags"]
        rest = [g for g in groups if g.name != "tags" and g.paths]
        ds.app_config.sidebar_groups = (
            tags
            + [fo.SidebarGroupDocument(name="review", paths=list(REVIEW_PATHS), expanded=True)]
            + rest
            + [fo.SidebarGroupDocument(name="details", paths=list(DETAIL_PATHS), expanded=False)]
        )
    except Exception as exc:  # noqa: BLE001 - cosmetic only: never block the review dataset
        logger.warning("could not configure the FiftyOne sidebar: %s", exc)


def save_common_views(fo, ds) -> None:
    """Refresh the App set-up (``configure_app``) and save the task views by readable name:
    ``to review``, ``reviewed``, ``label issues`` (older names are removed)."""
    F = fo.ViewField
    configure_app(fo, ds)
    ds.save()
    for legacy in _LEGACY_VIEWS:
        if ds.has_saved_view(legacy):
            ds.delete_saved_view(legacy)
    queue = ds.match_tags([TAG_REVIEWED, TAG_IMPORTED], bool=False).sort_by(
        F("al_score"), reverse=True
    )
    ds.save_view(
        VIEW_QUEUE,
        queue,
        description="Your task: correct ground_truth, then tag each sample `reviewed`. "
        "Most informative frames first; reviewed samples leave this view.",
        color=GROUND_TRUTH_COLOR,
        overwrite=True,
    )
    done = ds.match_tags(TAG_REVIEWED).sort_by("frame_key")
    ds.save_view(
        VIEW_REVIEWED,
        done,
        description="Samples tagged `reviewed`: imported into the next dataset version "
        "(tag `imported` once they are). Remove the tag to send one back.",
        color="#8d99ae",
        overwrite=True,
    )
    issues = ds.match_tags(TAG_LABEL_ISSUE).sort_by(F("label_issue_score"), reverse=True)
    ds.save_view(
        VIEW_LABEL_ISSUES,
        issues,
        description="Labels in doubt (red suspect_boxes, worst first): re-check ground_truth, "
        "then tag `reviewed`",
        color=SUSPECT_COLOR,
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
    "DESCRIPTION",
    "TAG_IMPORTED",
    "TAG_LABEL_ISSUE",
    "TAG_REVIEWED",
    "TAG_REVIEW_ERROR",
    "VIEW_LABEL_ISSUES",
    "VIEW_QUEUE",
    "VIEW_REVIEWED",
    "app_url",
    "configure_app",
    "ensure_label_schemas",
    "init_review_dataset",
    "save_common_views",
]
