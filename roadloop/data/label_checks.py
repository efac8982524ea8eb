"""The class taxonomy and the checks every labelled frame passes before it trains a model.

Shared by the curated builder (``roadloop.data.datasets``), the federated site cutter
(``roadloop.federation.sites``) and the review export (``roadloop.labeling.review_items``),
so a frame is judged by one set of rules wherever it goes:

- the image does not decode, is truncated, or cannot be read → the whole frame goes;
- the label file cannot be read as text → the whole frame goes (its objects are unknown);
- a bad label row (not 5 numeric fields, w or h <= 0, a box running past the image edge by
  more than ``EDGE_TOLERANCE_PX``, class id unknown to the source, class not in the
  taxonomy) → the row is rejected **and the whole frame goes with it**. Keeping the frame's
  other rows would teach the model the rejected objects as background (false negatives);
  Ultralytics' own dataset check ignores such an image whole for the same reason. Every
  rejected row keeps its own quarantine record (file, line, reason), and one frame-level
  record (``R_REJECTED_ROWS``) says the frame went and how many valid rows went with it;
- a missing label file means a background frame (no objects), as in Ultralytics.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.settings import get_settings

# A box edge may run past the image border by this many pixels; it is then clipped to the
# image. Honest labels overshoot by rounding only: an annotation tool that works in whole
# pixels rounds each corner (at most 0.5 px) and tools disagree on whether the last pixel
# column is W - 1 or W (1 px, the 0- vs 1-based / inclusive vs exclusive end convention), so
# 1.5 px; normalised exports round each of x, y, w, h to 6 decimals, far below a pixel. The
# shared reference data agrees: 8 of atl_v2's 4757 rows overshoot, by at most 0.005 px
# (Roboflow's float rounding), and no manaus_v4 row does. A box further out (say a centre on
# the border with half its width outside) is a wrong label, not rounding: the row is rejected.
EDGE_TOLERANCE_PX = 1.5

# Quarantine reasons (the keys of CuratedDataset.quarantine_reasons).
R_CORRUPT_IMAGE = "corrupt image"
R_TRUNCATED_IMAGE = "truncated image"
R_UNREADABLE_IMAGE = "unreadable image"
R_UNREADABLE_LABELS = "unreadable label file"
R_REJECTED_ROWS = "frame with rejected label rows"
R_MALFORMED_ROW = "malformed row"
R_OUT_OF_RANGE = "coordinates out of range"
R_BAD_SIZE = "non-positive box size"
R_UNKNOWN_CLASS_ID = "unknown class id"
R_UNMAPPED_CLASS = "class not in taxonomy"

Row = tuple[int, float, float, float, float]


# --------------------------------------------------------------------------- taxonomy


class Taxonomy(BaseModel):
    """The platform's classes (ids = list order) and each source's map onto them."""

    model_config = ConfigDict(frozen=True)

    classes: list[str]
    sources: dict[str, dict[str, str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Taxonomy:
        if not self.classes:
            raise ValueError("'classes' is empty")
        dup = [c for c, n in Counter(self.classes).items() if n > 1]
        if dup:
            raise ValueError(f"'classes' lists {dup} more than once")
        known = set(self.classes)
        for source, mapping in self.sources.items():
            unknown = {k: v for k, v in mapping.items() if v not in known}
            if unknown:
                raise ValueError(
                    f"source '{source}' maps onto unknown target class(es) {unknown}; "
                    f"targets must be one of {self.classes}"
                )
        return self

    def target_id(self, source: str, source_class_name: str) -> int | None:
        """Taxonomy id for a source's class name, or None when the source or class is unmapped."""
        target = self.sources.get(source, {}).get(source_class_name)
        return None if target is None else self.classes.index(target)

    @property
    def names(self) -> dict[int, str]:
        return dict(enumerate(self.classes))


def load_taxonomy(path: Path | None = None) -> Taxonomy:
    """Read the taxonomy YAML (default ``get_settings().taxonomy_file``)."""
    path = Path(path) if path is not None else Path(get_settings().taxonomy_file)
    if not path.is_file():
        raise MissingDataError(f"taxonomy file not found: {path}", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInputError(path, f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidInputError(path, "expected a mapping with keys 'classes' and 'sources'")
    missing = [k for k in ("classes", "sources") if k not in raw]
    if missing:
        raise InvalidInputError(path, f"missing key(s) {missing}")
    try:
        return Taxonomy(classes=raw["classes"], sources=raw["sources"] or {})
    except ValidationError as exc:
        msgs = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'taxonomy'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInputError(path, f"invalid taxonomy: {msgs}") from exc


# --------------------------------------------------------------------------- frames


class LabelledFrame(BaseModel):
    """One labelled image from anywhere (a source folder, or annotators via ``extra_frames``).

    ``class_names`` says how to read the label file's class ids: ``None`` (the default, how
    reviewed frames from annotators arrive) means the ids are already taxonomy ids; a dict
    means source ids, mapped through ``taxonomy.sources[source]``.
    ``label`` may be None or point at a missing file: the frame is background.
    """

    image: Path
    label: Path | None = None
    source: str
    split: str
    class_names: dict[int, str] | None = None


class QuarantineRecord(BaseModel):
    """One rejected frame (``line`` None) or label row (``line`` 1-based)."""

    file: str
    line: int | None = None
    reason: str
    detail: str = ""
    source: str
    split: str


@dataclass
class CheckedFrame:
    """A frame that passed every check, its rows in taxonomy ids.

    ``quarantine`` is kept for callers that still read it; it is always empty now, because a
    frame with a rejected row is not a CheckedFrame (``check_frame`` returns None for it).
    """

    frame: LabelledFrame
    sha256: str
    rows: list[Row]
    order: int
    quarantine: list[QuarantineRecord] = field(default_factory=list)


def _check_image(data: bytes) -> tuple[tuple[str, str] | None, tuple[int, int]]:
    """((reason, detail) when the image bytes are unusable, else None; approximate (w, h))."""
    if not data:
        return (R_CORRUPT_IMAGE, "empty file"), (0, 0)
    # libjpeg decodes a truncated JPEG with a warning and grey fill, so look for the
    # end-of-image marker ourselves (trailing zero padding tolerated).
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return (R_TRUNCATED_IMAGE, "JPEG has no end-of-image marker (file cut short)"), (0, 0)
    # A reduced decode is enough to prove the file decodes and is much cheaper. Its size
    # x 4 is the frame's within 3 px: ample for a pixel tolerance (EDGE_TOLERANCE_PX).
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    if img is None or img.size == 0:
        return (R_CORRUPT_IMAGE, "OpenCV could not decode the image"), (0, 0)
    return None, (4 * img.shape[1], 4 * img.shape[0])


def _clip_box(
    x: float, y: float, w: float, h: float, size_wh: tuple[int, int]
) -> tuple[tuple[float, float, float, float] | None, str]:
    """The box clipped to the image, or (None, why) when an edge overshoots past tolerance."""
    box = [x, y, w, h]
    for axis, name in ((0, "x"), (1, "y")):
        c, s, pixels = box[axis], box[axis + 2], max(1, size_wh[axis])
        lo, hi = c - s / 2, c + s / 2
        over = max(-lo, hi - 1.0, 0.0) * pixels
        if over > EDGE_TOLERANCE_PX:
            return None, (
                f"box runs {over:.1f} px past the image edge along {name} (edges {lo:.6f}, "
                f"{hi:.6f}; at most {EDGE_TOLERANCE_PX:g} px of rounding is clipped)"
            )
        if lo < 0.0 or hi > 1.0:
            lo, hi = max(0.0, lo), min(1.0, hi)
            box[axis], box[axis + 2] = (lo + hi) / 2, hi - lo
    if box[2] <= 0 or box[3] <= 0:
        return None, "box lies outside the image (nothing left after clipping to it)"
    return (box[0], box[1], box[2], box[3]), ""


def _parse_labels(
    frame: LabelledFrame, taxonomy: Taxonomy, size_wh: tuple[int, int]
) -> tuple[list[Row], list[QuarantineRecord], bool]:
    """Rows in taxonomy ids, per-row quarantine records, and whether the file was unreadable.

    ``size_wh`` is the image's (width, height) in pixels, for the edge tolerance.
    """
    rows: list[Row] = []
    bad: list[QuarantineRecord] = []
    label = frame.label
    if label is None or not Path(label).exists():
        return rows, bad, False
    try:
        text = Path(label).read_text(encoding="utf-8-sig")  # a BOM is no part of row 1
    except (OSError, UnicodeDecodeError) as exc:
        bad.append(
            QuarantineRecord(
                file=str(label),
                reason=R_UNREADABLE_LABELS,
                detail=str(exc),
                source=frame.source,
                split=frame.split,
            )
        )
        return rows, bad, True

    def reject(lineno: int, reason: str, detail: str) -> None:
        bad.append(
            QuarantineRecord(
                file=str(label),
                line=lineno,
                reason=reason,
                detail=detail,
                source=frame.source,
                split=frame.split,
            )
        )

    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            reject(lineno, R_MALFORMED_ROW, f"expected 5 fields, got {len(parts)}: {line!r}")
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            reject(lineno, R_MALFORMED_ROW, f"non-numeric field: {line!r}")
            continue
        if not all(math.isfinite(v) for v in values):
            reject(lineno, R_MALFORMED_ROW, f"every field must be a finite number: {line!r}")
            continue
        if values[0] != int(values[0]):
            reject(lineno, R_MALFORMED_ROW, f"class id must be an integer: {line!r}")
            continue
        cls, x, y, w, h = int(values[0]), *values[1:]
        if w <= 0 or h <= 0:
            reject(lineno, R_BAD_SIZE, f"w and h must be > 0: {line!r}")
            continue
        clipped, why = _clip_box(x, y, w, h, size_wh)
        if clipped is None:
            reason = R_BAD_SIZE if why.startswith("box lies outside") else R_OUT_OF_RANGE
            reject(lineno, reason, f"{why}: {line!r}")
            continue
        if frame.class_names is None:
            if not 0 <= cls < len(taxonomy.classes):
                reject(lineno, R_UNKNOWN_CLASS_ID, f"taxonomy has no class id {cls}")
                continue
            target = cls
        else:
            name = frame.class_names.get(cls)
            if name is None:
                reject(lineno, R_UNKNOWN_CLASS_ID, f"source '{frame.source}' has no class id {cls}")
                continue
            tid = taxonomy.target_id(frame.source, name)
            if tid is None:
                reject(
                    lineno,
                    R_UNMAPPED_CLASS,
                    f"class '{name}' of source '{frame.source}' is not mapped in the taxonomy",
                )
                continue
            target = tid
        rows.append((target, *clipped))
    return rows, bad, False


def check_frame(
    frame: LabelledFrame, taxonomy: Taxonomy, order: int
) -> tuple[CheckedFrame | None, list[QuarantineRecord]]:
    """Check one frame: (the frame with its rows in taxonomy ids, or None when the frame goes;
    its quarantine records). A frame with any rejected label row goes whole (module doc): its
    records are each rejected row plus one ``R_REJECTED_ROWS`` record for the frame."""

    def frame_record(reason: str, detail: str) -> QuarantineRecord:
        return QuarantineRecord(
            file=str(frame.image),
            reason=reason,
            detail=detail,
            source=frame.source,
            split=frame.split,
        )

    try:
        data = Path(frame.image).read_bytes()
    except OSError as exc:
        return None, [frame_record(R_UNREADABLE_IMAGE, str(exc))]
    problem, size_wh = _check_image(data)
    if problem is not None:
        return None, [frame_record(*problem)]
    rows, bad, unreadable = _parse_labels(frame, taxonomy, size_wh)
    if unreadable:
        return None, bad
    if bad:
        lines = ", ".join(str(b.line) for b in bad)
        summary = frame_record(
            R_REJECTED_ROWS,
            f"{len(bad)} of {len(bad) + len(rows)} label rows of {frame.label} rejected "
            f"(line {lines}); the frame is left out whole, with its {len(rows)} valid row(s), "
            "so the rejected objects are not learnt as background",
        )
        return None, [summary, *bad]
    sha = hashlib.sha256(data).hexdigest()
    return CheckedFrame(frame, sha, rows, order), []


__all__ = [
    "EDGE_TOLERANCE_PX",
    "CheckedFrame",
    "LabelledFrame",
    "QuarantineRecord",
    "Taxonomy",
    "check_frame",
    "load_taxonomy",
]
