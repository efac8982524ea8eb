"""Non-IID camera-site datasets cut from the labelled shared sources, for federated training.

A site is one camera/source domain. Every frame is checked and its labels mapped into the
platform taxonomy by the curated builder's own functions (``check_frame``): unreadable
frames go, and so does a frame with any bad or unmapped label row, whole (its other rows
would teach the rejected objects as background).

- ``atl_v2`` is cut by mean grey level (decoded at 1/4 scale): ``atl_night`` below
  ``NIGHT_BELOW`` (60), ``atl_day`` from ``DAY_AT_LEAST`` (110). The source's frames were
  exported with +-40% brightness augmentation, so the middle band mixes brightened night
  frames with darkened day frames; its frames are dropped (counted in ``info``). The
  thresholds sit at the edges of the two modes of the histogram (night mode 40-60, day
  mode 110-140, a shallow valley between); they match ``benchmarks/drift_streams``' cut.
- ``manaus_v4`` file names carry their camera/video prefix (``abqlou105_jpg`` ->
  ``abqlou``, ``accident_frame434_jpg`` -> ``accident_frame``). A prefix holding at least
  half of a fair share (train+val frames / ``manaus_sites``) becomes its own site
  ``manaus_<prefix>`` (at most ``manaus_sites - 1`` of them); the other prefixes are packed,
  largest first, onto the emptiest of the remaining ``manaus_mix<i>`` sites. A prefix lives
  in exactly one site. Deterministic: sorted by size then name, no randomness.

Splits: a site trains on its frames of the sources' train split and validates on its
frames of their val split. The held-out evaluation set (``SitePlan.test_yaml``) is the
union of the sources' test splits (no site ever sees it); image content seen in the test
set (sha256) is kept out of every site, and content in two places is kept once. The
centralized baseline (``centralized_dataset``) is exactly the union of the sites.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import cv2
import yaml
from pydantic import BaseModel, Field

from roadloop.data.datasets import (
    R_DUP_ACROSS,
    R_DUP_WITHIN,
    SPLIT_PRIORITY,
    CheckedFrame,
    LabelledFrame,
    QuarantineRecord,
    SourceSpec,
    Taxonomy,
    check_frame,
    dataset_yaml_doc,
    load_taxonomy,
    safe_stem,
)
from roadloop.errors import EmptyDatasetError, MissingDataError
from roadloop.federation.models import SiteSpec
from roadloop.fsutil import swap_dir_into_place, write_text_atomic

logger = logging.getLogger(__name__)

ATL, MANAUS = "atl_v2", "manaus_v4"
NIGHT_BELOW = 60.0
DAY_AT_LEAST = 110.0
SITE_SPLITS: tuple[str, ...] = ("train", "val")
TEST_DIR = "test"

_grey_cache: dict[tuple[str, int, int], float] = {}


class SitePlan(BaseModel):
    """The sites written by ``build_site_datasets`` and the held-out set they are scored on."""

    sites: list[SiteSpec]
    test_yaml: Path
    info: dict[str, Any] = Field(default_factory=dict)

    def site(self, name: str) -> SiteSpec:
        for spec in self.sites:
            if spec.name == name:
                return spec
        raise KeyError(f"no site '{name}' (sites: {[s.name for s in self.sites]})")


def mean_grey(path: Path) -> float:
    """Mean grey level (0-255) of an image decoded at 1/4 scale; cached by path, mtime, size."""
    st = Path(path).stat()
    key = (str(Path(path).absolute()), st.st_mtime_ns, st.st_size)
    if key not in _grey_cache:
        grey = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_4)
        _grey_cache[key] = float(grey.mean()) if grey is not None and grey.size else float("nan")
    return _grey_cache[key]


def source_prefix(stem: str) -> str:
    """Camera/video prefix of a Manaus file stem: the name without its ``_jpg`` tail and
    trailing frame number (``accident_frame434_jpg`` -> ``accident_frame``)."""
    base = re.sub(r"_(jpe?g|png|bmp|webp)$", "", stem, flags=re.IGNORECASE)
    match = re.fullmatch(r"(.*?)_?\d+", base)
    return match.group(1) if match and match.group(1) else base


def group_sources(counts: dict[str, int], k: int, site_prefix: str = "manaus") -> dict[str, str]:
    """Prefix -> site name for ``k`` sites (see the module docstring for the rule)."""
    if k < 1:
        raise ValueError("need at least one site")
    total = sum(counts.values())
    ranked = sorted(counts, key=lambda p: (-counts[p], p))
    solo = [p for p in ranked if counts[p] * 2 * k >= total][: k - 1]
    out = {p: f"{site_prefix}_{safe_stem(p)}" for p in solo}
    fill = [0] * (k - len(solo))
    for p in ranked:
        if p in out:
            continue
        i = min(range(len(fill)), key=lambda j: (fill[j], j))
        fill[i] += counts[p]
        out[p] = f"{site_prefix}_mix{i + 1}"
    return out


def _atl_site(frame: LabelledFrame, night_below: float, day_at_least: float) -> str | None:
    grey = mean_grey(frame.image)
    if grey < night_below:
        return "atl_night"
    return "atl_day" if grey >= day_at_least else None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no bytes copied, survives a move of the source), else symlink, else copy."""
    try:
        os.link(src, dst)
        return
    except OSError:
        pass
    try:
        os.symlink(Path(src).absolute(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _file_stem(cf: CheckedFrame) -> str:
    return f"{safe_stem(cf.frame.source)}__{safe_stem(Path(cf.frame.image).stem)}"


def _write_site(
    final: Path, frames: list[CheckedFrame], splits: tuple[str, ...], doc: dict, taxonomy: Taxonomy
) -> dict[str, dict[str, int]]:
    """Write one YOLO folder atomically (temp folder, then renamed over ``final``).
    Returns boxes per class per split."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
    boxes = {s: dict.fromkeys(taxonomy.classes, 0) for s in splits}
    try:
        for s in splits:
            (tmp / "images" / s).mkdir(parents=True)
            (tmp / "labels" / s).mkdir(parents=True)
        manifest = []
        for cf in frames:
            split, stem = cf.frame.split, _file_stem(cf)
            image = f"images/{split}/{stem}{Path(cf.frame.image).suffix.lower()}"
            _link_or_copy(Path(cf.frame.image), tmp / image)
            (tmp / "labels" / split / f"{stem}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in cf.rows),
                encoding="utf-8",
            )
            for c, *_ in cf.rows:
                boxes[split][taxonomy.classes[c]] += 1
            manifest.append(
                {"file": image, "split": split, "source": cf.frame.source,
                 "original": str(cf.frame.image), "sha256": cf.sha256, "n_boxes": len(cf.rows)}
            )
        (tmp / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        (tmp / "manifest.jsonl").write_text(
            "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest), encoding="utf-8"
        )
        swap_dir_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return boxes


def _check_all(
    frames: list[LabelledFrame], taxonomy: Taxonomy
) -> tuple[list[CheckedFrame], list[QuarantineRecord]]:
    """Check every frame; keep one copy of each image content (test > val > train)."""
    quarantine: list[QuarantineRecord] = []
    checked: list[CheckedFrame] = []
    for i, fr in enumerate(frames):
        ok, bad = check_frame(fr, taxonomy, i)
        quarantine.extend(bad)
        if ok is not None:
            quarantine.extend(ok.quarantine)
            checked.append(ok)
    checked.sort(key=lambda c: (SPLIT_PRIORITY.index(c.frame.split), c.order))
    seen: dict[str, CheckedFrame] = {}
    kept: list[CheckedFrame] = []
    for cf in checked:
        first = seen.get(cf.sha256)
        if first is None:
            seen[cf.sha256] = cf
            kept.append(cf)
            continue
        quarantine.append(
            QuarantineRecord(
                file=str(cf.frame.image),
                reason=R_DUP_ACROSS if first.frame.split != cf.frame.split else R_DUP_WITHIN,
                detail=f"same sha256 as {first.frame.image} (kept in {first.frame.split})",
                source=cf.frame.source,
                split=cf.frame.split,
            )
        )
    kept.sort(key=lambda c: c.order)
    return kept, quarantine


def _grey_histogram(frames: list[LabelledFrame], width: int = 10) -> dict[str, int]:
    hist = Counter(int(mean_grey(f.image) // width) * width for f in frames)
    return {f"{lo}-{lo + width}": hist[lo] for lo in sorted(hist)}


def build_site_datasets(
    datasets_dir: Path,
    out_dir: Path,
    *,
    manaus_sites: int = 3,
    min_frames: int = 10,
    night_below: float = NIGHT_BELOW,
    day_at_least: float = DAY_AT_LEAST,
    taxonomy: Taxonomy | None = None,
) -> SitePlan:
    """Write one YOLO dataset per camera site, and the held-out test set, under ``out_dir``.

    ``out_dir/<site>/`` (images/{train,val}, labels/{train,val}, data.yaml with an absolute
    ``path``, manifest.jsonl), ``out_dir/test/``, ``out_dir/quarantine.jsonl`` and
    ``out_dir/plan.json``. A site with fewer than ``min_frames`` train frames or no val frame
    is left out (``info["dropped_sites"]``). Re-running gives the same folders.
    """
    if not night_below <= day_at_least:
        raise ValueError("night_below must be <= day_at_least")
    taxonomy = taxonomy or load_taxonomy()
    datasets_dir, out_dir = Path(datasets_dir).absolute(), Path(out_dir).absolute()
    specs = [
        SourceSpec(name=n, root=datasets_dir / n)
        for n in (ATL, MANAUS)
        if (datasets_dir / n / "data.yaml").is_file()
    ]
    if not specs:
        raise MissingDataError(f"neither {ATL} nor {MANAUS} found in {datasets_dir}", datasets_dir)
    frames = [fr for spec in specs for fr in spec.frames()]

    prefix_counts = Counter(
        source_prefix(Path(f.image).stem)
        for f in frames
        if f.source == MANAUS and f.split in SITE_SPLITS
    )
    manaus_groups = group_sources(dict(prefix_counts), manaus_sites) if prefix_counts else {}

    def site_of(fr: LabelledFrame) -> str | None:
        if fr.source == ATL:
            return _atl_site(fr, night_below, day_at_least)
        return manaus_groups.get(source_prefix(Path(fr.image).stem))

    site_by_image = {str(f.image): site_of(f) for f in frames}
    kept, quarantine = _check_all(frames, taxonomy)
    image_of = {str(f.label): str(f.image) for f in frames if f.label is not None}
    dups = {r.file for r in quarantine if r.reason in (R_DUP_ACROSS, R_DUP_WITHIN)}
    bad_images = {image_of.get(r.file, r.file) for r in quarantine if r.file not in dups}
    reasons: dict[str, Counter] = defaultdict(Counter)  # per site; "test"; "unassigned"
    for r in quarantine:
        site = site_by_image.get(image_of.get(r.file, r.file))
        reasons["test" if r.split == "test" else (site or "unassigned")][r.reason] += 1

    by_site: dict[str, list[CheckedFrame]] = defaultdict(list)
    for cf in kept:
        site = site_by_image[str(cf.frame.image)]
        if cf.frame.split in SITE_SPLITS and site is not None:
            by_site[site].append(cf)
    names = sorted({s for s in site_by_image.values() if s is not None})

    info: dict[str, Any] = {
        "rule": (
            f"{ATL}: mean grey level at 1/4 scale, atl_night < {night_below:g}, "
            f"atl_day >= {day_at_least:g}, frames in between dropped; {MANAUS}: camera prefix "
            f"of the file name, a prefix with >= half a fair share of frames is its own site, "
            f"the rest packed largest-first onto the emptiest of {manaus_sites} sites in all; "
            "train/val = the sources' train/val; test = union of the sources' test splits"
        ),
        "thresholds": {"night_below": night_below, "day_at_least": day_at_least},
        "atl_grey_histogram": _grey_histogram([f for f in frames if f.source == ATL]),
        "atl_unassigned": dict(Counter(
            f.split for f in frames if f.source == ATL and site_by_image[str(f.image)] is None
        )),
        "manaus_sources": {
            s: sorted(p for p, g in manaus_groups.items() if g == s)
            for s in sorted(set(manaus_groups.values()))
        },
        "counts": {}, "boxes": {}, "classes": {}, "quality": {}, "dropped_sites": {},
        "quarantine": {k: dict(sorted(v.items())) for k, v in sorted(reasons.items())},
        "quarantined_rows_or_frames": len(quarantine),
    }

    sites: list[SiteSpec] = []
    for name in names:
        frames_here = by_site.get(name, [])
        counts = {s: sum(1 for c in frames_here if c.frame.split == s) for s in SITE_SPLITS}
        if counts["train"] < min_frames or counts["val"] == 0:
            info["dropped_sites"][name] = (
                f"{counts['train']} train / {counts['val']} val frames "
                f"(needs >= {min_frames} train and >= 1 val)"
            )
            logger.warning("site %s left out: %s", name, info["dropped_sites"][name])
            continue
        candidates = [
            f for f in frames
            if f.split in SITE_SPLITS and site_by_image[str(f.image)] == name
            and str(f.image) not in dups
        ]
        clean = sum(1 for f in candidates if str(f.image) not in bad_images)
        quality = round(clean / len(candidates), 4) if candidates else 1.0
        final = out_dir / name
        doc = dataset_yaml_doc(taxonomy.classes, False, final)
        boxes = _write_site(final, frames_here, SITE_SPLITS, doc, taxonomy)
        sites.append(SiteSpec(name=name, data_yaml=final / "data.yaml",
                              frames=counts["train"], quality=quality))
        info["counts"][name] = counts
        info["boxes"][name] = boxes
        info["classes"][name] = [c for c in taxonomy.classes if boxes["train"][c] > 0]
        info["quality"][name] = quality
    if not sites:
        raise EmptyDatasetError(
            f"no site has >= {min_frames} train frames and a val frame: {info['dropped_sites']}"
        )

    test_frames = [cf for cf in kept if cf.frame.split == "test"]
    if not test_frames:
        raise EmptyDatasetError(f"no valid test frame in {[str(s.root) for s in specs]}")
    test_dir = out_dir / TEST_DIR
    test_doc = {"path": str(test_dir), "evaluation_only": True, "train": "images/test",
                "val": "images/test", "test": "images/test",
                "nc": len(taxonomy.classes), "names": taxonomy.names}
    test_boxes = _write_site(test_dir, test_frames, ("test",), test_doc, taxonomy)
    info["counts"][TEST_DIR] = {"test": len(test_frames)}
    info["boxes"][TEST_DIR] = test_boxes
    info["test_by_site"] = dict(sorted(Counter(
        site_by_image[str(cf.frame.image)] or f"{cf.frame.source}:unassigned"
        for cf in test_frames
    ).items()))

    write_text_atomic(
        out_dir / "quarantine.jsonl", "".join(r.model_dump_json() + "\n" for r in quarantine)
    )
    plan = SitePlan(sites=sites, test_yaml=test_dir / "data.yaml", info=info)
    write_text_atomic(out_dir / "plan.json", plan.model_dump_json(indent=2) + "\n")
    logger.info("wrote %d sites under %s: %s", len(sites), out_dir, info["counts"])
    return plan


def centralized_dataset(plan: SitePlan, out_dir: Path) -> Path:
    """The union of every site's train and val frames as one YOLO dataset; its data.yaml."""
    out_dir = Path(out_dir).absolute()
    frames: list[tuple[Path, Path, str]] = []  # image, label, split
    for spec in plan.sites:
        doc = yaml.safe_load(Path(spec.data_yaml).read_text(encoding="utf-8"))
        root = Path(doc["path"])
        for split in SITE_SPLITS:
            for img in sorted((root / "images" / split).iterdir()):
                frames.append((img, root / "labels" / split / f"{img.stem}.txt", split))
    names = Counter((split, img.name) for img, _, split in frames)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        raise ValueError(f"sites share frames {clash[:5]}: they must be disjoint")
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:12]}"
    try:
        for split in SITE_SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        for img, label, split in frames:
            _link_or_copy(img, tmp / "images" / split / img.name)
            shutil.copyfile(label, tmp / "labels" / split / label.name)
        classes = list(yaml.safe_load(
            Path(plan.sites[0].data_yaml).read_text(encoding="utf-8"))["names"].values())
        (tmp / "data.yaml").write_text(
            yaml.safe_dump(dataset_yaml_doc(classes, False, out_dir), sort_keys=False),
            encoding="utf-8",
        )
        swap_dir_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "data.yaml"


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def sites_in(root: Path) -> list[SiteSpec]:
    """Sites already laid out under ``root``: every ``<site>/data.yaml`` with a train split.

    ``frames`` counts the train images; ``quality`` is read from ``plan.json`` when the
    layout was written by :func:`build_site_datasets`, else 1.0.
    """
    root = Path(root).absolute()
    quality: dict[str, float] = {}
    if (root / "plan.json").is_file():
        plan = SitePlan.model_validate_json((root / "plan.json").read_text(encoding="utf-8"))
        quality = {spec.name: spec.quality for spec in plan.sites}
    sites = []
    for data_yaml in sorted(root.glob("*/data.yaml")):
        train = data_yaml.parent / "images" / "train"
        if data_yaml.parent.name == TEST_DIR or not train.is_dir():
            continue
        frames = sum(1 for p in train.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        name = data_yaml.parent.name
        sites.append(SiteSpec(name=name, data_yaml=data_yaml, frames=frames,
                              quality=quality.get(name, 1.0)))
    if not sites:
        raise MissingDataError(f"no site datasets (<site>/data.yaml with images/train) in {root}")
    return sites


__all__ = [
    "DAY_AT_LEAST",
    "NIGHT_BELOW",
    "SitePlan",
    "build_site_datasets",
    "centralized_dataset",
    "group_sources",
    "mean_grey",
    "sites_in",
    "source_prefix",
]
