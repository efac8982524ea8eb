"""Test sets: data YAMLs over views of a dataset split, for the benchmark to evaluate on.

* ``split_by_source`` makes per-source views of a split (``atl_v2`` vs ``manaus_v4``: the
  domain shift), plus ``"all"`` (:data:`ALL`), the whole split.
* ``make_robustness_slices`` makes synthetically corrupted copies (low light, fog, blur,
  noise: :data:`SLICE_NAMES`).

``default_test_set_kind`` tells which of the three a test set name is.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from tqdm import tqdm

from roadloop.errors import EmptyDatasetError, InvalidInputError, MissingDataError, RoadloopError
from roadloop.evaluation.inputs import is_image, label_path_for, read_class_names
from roadloop.fsutil import swap_dir_into_place

logger = logging.getLogger(__name__)

#: Robustness slices ``make_robustness_slices`` knows.
SLICE_NAMES: tuple[str, ...] = ("low_light", "fog", "blur", "noise")
#: One line per slice for reports and the Dagster UI (parameters: the constants below).
SLICE_DESCRIPTIONS: dict[str, str] = {
    "low_light": "darkened (gamma 2, half brightness) with sensor noise",
    "fog": "grey haze blended in, denser towards the top of the frame",
    "blur": "motion blur plus a slight defocus",
    "noise": "additive Gaussian sensor noise (sigma about 20/255)",
}
#: Frame file names in curated datasets are ``<source>__<original stem>``.
SOURCE_SEPARATOR = "__"
#: Name of the test set holding every frame of the split.
ALL = "all"

TestSetKind = Literal["all", "source", "slice"]


def default_test_set_kind(name: str) -> TestSetKind:
    """``all`` for :data:`ALL`, ``slice`` for :data:`SLICE_NAMES`, else ``source``."""
    if name == ALL:
        return "all"
    if name in SLICE_NAMES:
        return "slice"
    return "source"


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
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and is_image(p))
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
