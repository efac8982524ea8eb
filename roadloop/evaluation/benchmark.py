"""Detector evaluation: accuracy, count error, latency, per-source and robustness test sets.

Accuracy comes from Ultralytics ``val`` (never re-implemented here), for ``.pt`` and
``.onnx`` files alike. On top of it:

* **Count MAE** - traffic counting is what the cameras are for, so each model also predicts
  on the split's frames at the deployment confidence (``conf``) and the per-frame box counts
  are compared with the ground-truth label counts.
* **Latency** - model forward only, on a fixed seeded random batch, with one protocol for
  PyTorch and ONNX Runtime so the formats compare.
* **Test sets** - ``split_by_source`` makes per-source views of a split (``atl_v2`` vs
  ``manaus_v4``: the domain shift) and ``make_robustness_slices`` makes synthetically
  corrupted copies (low light, fog, blur, noise).

``benchmark`` runs all of it for the candidate and the production model in every format
and returns a JSON-serialisable :class:`BenchmarkResults`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, Field
from tqdm import tqdm

from roadloop.errors import EmptyDatasetError, InvalidInputError, MissingDataError, RoadloopError
from roadloop.fsutil import swap_dir_into_place

logger = logging.getLogger(__name__)

#: Model formats a :class:`ModelSet` may hold, in report order.
FORMATS: tuple[str, ...] = ("pytorch", "onnx_fp32", "onnx_int8")
FORMAT_LABELS: dict[str, str] = {
    "pytorch": "PyTorch",
    "onnx_fp32": "ONNX fp32",
    "onnx_int8": "ONNX INT8",
}
#: Robustness slices ``make_robustness_slices`` knows.
SLICE_NAMES: tuple[str, ...] = ("low_light", "fog", "blur", "noise")
#: Frame file names in curated datasets are ``<source>__<original stem>``.
SOURCE_SEPARATOR = "__"
#: Name of the test set holding every frame of the split.
ALL = "all"

_IMG_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"}

TestSetKind = Literal["all", "source", "slice"]


# --------------------------------------------------------------------------- results


class DetectionMetrics(BaseModel):
    """Accuracy of one model file on one test set.

    ``map50``/``map50_95``/``precision``/``recall`` are Ultralytics' ``val`` figures (mAP is
    the mean over the classes that have ground truth in the split; P and R are at the
    confidence that maximises mean F1). ``f1 = 2PR / (P + R)``.

    Classes with no ground-truth box in the split have no AP: they are left out of
    ``per_class_ap50``/``per_class_ap50_95`` and listed in ``absent_classes`` (an AP of 0
    would wrongly read as "the model fails on buses"). ``per_class_count_mae`` covers every
    class, since false positives of an absent class are still counting errors.

    ``count_mae`` is the mean over frames of ``|predicted boxes - labelled boxes|`` with all
    classes together (the per-frame traffic count); ``per_class_count_mae[c]`` is the same
    for class ``c`` alone. Predictions are taken at the evaluation's ``conf``.
    """

    map50: float
    map50_95: float
    precision: float
    recall: float
    f1: float
    per_class_ap50: dict[str, float]
    per_class_ap50_95: dict[str, float]
    per_class_count_mae: dict[str, float]
    count_mae: float
    n_images: int
    n_instances: int = 0
    absent_classes: list[str] = Field(default_factory=list)
    conf: float = 0.25


class LatencyStats(BaseModel):
    """Forward-pass latency of one model file at one batch size (milliseconds per batch)."""

    batch: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    frames_per_s: float  # batch / mean seconds per batch
    runs: int
    warmup: int
    threads: int | None = None
    device: str = "cpu"


class ModelSet(BaseModel):
    """One model version in its formats; a format that was not produced is ``None``."""

    version: str
    pytorch: Path | None = None
    onnx_fp32: Path | None = None
    onnx_int8: Path | None = None

    def files(self) -> dict[str, Path]:
        """The formats present, in :data:`FORMATS` order."""
        return {f: Path(p) for f in FORMATS if (p := getattr(self, f)) is not None}


class LatencyConfig(BaseModel):
    """Latency protocol. The default (10 warm-up + 100 timed runs) is the reported one;
    tests and demos shrink it (e.g. ``warmup=2, runs=5``)."""

    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    warmup: int = Field(default=10, ge=0)
    runs: int = Field(default=100, ge=1)
    threads: int | None = Field(default=None, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"


class MetricsRow(BaseModel):
    model: str  # "candidate" | "production"
    version: str
    format: str  # one of FORMATS
    test_set: str
    metrics: DetectionMetrics


class LatencyRow(BaseModel):
    model: str
    version: str
    format: str
    stats: LatencyStats


class BenchmarkResults(BaseModel):
    """Everything the benchmark measured; ``model_dump_json()`` is the report's JSON."""

    created_at: str
    imgsz: int
    split: str
    conf: float
    models: dict[str, ModelSet]
    test_sets: list[str]
    test_set_kinds: dict[str, str]
    latency_config: LatencyConfig
    rows: list[MetricsRow] = Field(default_factory=list)
    latency_rows: list[LatencyRow] = Field(default_factory=list)

    def get(self, model: str, format: str, test_set: str) -> DetectionMetrics | None:
        for r in self.rows:
            if r.model == model and r.format == format and r.test_set == test_set:
                return r.metrics
        return None

    def latency(self, model: str, format: str, batch: int) -> LatencyStats | None:
        for r in self.latency_rows:
            if r.model == model and r.format == format and r.stats.batch == batch:
                return r.stats
        return None

    def model_names(self) -> list[str]:
        """Models in report order: candidate first, then production, then any other."""
        order = {"candidate": 0, "production": 1}
        return sorted(self.models, key=lambda m: (order.get(m, 2), m))

    def formats(self, model: str) -> list[str]:
        """Formats with at least one metrics or latency row for ``model``, in FORMATS order."""
        seen = {r.format for r in self.rows if r.model == model}
        seen |= {r.format for r in self.latency_rows if r.model == model}
        return [f for f in FORMATS if f in seen]

    def test_sets_of_kind(self, kind: str) -> list[str]:
        return [t for t in self.test_sets if self.test_set_kinds.get(t) == kind]

    def batch_sizes(self) -> list[int]:
        return sorted({r.stats.batch for r in self.latency_rows})


# --------------------------------------------------------------------------- helpers


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{what} not found: {path}", path)
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(path, f"cannot read YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidInputError(path, "data YAML is not a mapping")
    return doc


def _names_from_doc(doc: dict[str, Any], path: Path) -> list[str]:
    names = doc.get("names")
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(path, f"'names' keys must be class ids ({exc})") from exc
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise InvalidInputError(path, "data YAML has no 'names' (class list)")


def read_class_names(data_yaml: Path) -> list[str]:
    """Class names of a YOLO data YAML, in id order."""
    data_yaml = _require_file(Path(data_yaml), "data YAML")
    return _names_from_doc(_read_yaml(data_yaml), data_yaml)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in _IMG_SUFFIXES


def split_images(data_yaml: Path, split: str) -> list[Path]:
    """Image files of one split of a data YAML, resolved like Ultralytics does
    (``path:`` or the YAML's folder; a split is a folder, a ``.txt`` list, or a list)."""
    data_yaml = _require_file(Path(data_yaml), "data YAML")
    doc = _read_yaml(data_yaml)
    entry = doc.get(split)
    if not entry:
        raise InvalidInputError(data_yaml, f"no '{split}:' split in data YAML")
    root = Path(doc.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root) if not root.exists() else root
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(item)
        p = p if p.is_absolute() else (root / p)
        if p.is_dir():
            images += [q for q in p.rglob("*") if q.is_file() and _is_image(q)]
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line:
                    continue
                q = Path(
                    line.replace("./", str(p.parent) + os.sep, 1) if line.startswith("./") else line
                )
                if _is_image(q):
                    images.append(q)
        elif p.is_file() and _is_image(p):
            images.append(p)
        else:
            raise MissingDataError(f"split '{split}' of {data_yaml} points at missing {p}", p)
    if not images:
        raise EmptyDatasetError(f"split '{split}' of {data_yaml} has no images")
    return sorted(images, key=str)


def label_path_for(image: Path) -> Path:
    """YOLO convention (as Ultralytics' ``img2label_paths``): last ``/images/`` → ``/labels/``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _label_class_counts(label: Path, nc: int) -> np.ndarray:
    counts = np.zeros(nc, dtype=np.int64)
    if not label.is_file():
        return counts  # background frame
    for lineno, line in enumerate(label.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            c = int(float(parts[0]))
        except ValueError as exc:
            raise InvalidInputError(
                label, f"line {lineno}: class id {parts[0]!r} is not a number"
            ) from exc
        if not 0 <= c < nc:
            raise InvalidInputError(label, f"line {lineno}: class id {c} outside 0..{nc - 1}")
        counts[c] += 1
    return counts


def _onnx_input(model_path: Path) -> tuple[str, list[int | str], str]:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidInputError(model_path, f"ONNX Runtime cannot load the model ({exc})") from exc
    inp = sess.get_inputs()[0]
    return inp.name, list(inp.shape), inp.type


def _check_onnx_imgsz(model_path: Path, imgsz: int) -> None:
    """ONNX exports have a static spatial size; evaluating at another one fails deep in
    ONNX Runtime, so say it plainly here."""
    if Path(model_path).suffix.lower() != ".onnx":
        return
    _, shape, _ = _onnx_input(model_path)
    hw = [d for d in shape[2:4] if isinstance(d, int)]
    if any(d != imgsz for d in hw):
        raise InvalidInputError(
            model_path, f"ONNX input is {shape} (static spatial size), but imgsz={imgsz} was asked"
        )


def _check_model_file(model_path: Path, what: str = "model file") -> Path:
    model_path = _require_file(Path(model_path), what)
    if model_path.suffix.lower() not in (".pt", ".onnx"):
        raise InvalidInputError(model_path, "unsupported model format (expected .pt or .onnx)")
    if model_path.stat().st_size == 0:
        raise InvalidInputError(model_path, "model file is empty")
    return model_path


def _model_names(model: Any) -> list[str]:
    names = model.names
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def _check_names(
    model_path: Path, model_names: list[str], data_names: list[str], data_yaml: Path
) -> None:
    if len(model_names) != len(data_names):
        raise InvalidInputError(
            model_path,
            f"model has {len(model_names)} classes {model_names}, but {data_yaml} has "
            f"{len(data_names)} {data_names}",
        )
    if model_names != data_names:
        logger.warning(
            "class names of %s %s differ from %s %s; using the data YAML's names",
            model_path,
            model_names,
            data_yaml,
            data_names,
        )


# --------------------------------------------------------------------------- accuracy


def evaluate_detector(
    model_path: Path,
    data_yaml: Path,
    *,
    imgsz: int,
    split: str = "test",
    conf: float = 0.25,
    device: str = "cpu",
) -> DetectionMetrics:
    """mAP/P/R/per-class AP from Ultralytics ``val`` plus count MAE from ``predict`` at ``conf``.

    Works for ``.pt`` and ``.onnx`` (fp32 or INT8) files. The model's classes must be the
    data YAML's classes (same count, same order).

    Every format sees the same square ``imgsz`` letterbox (``rect=False``): that is what the
    deployed ONNX (static spatial size) gets, so PyTorch, fp32 and INT8 numbers compare.
    Ultralytics would otherwise use rectangular letterboxes for ``.pt`` and for any ONNX
    whose batch is dynamic - which a static-spatial export cannot run.
    """
    model_path = _check_model_file(Path(model_path))
    data_yaml = _require_file(Path(data_yaml), "data YAML")
    _check_onnx_imgsz(model_path, imgsz)
    data_names = read_class_names(data_yaml)
    images = split_images(data_yaml, split)
    nc = len(data_names)

    from ultralytics import YOLO

    try:
        model = YOLO(str(model_path), task="detect")
    except Exception as exc:
        raise InvalidInputError(model_path, f"Ultralytics cannot load the model ({exc})") from exc
    _check_names(model_path, _model_names(model), data_names, data_yaml)

    logger.info(
        "evaluating %s on %s [%s] (%d frames, imgsz %d)",
        model_path.name,
        data_yaml,
        split,
        len(images),
        imgsz,
    )
    with tempfile.TemporaryDirectory(prefix="roadloop-eval-") as tmp:
        res = model.val(
            data=str(data_yaml),
            split=split,
            imgsz=imgsz,
            batch=1,
            device=device,
            rect=False,
            plots=False,
            verbose=False,
            workers=0,
            save_json=False,
            project=tmp,
            name="val",
            exist_ok=True,
        )
        box = res.box
        nt = getattr(res, "nt_per_class", None)
        nt = np.zeros(nc, dtype=int) if nt is None else np.asarray(nt)
        present = [c for c in range(nc) if c < len(nt) and nt[c] > 0]
        ap_idx = [int(i) for i in getattr(box, "ap_class_index", [])]
        ap50 = {c: float(box.ap50[j]) for j, c in enumerate(ap_idx)} if ap_idx else {}
        ap = {c: float(box.ap[j]) for j, c in enumerate(ap_idx)} if ap_idx else {}
        per_ap50 = {data_names[c]: ap50.get(c, 0.0) for c in present}  # present, never matched → 0
        per_ap = {data_names[c]: ap.get(c, 0.0) for c in present}
        precision, recall = float(box.mp), float(box.mr)

        # Counting error at the deployment confidence.
        gt = np.stack([_label_class_counts(label_path_for(p), nc) for p in images])
        pred = np.zeros_like(gt)
        results = model.predict(
            source=[str(p) for p in images],
            stream=True,
            imgsz=imgsz,
            conf=conf,
            device=device,
            batch=1,
            rect=False,
            verbose=False,
            save=False,
            project=tmp,
            name="predict",
            exist_ok=True,
        )
        for i, r in enumerate(results):
            cls = r.boxes.cls.cpu().numpy().astype(int) if r.boxes is not None else np.zeros(0, int)
            pred[i] = np.bincount(cls[(cls >= 0) & (cls < nc)], minlength=nc)[:nc]

    err = np.abs(pred - gt)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return DetectionMetrics(
        map50=float(box.map50),
        map50_95=float(box.map),
        precision=precision,
        recall=recall,
        f1=float(f1),
        per_class_ap50=per_ap50,
        per_class_ap50_95=per_ap,
        per_class_count_mae={data_names[c]: float(err[:, c].mean()) for c in range(nc)},
        count_mae=float(np.abs(pred.sum(1) - gt.sum(1)).mean()),
        n_images=len(images),
        n_instances=int(gt.sum()),
        absent_classes=[data_names[c] for c in range(nc) if c not in present],
        conf=conf,
    )


# --------------------------------------------------------------------------- test sets


def _subset_yaml(names: list[str], split: str, comment: str) -> str:
    # Ultralytics requires train/val keys; they point at the same frames and are never trained on.
    doc = {
        "train": f"images/{split}",
        "val": f"images/{split}",
        split: f"images/{split}",
        "nc": len(names),
        "names": dict(enumerate(names)),
    }
    return f"# {comment}\n# paths are relative to this file's folder\n" + yaml.safe_dump(
        doc, sort_keys=False
    )


def _dataset_split(dataset_dir: Path, split: str) -> tuple[list[str], list[Path]]:
    dataset_dir = Path(dataset_dir)
    data_yaml = dataset_dir / "data.yaml"
    if not data_yaml.is_file():
        raise MissingDataError(f"no data.yaml in dataset folder {dataset_dir}", data_yaml)
    names = read_class_names(data_yaml)
    img_dir = dataset_dir / "images" / split
    if not img_dir.is_dir():
        raise MissingDataError(f"dataset {dataset_dir} has no images/{split} folder", img_dir)
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and _is_image(p))
    if not images:
        raise EmptyDatasetError(f"split '{split}' of {dataset_dir} has no images ({img_dir})")
    return names, images


def source_of(image_name: str) -> str | None:
    """``atl_v2__A10_png.jpg`` → ``atl_v2``; ``None`` without a ``<source>__`` prefix."""
    head, sep, _ = image_name.partition(SOURCE_SEPARATOR)
    return head if sep and head else None


def split_by_source(dataset_dir: Path, split: str, out_root: Path) -> dict[str, Path]:
    """Data YAMLs for the whole split (``"all"``) and for each source's frames in it.

    Sources come from file-name prefixes (``<source>__``). Each subset is a folder of
    symlinks (``images/<split>``, ``labels/<split>``) to the dataset's files - nothing big is
    copied, and Ultralytics' label cache lands in ``out_root``, never in the dataset.
    Frames without a prefix are in ``"all"`` only.
    """
    dataset_dir = Path(dataset_dir).absolute()
    out_root = Path(out_root).absolute()
    names, images = _dataset_split(dataset_dir, split)
    groups: dict[str, list[Path]] = {ALL: images}
    unprefixed = 0
    for img in images:
        src = source_of(img.name)
        if src is None:
            unprefixed += 1
            continue
        groups.setdefault(src, []).append(img)
    if unprefixed:
        logger.warning(
            "%d frames of %s/%s have no '<source>__' prefix; they are in 'all' only",
            unprefixed,
            dataset_dir,
            split,
        )
    out_root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, imgs in groups.items():
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out_root))
        try:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for img in imgs:
                os.symlink(img.resolve(), tmp / "images" / split / img.name)
                lbl = label_path_for(img)
                if lbl.is_file():
                    os.symlink(lbl.resolve(), tmp / "labels" / split / lbl.name)
            (tmp / "data.yaml").write_text(
                _subset_yaml(
                    names,
                    split,
                    f"roadloop test set '{name}': {len(imgs)} frames of "
                    f"{dataset_dir}/images/{split}",
                ),
                encoding="utf-8",
            )
            swap_dir_into_place(tmp, out_root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        out[name] = out_root / name / "data.yaml"
        logger.info("test set %s: %d frames", name, len(imgs))
    return out


# Corruption parameters (pixel values normalised to [0, 1]; sizes relative to the long side
# so a 1280 px and a 640 px frame look equally corrupted after the model's resize).
#: low light: ``x' = LOW_LIGHT_SCALE * x ** LOW_LIGHT_GAMMA + N(0, LOW_LIGHT_NOISE)``
#: (gamma darkens mid-tones, the scale dims the highlights; dark frames carry sensor noise).
LOW_LIGHT_GAMMA = 2.0
LOW_LIGHT_SCALE = 0.5
LOW_LIGHT_NOISE = 0.03
#: fog: blend towards a light grey haze, denser at the top of the frame (the distant road)
#: than at the bottom (near the camera): alpha runs linearly FOG_TOP → FOG_BOTTOM.
FOG_HAZE = 0.8
FOG_TOP = 0.7
FOG_BOTTOM = 0.3
#: blur: motion blur (a line kernel BLUR_MOTION × long side, angle seeded per frame)
#: followed by a Gaussian blur of sigma BLUR_SIGMA × long side (defocus).
BLUR_MOTION = 0.02
BLUR_SIGMA = 0.002
#: noise: additive Gaussian sensor noise, sigma NOISE_SIGMA (about 20/255).
NOISE_SIGMA = 0.08


def _motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    import cv2

    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    c = (length - 1) / 2.0
    k = cv2.warpAffine(k, cv2.getRotationMatrix2D((c, c), angle_deg, 1.0), (length, length))
    s = float(k.sum())
    return k / s if s > 0 else np.full((1, 1), 1.0, np.float32)


def corrupt_image(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One synthetic corruption of a BGR uint8 frame (see the module constants)."""
    import cv2

    x = img.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    long_side = max(h, w)
    if kind == "low_light":
        x = LOW_LIGHT_SCALE * np.power(x, LOW_LIGHT_GAMMA)
        x = x + rng.normal(0.0, LOW_LIGHT_NOISE, x.shape).astype(np.float32)
    elif kind == "fog":
        alpha = np.linspace(FOG_TOP, FOG_BOTTOM, h, dtype=np.float32).reshape(
            h, 1, *([1] * (x.ndim - 2))
        )
        x = x * (1.0 - alpha) + FOG_HAZE * alpha
    elif kind == "blur":
        length = max(3, round(BLUR_MOTION * long_side) | 1)
        x = cv2.filter2D(x, -1, _motion_kernel(length, float(rng.uniform(0.0, 180.0))))
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=max(0.5, BLUR_SIGMA * long_side))
    elif kind == "noise":
        x = x + rng.normal(0.0, NOISE_SIGMA, x.shape).astype(np.float32)
    else:
        raise ValueError(f"unknown robustness slice {kind!r} (known: {', '.join(SLICE_NAMES)})")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def make_robustness_slices(
    dataset_dir: Path,
    split: str,
    out_root: Path,
    *,
    slices: Sequence[str] = SLICE_NAMES,
    seed: int = 0,
) -> dict[str, Path]:
    """Corrupted copies of a split's frames, one data YAML per slice; labels copied unchanged.

    Deterministic: each frame's random draws are seeded by ``(seed, slice, file name)``, so
    the output does not depend on order or on which other slices are made. Each slice is
    built in a temporary folder and renamed into ``out_root/<slice>`` when complete.
    """
    import cv2

    unknown = [s for s in slices if s not in SLICE_NAMES]
    if unknown:
        raise ValueError(f"unknown robustness slice(s) {unknown} (known: {', '.join(SLICE_NAMES)})")
    dataset_dir = Path(dataset_dir).absolute()
    out_root = Path(out_root).absolute()
    names, images = _dataset_split(dataset_dir, split)
    out_root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for kind in slices:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=out_root))
        try:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for img_path in tqdm(images, desc=f"slice {kind}", leave=False, disable=None):
                img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
                if img is None:
                    raise InvalidInputError(img_path, "cannot decode image")
                rng = np.random.default_rng(
                    [seed, zlib.crc32(kind.encode()), zlib.crc32(img_path.name.encode())]
                )
                dst = tmp / "images" / split / img_path.name
                params = (
                    [cv2.IMWRITE_JPEG_QUALITY, 95]
                    if dst.suffix.lower() in (".jpg", ".jpeg")
                    else []
                )
                if not cv2.imwrite(str(dst), corrupt_image(img, kind, rng), params):
                    raise RoadloopError(f"could not write corrupted frame {dst}")
                lbl = label_path_for(img_path)
                if lbl.is_file():
                    shutil.copyfile(lbl, tmp / "labels" / split / lbl.name)
            (tmp / "data.yaml").write_text(
                _subset_yaml(
                    names,
                    split,
                    f"roadloop robustness slice '{kind}' (seed {seed}) of "
                    f"{dataset_dir}/images/{split}",
                ),
                encoding="utf-8",
            )
            swap_dir_into_place(tmp, out_root / kind)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        out[kind] = out_root / kind / "data.yaml"
        logger.info("robustness slice %s: %d frames", kind, len(images))
    return out


# --------------------------------------------------------------------------- latency


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import onnxruntime as ort
    import torch

    ok = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not ok:
        raise RoadloopError(
            "latency device 'cuda' asked, but torch CUDA or the ONNX Runtime "
            "CUDA provider is not available"
        )
    return "cuda" if ok else "cpu"


def _torch_runner(
    model_path: Path, imgsz: int, device: str, seed: int
) -> Callable[[int], Callable[[], Any] | None]:
    import torch
    from ultralytics import YOLO

    try:
        net = YOLO(str(model_path), task="detect").model
    except Exception as exc:
        raise InvalidInputError(model_path, f"Ultralytics cannot load the model ({exc})") from exc
    net = net.fuse(verbose=False) if hasattr(net, "fuse") else net
    net = net.float().to(device).eval()

    def make(batch: int) -> Callable[[], Any]:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((batch, 3, imgsz, imgsz), generator=g).to(device)

        def run() -> Any:
            with torch.inference_mode():
                y = net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return y

        return run

    return make


def _onnx_runner(
    model_path: Path, imgsz: int, device: str, seed: int, threads: int | None
) -> Callable[[int], Callable[[], Any] | None]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda"
        else ["CPUExecutionProvider"]
    )
    try:
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    except Exception as exc:
        raise InvalidInputError(model_path, f"ONNX Runtime cannot load the model ({exc})") from exc
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    hw = [d for d in inp.shape[2:4] if isinstance(d, int)]
    if any(d != imgsz for d in hw):
        raise InvalidInputError(
            model_path, f"ONNX input is {inp.shape}, but imgsz={imgsz} was asked"
        )

    def make(batch: int) -> Callable[[], Any] | None:
        if isinstance(inp.shape[0], int) and inp.shape[0] != batch:
            logger.warning(
                "%s has a static batch of %s; skipping batch %d",
                model_path.name,
                inp.shape[0],
                batch,
            )
            return None
        x = np.random.default_rng(seed).random((batch, 3, imgsz, imgsz)).astype(dtype)
        feed = {inp.name: x}
        return lambda: sess.run(None, feed)

    return make


def measure_latency(
    model_path: Path,
    *,
    imgsz: int,
    batch_sizes: Iterable[int] = (1, 4, 8),
    warmup: int = 10,
    runs: int = 100,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> list[LatencyStats]:
    """Forward-pass latency percentiles per batch size (``time.perf_counter``).

    Same protocol for every format: one fixed seeded random input per batch size,
    ``warmup`` untimed runs, then ``runs`` timed ones; no pre/post-processing or NMS.
    PyTorch: the Ultralytics model, fused, ``.eval()``, under ``torch.inference_mode()``,
    ``torch.set_num_threads(threads)`` for the duration. ONNX: an ONNX Runtime session with
    ``intra_op_num_threads=threads`` (CUDA provider when ``device`` resolves to cuda).
    ``threads=None`` leaves each runtime's default. An ONNX file with a static batch
    dimension is measured only at that batch size (others are skipped with a warning).
    """
    model_path = _check_model_file(Path(model_path))
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be >= 1, got {sizes}")
    dev = _resolve_device(device)

    import torch

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if model_path.suffix.lower() == ".pt":
            make = _torch_runner(model_path, imgsz, dev, seed)
        else:
            make = _onnx_runner(model_path, imgsz, dev, seed, threads)
        out: list[LatencyStats] = []
        for b in sizes:
            run = make(b)
            if run is None:
                continue
            for _ in range(warmup):
                run()
            times = np.empty(runs, dtype=np.float64)
            for i in range(runs):
                t0 = time.perf_counter()
                run()
                times[i] = (time.perf_counter() - t0) * 1000.0
            p50, p95, p99 = (float(v) for v in np.percentile(times, [50, 95, 99]))
            mean = float(times.mean())
            out.append(
                LatencyStats(
                    batch=b,
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                    mean_ms=mean,
                    frames_per_s=b / (mean / 1000.0) if mean > 0 else float("inf"),
                    runs=runs,
                    warmup=warmup,
                    threads=threads,
                    device=dev,
                )
            )
            logger.info(
                "latency %s batch %d: p50 %.1f ms, p95 %.1f ms", model_path.name, b, p50, p95
            )
        return out
    finally:
        torch.set_num_threads(prev_threads)


# --------------------------------------------------------------------------- benchmark


def default_test_set_kind(name: str) -> TestSetKind:
    if name == ALL:
        return "all"
    if name in SLICE_NAMES:
        return "slice"
    return "source"


def benchmark(
    models: dict[str, ModelSet],
    test_sets: dict[str, Path],
    *,
    imgsz: int,
    latency: LatencyConfig | None = None,
    split: str = "test",
    conf: float = 0.25,
    device: str = "cpu",
    test_set_kinds: dict[str, str] | None = None,
    progress: bool = True,
) -> BenchmarkResults:
    """Evaluate every (model, format) on every test set and time every (model, format).

    ``models`` keys are ``"candidate"`` and, once one exists, ``"production"``.
    ``test_sets`` maps names to data YAMLs (e.g. ``split_by_source`` + ``make_robustness_slices``
    output); kinds default to ``all`` for ``"all"``, ``slice`` for :data:`SLICE_NAMES`, else
    ``source``. Every file is checked before any work starts, so a missing model fails fast
    with its path.
    """
    if not models:
        raise ValueError("benchmark needs at least one model")
    if not test_sets:
        raise ValueError("benchmark needs at least one test set")
    latency = latency or LatencyConfig()
    for name, ms in models.items():
        if not ms.files():
            raise MissingDataError(
                f"model '{name}' (version {ms.version}) has no model file in any format"
            )
        for fmt, path in ms.files().items():
            _check_model_file(path, f"{name} {FORMAT_LABELS[fmt]} model file")
            _check_onnx_imgsz(path, imgsz)
    for ts, yml in test_sets.items():
        _require_file(Path(yml), f"data YAML of test set '{ts}'")

    kinds = {t: (test_set_kinds or {}).get(t) or default_test_set_kind(t) for t in test_sets}
    results = BenchmarkResults(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        imgsz=imgsz,
        split=split,
        conf=conf,
        models=dict(models),
        test_sets=list(test_sets),
        test_set_kinds=kinds,
        latency_config=latency,
    )
    jobs = [(m, f, p) for m, ms in models.items() for f, p in ms.files().items()]
    total = len(jobs) * len(test_sets) + (len(jobs) if latency.enabled else 0)
    with tqdm(total=total, desc="benchmark", disable=not progress) as bar:
        for m, fmt, path in jobs:
            version = models[m].version
            for ts, yml in test_sets.items():
                bar.set_postfix_str(f"{m} {fmt} {ts}")
                metrics = evaluate_detector(
                    path, Path(yml), imgsz=imgsz, split=split, conf=conf, device=device
                )
                results.rows.append(
                    MetricsRow(model=m, version=version, format=fmt, test_set=ts, metrics=metrics)
                )
                bar.update(1)
            if latency.enabled:
                bar.set_postfix_str(f"{m} {fmt} latency")
                for stats in measure_latency(
                    path,
                    imgsz=imgsz,
                    batch_sizes=latency.batch_sizes,
                    warmup=latency.warmup,
                    runs=latency.runs,
                    threads=latency.threads,
                    device=latency.device,
                ):
                    results.latency_rows.append(
                        LatencyRow(model=m, version=version, format=fmt, stats=stats)
                    )
                bar.update(1)
    return results
