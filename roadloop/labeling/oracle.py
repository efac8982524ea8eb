"""A SIMULATED annotator ("oracle") for demos, tests and benchmarks — not a person.

Replayed dataset frames carry ``labels_ref``: the path of their ground-truth YOLO label file
in a shared labelled source. :class:`SimulatedAnnotator` answers a review request for such
a frame with those ground-truth boxes, mapped from the source's class ids (its
``data.yaml`` ``names``) onto the platform taxonomy. Every answer says
``annotator="oracle-simulation"`` so simulated labels can never pass for human review.
Frames without ``labels_ref`` (video cameras, real edge frames) cannot be answered: they
need a real annotator, and asking raises :class:`OracleCannotAnswer`.

:func:`simulate_reviews` is the SIMULATED review of the FiftyOne queue (``roadloop demo``,
``roadloop annotate --simulate``, tests, benchmarks): the annotator answers the top queue
frames and the answers go into the review store exactly as a person's edits in the App do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field

from roadloop.data.datasets import LabelledFrame, Taxonomy, load_taxonomy
from roadloop.data.frame_records import FrameRecord
from roadloop.errors import InvalidInputError, MissingDataError, RoadloopError
from roadloop.fsutil import write_text_atomic
from roadloop.labeling.review_items import ReviewBox, ReviewItem

if TYPE_CHECKING:
    from roadloop.labeling.review_store import ReviewStore

logger = logging.getLogger(__name__)

ANNOTATOR_NAME = "oracle-simulation"


class OracleCannotAnswer(RoadloopError):
    """The frame has no ground truth to simulate an annotator from."""


class OracleBox(BaseModel):
    """One answered box: taxonomy class, YOLO-normalised centre/size."""

    class_id: int
    class_name: str
    xywhn: tuple[float, float, float, float]


class OracleAnswer(BaseModel):
    """The simulated annotator's labels for one frame (taxonomy ids)."""

    annotator: str = ANNOTATOR_NAME
    simulated: bool = True
    camera_id: str
    frame_id: str
    source: str
    labels_ref: str
    boxes: list[OracleBox] = Field(default_factory=list)
    dropped_rows: list[str] = Field(
        default_factory=list, description="Rows left out (unmapped class, malformed), with why."
    )

    def yolo_text(self) -> str:
        return "".join(
            f"{b.class_id} {b.xywhn[0]:.6f} {b.xywhn[1]:.6f} {b.xywhn[2]:.6f} {b.xywhn[3]:.6f}\n"
            for b in self.boxes
        )


def _find_data_yaml(label_file: Path) -> Path:
    for parent in label_file.parents:
        cand = parent / "data.yaml"
        if cand.is_file():
            return cand
    raise MissingDataError(f"no data.yaml above label file {label_file}", label_file)


def ground_truth_for_image(source_ref: str | None, sources: Iterable[str]) -> tuple[str, str] | None:
    """``(labels_ref, source)`` of a frame an edge agent read from a labelled dataset's image
    folder: ``source_ref`` ``image:<path>`` (symlinks resolved) under
    ``<source>/images/<split>/`` with ``<source>/labels/<split>/<stem>.txt`` beside it, and
    ``<source>`` a taxonomy source. None for anything else (video, streams, other folders)."""
    if not source_ref or not source_ref.startswith("image:"):
        return None
    try:
        image = Path(source_ref.removeprefix("image:")).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    split_dir = image.parent
    if split_dir.parent.name != "images":
        return None
    root = split_dir.parent.parent
    label = root / "labels" / split_dir.name / f"{image.stem}.txt"
    if root.name not in set(sources) or not label.is_file():
        return None
    return str(label), root.name


def _source_names(data_yaml: Path) -> dict[int, str]:
    try:
        doc = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInputError(data_yaml, f"cannot read data.yaml: {exc}") from exc
    names = doc.get("names") if isinstance(doc, dict) else None
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    raise InvalidInputError(data_yaml, "'names' missing or not a list/dict")


class SimulatedAnnotator:
    """SIMULATION of a human annotator: returns the shared datasets' ground truth.

    ``answer(record)`` reads ``record.labels_ref``; the source name comes from
    ``record.source`` (``"replay:<source>"``) and its class names from the ``data.yaml``
    found above the label file.
    """

    name = ANNOTATOR_NAME

    def __init__(self, taxonomy: Taxonomy | None = None) -> None:
        self.taxonomy = taxonomy or load_taxonomy()
        self._names_cache: dict[Path, dict[int, str]] = {}

    def _source_of(self, record: FrameRecord) -> str:
        src = record.source.split(":", 1)[1] if ":" in record.source else record.source
        if src not in self.taxonomy.sources:
            raise OracleCannotAnswer(
                f"frame {record.camera_id}/{record.frame_id}: source {record.source!r} has no "
                f"class map in the taxonomy (known: {sorted(self.taxonomy.sources)})"
            )
        return src

    def answer(self, record: FrameRecord) -> OracleAnswer:
        """Ground-truth boxes of ``record``'s frame in taxonomy ids (see class docstring)."""
        where = f"frame {record.camera_id}/{record.frame_id}"
        if not record.labels_ref:
            raise OracleCannotAnswer(
                f"{where} has no labels_ref: no ground truth to simulate an annotator from "
                "(it needs a real review)"
            )
        label = Path(record.labels_ref)
        source = self._source_of(record)
        data_yaml = _find_data_yaml(label)
        names = self._names_cache.get(data_yaml)
        if names is None:
            names = self._names_cache[data_yaml] = _source_names(data_yaml)
        if not label.is_file():
            raise MissingDataError(f"{where}: label file not found: {label}", label)
        try:
            text = label.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(label, f"cannot read label file: {exc}") from exc
        boxes: list[OracleBox] = []
        dropped: list[str] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            try:
                cls = int(float(parts[0]))
                x, y, w, h = (float(v) for v in parts[1:5])
                if len(parts) != 5:
                    raise ValueError("expected 5 fields")
            except ValueError as exc:
                dropped.append(f"line {lineno}: malformed ({exc})")
                continue
            src_name = names.get(cls)
            tid = None if src_name is None else self.taxonomy.target_id(source, src_name)
            if tid is None:
                dropped.append(f"line {lineno}: class {cls} ({src_name}) not in the taxonomy")
                continue
            boxes.append(
                OracleBox(class_id=tid, class_name=self.taxonomy.classes[tid], xywhn=(x, y, w, h))
            )
        if dropped:
            logger.warning("%s: oracle dropped %d row(s) of %s", where, len(dropped), label)
        return OracleAnswer(
            camera_id=record.camera_id,
            frame_id=record.frame_id,
            source=source,
            labels_ref=str(label),
            boxes=boxes,
            dropped_rows=dropped,
        )

    def write_labels(self, answer: OracleAnswer, out_dir: Path) -> Path:
        """Write the answer as a YOLO label file (taxonomy ids), atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{answer.camera_id}__{answer.frame_id}.txt"
        write_text_atomic(target, answer.yolo_text())
        return target

    def labelled_frame(
        self, record: FrameRecord, image: Path, labels_dir: Path, split: str = "train"
    ) -> tuple[LabelledFrame, OracleAnswer]:
        """Answer ``record`` and return it as a ``LabelledFrame`` for
        ``build_curated_dataset(extra_frames=...)`` (taxonomy ids: ``class_names=None``)."""
        ans = self.answer(record)
        label = self.write_labels(ans, labels_dir)
        frame = LabelledFrame(image=Path(image), label=label, source=ans.source, split=split)
        return frame, ans


# --------------------------------------------------------------------------- simulated review


def simulate_reviews(store: ReviewStore, annotator: Any, n: int) -> list[str]:
    """SIMULATION: let ``annotator`` review the top ``n`` queue samples through the App's path.

    ``annotator`` is a :class:`SimulatedAnnotator` (``answer(FrameRecord)``) or anything with
    ``annotate(ReviewItem) -> list[ReviewBox] | None``. Sets ``ground_truth`` from its
    answer, records who answered in ``annotated_by`` and tags the samples ``reviewed`` —
    exactly what a person does in the App. Frames it cannot label (no ground truth to
    simulate from) are skipped and stay in the queue. Returns the reviewed sample ids.
    """
    done: list[str] = []
    skipped = 0
    for sample_id, item in store.queue_items(limit=None):
        if len(done) >= n:
            break
        answered = _ask(annotator, item)
        if answered is None:
            skipped += 1
            continue
        boxes, who = answered
        store.set_ground_truth(sample_id, boxes, annotated_by=who)
        done.append(sample_id)
    if done:
        store.tag_reviewed(done)
    logger.info(
        "simulated annotator reviewed %d samples (%d it could not answer)", len(done), skipped
    )
    return done


def _ask(annotator: Any, item: ReviewItem) -> tuple[list[ReviewBox], str] | None:
    who = str(getattr(annotator, "name", type(annotator).__name__))
    if hasattr(annotator, "answer"):
        labels_ref, source = item.labels_ref, item.source
        if not labels_ref and isinstance(getattr(annotator, "taxonomy", None), Taxonomy):
            # an edge agent that played a labelled dataset's images (the demo's drift camera)
            found = ground_truth_for_image(item.source_ref, annotator.taxonomy.sources)
            if found is not None:
                labels_ref, source = found
        if not labels_ref or not source:
            return None
        record = FrameRecord(
            frame_id=item.frame_id,
            camera_id=item.camera_id,
            captured_at=datetime.now(UTC),
            source=source,
            source_ref=item.source_ref,
            labels_ref=labels_ref,
            width=item.width,
            height=item.height,
        )
        try:
            answer = annotator.answer(record)
        except (OracleCannotAnswer, MissingDataError) as exc:
            logger.info("oracle cannot answer %s: %s", item.frame_key, exc)
            return None
        boxes = [
            ReviewBox(
                label=b.class_name,
                box=(
                    b.xywhn[0] - b.xywhn[2] / 2,
                    b.xywhn[1] - b.xywhn[3] / 2,
                    b.xywhn[2],
                    b.xywhn[3],
                ),
            )
            for b in answer.boxes
        ]
        return boxes, str(getattr(answer, "annotator", who))
    boxes = annotator.annotate(item)
    return None if boxes is None else (list(boxes), who)


__all__ = [
    "ANNOTATOR_NAME",
    "OracleAnswer",
    "OracleBox",
    "OracleCannotAnswer",
    "SimulatedAnnotator",
    "simulate_reviews",
]
