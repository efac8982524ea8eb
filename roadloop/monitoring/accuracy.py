"""Measured accuracy of the serving model on one camera's reviewed frames, against its
benchmark figure. Framework-free; the ``camera_accuracy`` asset calls it.

Drift scores (``roadloop.monitoring.drift``) say a camera's input or output *changed*; they
cannot say the model got *worse*. Where annotators reviewed a camera's frames, the answer is
measured: the serving model's mAP50 on those frames (Ultralytics ``val`` through
``roadloop.evaluation.accuracy.evaluate_detector``, never re-implemented) is compared with
the mAP50 the benchmark measured for the same model file on the held-out test split.

- **drop** = benchmark mAP50 − camera mAP50; positive means the camera sees a worse model.
  It is read on the drift scale: ≥ 0.1 minor, ≥ 0.2 significant.
- **Which frames.** The camera's rows of the review export's ``manifest.jsonl`` (every
  reviewed frame records the ``camera_id`` of its FiftyOne sample). Frames the serving model
  was trained on (``exclude_sha256``: image hashes of its training and validation splits)
  are left out: a model scores well on frames it learnt from, which would hide a drop.
- **Too few frames** (fewer than ``min_frames``, 20 by default) or no labelled box: the
  verdict is ``not_enough_data``, never an alarm. On few frames mAP50 is mostly noise: over
  random atl_v2 frame samples (shared ``atl_v2_yolo11n_gpu.pt``, 480 px) its standard
  deviation was 0.06-0.16 at 10 frames, as large as the 0.1 line, and 0.04-0.065 at 20
  (``docs/drift.md``); small samples also read high (mAP averages only the classes
  present). At 20 frames the minor line is 1.5-2.7 standard errors from no drop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from roadloop.errors import InvalidInputError
from roadloop.evaluation.inputs import read_class_names
from roadloop.labeling.review_items import ReviewExport

logger = logging.getLogger(__name__)

AccuracyVerdict = Literal["ok", "minor", "significant", "not_enough_data"]
MANIFEST = "manifest.jsonl"


class AccuracyConfig(BaseModel):
    """Lines on the benchmark-minus-camera mAP50 drop, and the frames a measurement needs."""

    model_config = ConfigDict(frozen=True)

    minor: float = Field(default=0.1, gt=0, le=1, description="Design notes: minor.")
    significant: float = Field(default=0.2, gt=0, le=1, description="Design notes: significant.")
    min_frames: int = Field(
        default=20, ge=1,
        description="Reviewed frames a camera needs: with fewer, the standard error of mAP50 "
        "is as large as the 0.1 line.",
    )


class ReviewedFrame(BaseModel):
    """One reviewed frame of the export: its image and YOLO label (taxonomy ids)."""

    frame_key: str
    camera_id: str
    image: Path
    label: Path
    sha256: str | None = None


class CameraAccuracy(BaseModel):
    """One measurement: the serving model on one camera's reviewed frames."""

    camera_id: str
    verdict: AccuracyVerdict
    reason: str = ""
    frames: int = Field(description="Frames evaluated (reviewed, not trained on).")
    reviewed_frames: int = Field(description="The camera's frames in the review export.")
    excluded_training_frames: int = 0
    instances: int = Field(default=0, description="Labelled boxes in the evaluated frames.")
    map50: float | None = None
    map50_95: float | None = None
    benchmark_map50: float
    drop: float | None = Field(default=None, description="benchmark − camera; > 0 is worse.")
    minor: float
    significant: float
    min_frames: int
    model_version: str | None = None
    model_file: str = ""
    review_export: str = Field(default="", description="Path of the review export.")
    review_export_hash: str = Field(default="", description="Its content hash (version).")

    @property
    def alarm(self) -> bool:
        return self.verdict in ("minor", "significant")


def accuracy_verdict(drop: float, config: AccuracyConfig) -> AccuracyVerdict:
    if drop >= config.significant:
        return "significant"
    if drop >= config.minor:
        return "minor"
    return "ok"


def camera_frames(export: ReviewExport, camera_id: str) -> list[ReviewedFrame]:
    """The reviewed frames of ``camera_id`` in ``export`` (from its ``manifest.jsonl``)."""
    root = Path(export.path)
    manifest = root / MANIFEST
    if not manifest.is_file():
        if export.frames:
            raise InvalidInputError(manifest, "review export has frames but no manifest")
        return []
    out: list[ReviewedFrame] = []
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("camera_id") != camera_id:
                continue
            frame = ReviewedFrame(frame_key=row["frame_key"], camera_id=camera_id,
                                  image=root / row["image"], label=root / row["label"],
                                  sha256=row.get("sha256"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(manifest, f"line {lineno}: not a manifest row ({exc})") from exc
        if not frame.image.is_file():
            raise InvalidInputError(frame.image, f"reviewed frame {frame.frame_key}: image missing")
        out.append(frame)
    return out


def reviewed_cameras(export: ReviewExport) -> dict[str, int]:
    """Reviewed frames per camera in ``export`` (cameras as its manifest records them)."""
    manifest = Path(export.path) / MANIFEST
    counts: dict[str, int] = {}
    if not manifest.is_file():
        return counts
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            camera = json.loads(line).get("camera_id")
        except (ValueError, AttributeError) as exc:
            raise InvalidInputError(manifest, f"line {lineno}: not a manifest row ({exc})") from exc
        if camera:
            counts[str(camera)] = counts.get(str(camera), 0) + 1
    return counts


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(src, dst)


def _write_subset(frames: Sequence[ReviewedFrame], root: Path, class_names: Sequence[str]) -> Path:
    """A YOLO dataset at ``root`` whose ``test`` split is ``frames``; returns its data YAML."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, f in enumerate(frames):
        name = f"{i:05d}"  # the export's names are unique already; this keeps them short
        _link_or_copy(f.image, root / "images" / f"{name}{f.image.suffix.lower()}")
        label = root / "labels" / f"{name}.txt"
        if f.label.is_file():
            _link_or_copy(f.label, label)
        else:
            label.write_text("", encoding="utf-8")  # a frame with no box: background
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        "# one camera's reviewed frames (roadloop.monitoring.accuracy)\n"
        "train: images\nval: images\ntest: images\nnames:\n"
        + "".join(f"  {i}: {json.dumps(c)}\n" for i, c in enumerate(class_names)),
        encoding="utf-8",
    )
    return data_yaml


def _instances(frames: Iterable[ReviewedFrame]) -> int:
    return sum(
        sum(1 for line in f.label.read_text(encoding="utf-8").splitlines() if line.strip())
        for f in frames if f.label.is_file()
    )


def measure_camera_accuracy(
    export: ReviewExport,
    camera_id: str,
    model_path: Path,
    *,
    imgsz: int,
    class_names: Sequence[str],
    benchmark_map50: float,
    model_version: str | None = None,
    exclude_sha256: Iterable[str] = (),
    config: AccuracyConfig | None = None,
    device: str = "cpu",
) -> CameraAccuracy:
    """mAP50 of ``model_path`` on ``camera_id``'s reviewed frames against ``benchmark_map50``.

    ``class_names`` are the model's classes, in id order; they must be the export's (its
    labels are taxonomy ids). The frames are linked into a temporary YOLO folder, evaluated
    with ``evaluate_detector`` and the folder is removed.
    """
    config = config or AccuracyConfig()
    export_names = Path(export.path) / "data.yaml"
    if export_names.is_file() and read_class_names(export_names) != list(class_names):
        raise InvalidInputError(
            export_names, f"review export classes {read_class_names(export_names)} are not the "
            f"model's {list(class_names)}: its label ids would mean other classes",
        )
    reviewed = camera_frames(export, camera_id)
    excluded = set(exclude_sha256)
    frames = [f for f in reviewed if f.sha256 is None or f.sha256 not in excluded]
    result = CameraAccuracy(
        camera_id=camera_id, verdict="not_enough_data", frames=len(frames),
        reviewed_frames=len(reviewed), excluded_training_frames=len(reviewed) - len(frames),
        instances=_instances(frames), benchmark_map50=float(benchmark_map50),
        minor=config.minor, significant=config.significant, min_frames=config.min_frames,
        model_version=model_version, model_file=str(model_path),
        review_export=str(export.path), review_export_hash=export.content_hash,
    )
    if len(frames) < config.min_frames:
        trained = (f" ({result.excluded_training_frames} more were in the model's training "
                   "data)" if result.excluded_training_frames else "")
        return result.model_copy(update={"reason": (
            f"{len(frames)} reviewed frame(s){trained}; a measurement needs {config.min_frames}")})
    if result.instances == 0:
        return result.model_copy(update={"reason": "the reviewed frames hold no labelled box"})

    from roadloop.evaluation.accuracy import evaluate_detector  # loads Ultralytics

    with tempfile.TemporaryDirectory(prefix="roadloop-camacc-") as tmp:
        data_yaml = _write_subset(frames, Path(tmp) / "ds", class_names)
        metrics = evaluate_detector(Path(model_path), data_yaml, imgsz=imgsz, split="test",
                                    device=device)
    drop = float(benchmark_map50) - metrics.map50
    verdict = accuracy_verdict(drop, config)
    logger.info("camera %s: mAP50 %.3f on %d reviewed frames, benchmark %.3f, drop %.3f: %s",
                camera_id, metrics.map50, len(frames), benchmark_map50, drop, verdict)
    return result.model_copy(update={
        "verdict": verdict, "map50": metrics.map50, "map50_95": metrics.map50_95,
        "drop": drop, "instances": metrics.n_instances,
    })


__all__ = [
    "AccuracyConfig",
    "AccuracyVerdict",
    "CameraAccuracy",
    "ReviewedFrame",
    "accuracy_verdict",
    "camera_frames",
    "measure_camera_accuracy",
    "reviewed_cameras",
]
