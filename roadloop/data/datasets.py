"""Curated, validated, leakage-free YOLO datasets in the roadloop class taxonomy.

``build_curated_dataset`` reads labelled sources (Ultralytics YOLO folders), checks every
frame and label row, rewrites the labels into taxonomy ids and writes one dataset folder:

    out_dir/
      data.yaml            train/val/test relative to this file (no ``path:`` key, so it
                           stays valid after a DVC restore elsewhere; see write_data_yaml)
      images/{train,val,test}/<source>__<stem>.<ext>
      labels/{train,val,test}/<source>__<stem>.txt
      manifest.jsonl       one row per kept frame
      quarantine.jsonl     one row per rejected frame, label row or orphan label file
      quarantine.md        the same, for people
      summary.json         the CuratedDataset counts (without the absolute path)

Quarantine policy (the frame and row checks live in ``roadloop.data.label_checks``):
- the image does not decode, is truncated, or cannot be read → the whole frame goes;
- the label file cannot be read as text → the whole frame goes (its objects are unknown);
- a bad label row (not 5 numeric fields, w or h <= 0, a box past the image edge by more
  than rounding, class id unknown to the source, class not in the taxonomy) → the row is
  recorded and the whole frame goes with its other rows (they would teach the rejected
  objects as background); a box past the edge by rounding only is clipped to the image;
- a missing label file means a background frame (no objects), as in Ultralytics;
- a label file with no image of its name (an "orphan") trains nothing: it is recorded and
  counted (``orphan_labels``) so a mismatched export is seen, not silently dropped;
- the same image bytes (sha256) in two splits → kept in the highest-priority split
  (test > val > train), the other copy quarantined ("duplicate across splits"); a second
  copy within one split is quarantined as "duplicate within split".
Nothing is deleted from the inputs: quarantine records name the original file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml
from pydantic import BaseModel, Field
from tqdm import tqdm

from roadloop.data.label_checks import (
    R_REJECTED_ROWS,
    CheckedFrame,
    LabelledFrame,
    QuarantineRecord,
    Taxonomy,
    check_frame,
    load_taxonomy,
)
from roadloop.data.splits import is_replay_frame
from roadloop.errors import EmptyDatasetError, InvalidInputError, MissingDataError
from roadloop.fsutil import swap_dir_into_place, write_text_atomic
from roadloop.markdown import md_cell
from roadloop.settings import Settings, get_settings

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# When the same image is in two splits it stays in the one listed first here.
SPLIT_PRIORITY: tuple[str, ...] = ("test", "val", "train")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SHARED_SOURCES: tuple[str, ...] = ("atl_v2", "manaus_v4")
R_DUP_ACROSS = "duplicate across splits"
R_DUP_WITHIN = "duplicate within split"
R_ORPHAN_LABEL = "label file without image"
ORPHAN_EXAMPLES = 5  # orphan label files named in CuratedDataset (all are in quarantine.jsonl)


# --------------------------------------------------------------------------- sources


class SourceSpec(BaseModel):
    """A labelled source folder in Ultralytics YOLO layout with a ``data.yaml``."""

    name: str
    root: Path

    @property
    def data_yaml(self) -> Path:
        return Path(self.root) / "data.yaml"

    def _read_yaml(self) -> dict:
        root = Path(self.root)
        if not root.is_dir():
            raise MissingDataError(f"source '{self.name}': folder not found: {root}", root)
        if not self.data_yaml.is_file():
            raise MissingDataError(
                f"source '{self.name}': data.yaml not found: {self.data_yaml}", self.data_yaml
            )
        try:
            raw = yaml.safe_load(self.data_yaml.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInputError(self.data_yaml, f"not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise InvalidInputError(self.data_yaml, "expected a mapping")
        return raw

    def class_names(self) -> dict[int, str]:
        """The source's class names by id, from ``data.yaml`` ``names`` (dict or list)."""
        names = self._read_yaml().get("names")
        if isinstance(names, list):
            return {i: str(n) for i, n in enumerate(names)}
        if isinstance(names, dict):
            try:
                return {int(k): str(v) for k, v in names.items()}
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(self.data_yaml, f"'names' keys must be ints: {exc}")
        raise InvalidInputError(self.data_yaml, "'names' missing or not a list/dict")

    def split_image_dir(self, split: str) -> Path:
        """Image folder of a split: ``data.yaml``'s entry if it names one, else images/<split>."""
        raw = self._read_yaml()
        base = Path(self.root)
        if isinstance(raw.get("path"), str) and raw["path"] not in ("", "."):
            p = Path(raw["path"])
            base = p if p.is_absolute() else base / p
        entry = raw.get(split)
        return base / entry if isinstance(entry, str) else Path(self.root) / "images" / split

    def frames(self) -> list[LabelledFrame]:
        """Every image of every split, with its (possibly missing) label file."""
        names = self.class_names()
        out: list[LabelledFrame] = []
        for split in SPLITS:
            img_dir = self.split_image_dir(split)
            if not img_dir.is_dir():
                logger.warning("source %s: no %s split at %s", self.name, split, img_dir)
                continue
            lbl_dir = _label_dir_for(img_dir)
            for img in sorted(img_dir.iterdir()):
                if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES:
                    out.append(
                        LabelledFrame(
                            image=img,
                            label=lbl_dir / f"{img.stem}.txt",
                            source=self.name,
                            split=split,
                            class_names=names,
                        )
                    )
        return out

    def orphan_labels(self) -> list[QuarantineRecord]:
        """A record for every label file (``<stem>.txt``) that no image of its split matches.

        ``frames`` starts from the images, so such a file would otherwise go unseen: a
        renamed or missing image, or labels exported for the wrong folder. LabelImg's
        ``classes.txt`` (a class list, not labels) is no orphan.
        """
        out: list[QuarantineRecord] = []
        seen: set[Path] = set()
        for split in SPLITS:
            img_dir = self.split_image_dir(split)
            lbl_dir = _label_dir_for(img_dir)
            if lbl_dir in seen or not lbl_dir.is_dir():  # two splits may share one folder
                continue
            seen.add(lbl_dir)
            stems = (
                {p.stem for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
                if img_dir.is_dir()
                else set()
            )
            for lbl in sorted(lbl_dir.glob("*.txt")):
                if lbl.stem in stems or not lbl.is_file() or lbl.name == "classes.txt":
                    continue
                out.append(
                    QuarantineRecord(
                        file=str(lbl),
                        reason=R_ORPHAN_LABEL,
                        detail=f"no image named {lbl.stem}.* in {img_dir}",
                        source=self.name,
                        split=split,
                    )
                )
        return out


def _label_dir_for(img_dir: Path) -> Path:
    """Ultralytics convention: the last ``images`` path component becomes ``labels``."""
    parts = list(img_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return img_dir.parent / "labels" / img_dir.name


def default_sources(settings: Settings | None = None) -> list[SourceSpec]:
    """The shared real sources (atl_v2, manaus_v4) that are present.

    Raises MissingDataError when the datasets folder (or every source in it) is absent, so
    the caller can fall back to ``make_synthetic_dataset``.
    """
    settings = settings or get_settings()
    ds_dir = Path(settings.datasets_dir)
    if not ds_dir.is_dir():
        raise MissingDataError(f"shared datasets folder not found: {ds_dir}", ds_dir)
    specs = [
        SourceSpec(name=n, root=ds_dir / n)
        for n in SHARED_SOURCES
        if (ds_dir / n / "data.yaml").is_file()
    ]
    if not specs:
        raise MissingDataError(
            f"none of {list(SHARED_SOURCES)} (with a data.yaml) found in {ds_dir}", ds_dir
        )
    return specs


# --------------------------------------------------------------------------- build


class CuratedDataset(BaseModel):
    """What ``build_curated_dataset`` produced."""

    path: Path
    class_names: list[str]
    split_counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    source_counts: dict[str, dict[str, int]]
    quarantined: int  # records in quarantine.jsonl (frames, label rows, orphan label files)
    quarantine_reasons: dict[str, int]
    skipped_replay: int
    held_out: int = 0  # source frames kept out by ``exclude_images`` (label issues under review)
    # Candidate frames left out whole (bad image, bad label file or row, duplicate): with the
    # kept, replayed and held-out frames they account for every source and extra frame
    # (less those a ``max_frames_per_split`` cap never looked at).
    frames_quarantined: int = 0
    # Label files no image matches (each one a quarantine record), and the first few of them.
    orphan_labels: int = 0
    orphan_label_examples: list[str] = Field(default_factory=list)

    @property
    def data_yaml(self) -> Path:
        return Path(self.path) / "data.yaml"


def dataset_yaml_doc(class_names: Sequence[str], has_test: bool, root: Path | None) -> dict:
    """A YOLO data.yaml mapping (images/{train,val[,test]}); ``path:`` only when ``root`` given."""
    doc: dict = {}
    if root is not None:
        doc["path"] = str(Path(root).absolute())
    doc["train"] = "images/train"
    doc["val"] = "images/val"
    if has_test:
        doc["test"] = "images/test"
    doc["nc"] = len(class_names)
    doc["names"] = dict(enumerate(class_names))
    return doc


def write_data_yaml(dataset_dir: Path, dest: Path) -> Path:
    """Write a copy of the dataset's data.yaml with an absolute ``path:`` (for Ultralytics).

    The data.yaml inside a curated dataset carries no ``path:`` (Ultralytics then uses the
    yaml's folder), so the folder can be moved or restored anywhere; this writes one that
    works from any location, e.g. a run's artifact folder.
    """
    dataset_dir = Path(dataset_dir).absolute()
    src = dataset_dir / "data.yaml"
    if not src.is_file():
        raise MissingDataError(f"no data.yaml in dataset folder {dataset_dir}", src)
    doc = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    doc = {"path": str(dataset_dir), **{k: v for k, v in doc.items() if k != "path"}}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dest, yaml.safe_dump(doc, sort_keys=False))
    return dest


def safe_stem(stem: str) -> str:
    """``stem`` with every character outside [A-Za-z0-9-_.] replaced by ``_``."""
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in stem)


def _quarantine_md(records: list[QuarantineRecord], reasons: Counter) -> str:
    lines = ["# Quarantine report", ""]
    if not records:
        return "\n".join(lines + ["Nothing was quarantined.", ""])
    lines += [f"{len(records)} record(s) quarantined. Inputs were not modified.", ""]
    whole = reasons.get(R_REJECTED_ROWS, 0)
    if whole:
        note = (
            f"{whole} frame(s) with rejected label rows were left out whole, their valid rows "
            "with them (kept, the rejected objects would be learnt as background)."
        )
        lines += [note, ""]
    orphans = reasons.get(R_ORPHAN_LABEL, 0)
    if orphans:
        lines += [f"{orphans} label file(s) match no image and trained nothing.", ""]
    lines += ["| reason | count |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in sorted(reasons.items())]
    lines += ["", "| source | split | file | line | reason | detail |", "|---|---|---|---|---|---|"]
    for r in records:
        detail = md_cell(r.detail)
        lines.append(
            f"| {r.source} | {r.split} | `{r.file}` | {r.line or ''} | {r.reason} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def build_curated_dataset(
    sources: list[SourceSpec],
    out_dir: Path,
    taxonomy: Taxonomy,
    replay_fraction: float,
    extra_frames: Iterable[LabelledFrame] = (),
    progress: bool = True,
    max_frames_per_split: int | None = None,
    exclude_images: Iterable[Path] = (),
) -> CuratedDataset:
    """Validate sources (+ reviewed ``extra_frames``) and write one curated YOLO dataset.

    Only *seed* frames of the source folders enter: train frames that
    ``roadloop.data.splits.is_replay_frame`` reserves for camera replay are skipped (val/test are
    never skipped). ``extra_frames`` are not replay-filtered: they are how replayed frames
    come back once annotated. The dataset is built in a temp folder beside ``out_dir`` and
    renamed into place; on any error ``out_dir`` is left as it was.
    ``max_frames_per_split`` caps each source's seed frames per split (the first N by file
    name, after the replay filter) for quick demos and tests; extra frames are never capped.
    ``exclude_images`` are source images kept out of this version (their labels are under
    re-review after a label-quality flag, or a reviewed copy among ``extra_frames`` replaces
    them); they are counted in ``held_out``. Extra frames are never excluded.
    """
    out_dir = Path(out_dir).absolute()
    candidates: list[LabelledFrame] = []
    skipped_replay = 0
    excluded = {Path(p).absolute() for p in exclude_images}
    held_out = 0
    orphans: list[QuarantineRecord] = []
    for spec in sources:
        if spec.name not in taxonomy.sources:
            raise InvalidInputError(
                spec.data_yaml,
                f"source '{spec.name}' has no class map in the taxonomy "
                f"(known: {sorted(taxonomy.sources)})",
            )
        orphans.extend(spec.orphan_labels())
        taken: Counter = Counter()
        for fr in spec.frames():
            if Path(fr.image).absolute() in excluded:
                held_out += 1
                continue
            if is_replay_frame(fr.source, fr.split, Path(fr.image).stem, replay_fraction):
                skipped_replay += 1
            elif max_frames_per_split is None or taken[fr.split] < max_frames_per_split:
                taken[fr.split] += 1
                candidates.append(fr)
    extra = list(extra_frames)
    for fr in extra:
        if fr.split not in SPLITS:
            raise InvalidInputError(fr.image, f"split '{fr.split}' is not one of {SPLITS}")
    candidates.extend(extra)
    logger.info(
        "curating %d frames (%d from sources, %d extra; %d train frames held out for replay)",
        len(candidates),
        len(candidates) - len(extra),
        len(extra),
        skipped_replay,
    )

    if orphans:
        logger.warning(
            "%d label file(s) match no image (quarantined), e.g. %s",
            len(orphans),
            [r.file for r in orphans[:ORPHAN_EXAMPLES]],
        )
    quarantine: list[QuarantineRecord] = list(orphans)
    checked: list[CheckedFrame] = []
    for i, fr in enumerate(tqdm(candidates, desc="validating frames", disable=not progress)):
        ok, bad = check_frame(fr, taxonomy, i)  # a frame with a rejected row comes back None
        quarantine.extend(bad)
        if ok is not None:
            checked.append(ok)

    # Leakage: one copy per image content, in the highest-priority split.
    by_sha: dict[str, list[CheckedFrame]] = defaultdict(list)
    for cf in checked:
        by_sha[cf.sha256].append(cf)
    kept: list[CheckedFrame] = []
    for copies in by_sha.values():
        copies.sort(key=lambda c: (SPLIT_PRIORITY.index(c.frame.split), c.order))
        winner = copies[0]
        kept.append(winner)
        for c in copies[1:]:
            reason = R_DUP_ACROSS if c.frame.split != winner.frame.split else R_DUP_WITHIN
            quarantine.append(
                QuarantineRecord(
                    file=str(c.frame.image),
                    reason=reason,
                    detail=f"same sha256 as {winner.frame.image} (kept in {winner.frame.split})",
                    source=c.frame.source,
                    split=c.frame.split,
                )
            )
    kept.sort(key=lambda c: c.order)

    split_counts = {s: sum(1 for c in kept if c.frame.split == s) for s in SPLITS}
    reasons = Counter(r.reason for r in quarantine)
    empty = [s for s in ("train", "val") if split_counts[s] == 0]
    if empty:
        found = Counter(f.split for f in candidates)
        raise EmptyDatasetError(
            f"no valid frames in {' and '.join(empty)}: candidates per split "
            f"{dict(found)}, kept {split_counts}, {len(quarantine)} quarantined "
            f"({dict(reasons)}), {skipped_replay} train frames held out for replay; "
            f"sources {[str(s.root) for s in sources]}, {len(extra)} extra frames"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:12]}"
    try:
        result = _write_dataset(
            tmp, kept, quarantine, reasons, taxonomy, skipped_replay, held_out,
            frames_quarantined=len(candidates) - len(kept), orphans=orphans,
        )
        swap_dir_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = out_dir
    logger.info(
        "curated dataset at %s: %s images, %d quarantined", out_dir, split_counts, len(quarantine)
    )
    return result


def _write_dataset(
    root: Path,
    kept: list[CheckedFrame],
    quarantine: list[QuarantineRecord],
    reasons: Counter,
    taxonomy: Taxonomy,
    skipped_replay: int,
    held_out: int = 0,
    *,
    frames_quarantined: int = 0,
    orphans: Sequence[QuarantineRecord] = (),
) -> CuratedDataset:
    for s in SPLITS:
        (root / "images" / s).mkdir(parents=True, exist_ok=True)
        (root / "labels" / s).mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    manifest: list[dict] = []
    class_counts = {s: {c: 0 for c in taxonomy.classes} for s in SPLITS}
    source_counts: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
    for cf in kept:
        fr = cf.frame
        stem = f"{safe_stem(fr.source)}__{safe_stem(Path(fr.image).stem)}"
        if f"{fr.split}/{stem}" in used:  # two extra frames with one name: keep both
            stem = f"{stem}__{cf.sha256[:8]}"
        used.add(f"{fr.split}/{stem}")
        suffix = Path(fr.image).suffix.lower()
        img_rel = f"images/{fr.split}/{stem}{suffix}"
        lbl_rel = f"labels/{fr.split}/{stem}.txt"
        data = Path(fr.image).read_bytes()  # re-read: the build never holds all images
        if hashlib.sha256(data).hexdigest() != cf.sha256:
            raise InvalidInputError(fr.image, "image changed while the dataset was being built")
        (root / img_rel).write_bytes(data)
        (root / lbl_rel).write_text(
            "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in cf.rows),
            encoding="utf-8",
        )
        for c, *_ in cf.rows:
            class_counts[fr.split][taxonomy.classes[c]] += 1
        source_counts[fr.source][fr.split] += 1
        manifest.append(
            {
                "file": img_rel,
                "label": lbl_rel,
                "source": fr.source,
                "split": fr.split,
                "original": str(fr.image),
                "original_label": str(fr.label) if fr.label is not None else None,
                "sha256": cf.sha256,
                "n_boxes": len(cf.rows),
                # Always 0 now (a frame with a rejected row is not kept); the key stays so
                # manifests of older versions and this one read alike.
                "n_rows_quarantined": len(cf.quarantine),
            }
        )
    split_counts = {s: sum(1 for m in manifest if m["split"] == s) for s in SPLITS}
    (root / "data.yaml").write_text(
        "# roadloop curated dataset; paths are relative to this file's folder.\n"
        + yaml.safe_dump(
            dataset_yaml_doc(taxonomy.classes, split_counts["test"] > 0, None), sort_keys=False
        ),
        encoding="utf-8",
    )
    (root / "manifest.jsonl").write_text(
        "".join(json.dumps(m, sort_keys=True) + "\n" for m in manifest), encoding="utf-8"
    )
    (root / "quarantine.jsonl").write_text(
        "".join(r.model_dump_json() + "\n" for r in quarantine), encoding="utf-8"
    )
    (root / "quarantine.md").write_text(_quarantine_md(quarantine, reasons), encoding="utf-8")
    result = CuratedDataset(
        path=root,
        class_names=list(taxonomy.classes),
        split_counts=split_counts,
        class_counts=class_counts,
        source_counts=dict(source_counts),
        quarantined=len(quarantine),
        quarantine_reasons=dict(sorted(reasons.items())),
        skipped_replay=skipped_replay,
        held_out=held_out,
        frames_quarantined=frames_quarantined,
        orphan_labels=len(orphans),
        orphan_label_examples=[r.file for r in orphans[:ORPHAN_EXAMPLES]],
    )
    (root / "summary.json").write_text(
        result.model_dump_json(exclude={"path"}, indent=2) + "\n", encoding="utf-8"
    )
    return result


# --------------------------------------------------------------------------- synthetic

# Per class: (colour BGR, width range, aspect h/w range) in units of the image size.
_SYNTH_LOOK: dict[str, tuple[tuple[int, int, int], tuple[float, float], tuple[float, float]]] = {
    "car": ((40, 40, 200), (0.10, 0.18), (0.5, 0.8)),
    "truck": ((40, 160, 40), (0.20, 0.30), (0.6, 0.9)),
    "bus": ((0, 200, 230), (0.25, 0.35), (0.45, 0.6)),
    "two_wheeler": ((200, 60, 60), (0.04, 0.07), (1.2, 1.8)),
    "person": ((200, 0, 200), (0.03, 0.05), (2.0, 3.0)),
}


def _synthetic_frame(
    rng: np.random.Generator, imgsz: int, names: list[str]
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    img = np.full((imgsz, imgsz, 3), 90, np.uint8)
    img[: imgsz // 4] = (160, 130, 110)  # sky-ish band above the road
    for x in range(imgsz // 3, imgsz, imgsz // 3):  # lane markings
        img[imgsz // 4 :: 12, max(0, x - 1) : x + 1] = 230
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    rows = []
    for _ in range(int(rng.integers(1, 6))):
        cid = int(rng.integers(0, len(names)))
        colour, (wmin, wmax), (amin, amax) = _SYNTH_LOOK.get(
            names[cid], ((127, 127, 127), (0.08, 0.15), (0.6, 1.0))
        )
        w = rng.uniform(wmin, wmax)
        h = min(0.7, w * rng.uniform(amin, amax))
        cx = rng.uniform(w / 2, 1 - w / 2)
        cy = rng.uniform(max(0.25 + h / 2, h / 2), 1 - h / 2)
        x0, y0 = int((cx - w / 2) * imgsz), int((cy - h / 2) * imgsz)
        x1, y1 = int((cx + w / 2) * imgsz), int((cy + h / 2) * imgsz)
        jitter = rng.integers(-25, 26, 3)
        col = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
        cv2.rectangle(img, (x0, y0), (x1, y1), col, thickness=-1)
        cv2.rectangle(img, (x0, y0), (x1, y1), (20, 20, 20), thickness=1)
        rows.append((cid, cx, cy, w, h))
    return img, rows


def make_synthetic_dataset(
    out_dir: Path,
    n_train: int = 24,
    n_val: int = 8,
    n_test: int = 8,
    imgsz: int = 160,
    seed: int = 0,
) -> SourceSpec:
    """Generate a small SYNTHETIC labelled source (grey road, coloured boxes as vehicles).

    For the demo and tests where ``../shared`` is absent. Class names are the taxonomy's
    ``synthetic`` source names; ``data.yaml`` says ``synthetic: true``. Not real data.
    """
    out_dir = Path(out_dir).absolute()
    tax = load_taxonomy()
    names = list(tax.sources.get("synthetic") or tax.classes)
    rng = np.random.default_rng(seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:12]}"
    try:
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i in range(n):
                img, rows = _synthetic_frame(rng, imgsz, names)
                stem = f"synth_{split}_{i:04d}"
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if not ok:
                    raise RuntimeError("OpenCV failed to encode a synthetic frame")
                (tmp / "images" / split / f"{stem}.jpg").write_bytes(buf.tobytes())
                (tmp / "labels" / split / f"{stem}.txt").write_text(
                    "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows),
                    encoding="utf-8",
                )
        doc = {
            "synthetic": True,
            "train": "images/train",
            "val": "images/val",
            "test": "images/test",
            "names": dict(enumerate(names)),
        }
        (tmp / "data.yaml").write_text(
            "# SYNTHETIC data generated by roadloop.data.datasets.make_synthetic_dataset "
            f"(seed={seed}).\n# NOT real traffic footage: coloured rectangles on a grey road.\n"
            + yaml.safe_dump(doc, sort_keys=False),
            encoding="utf-8",
        )
        swap_dir_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote SYNTHETIC dataset (%d/%d/%d) at %s", n_train, n_val, n_test, out_dir)
    return SourceSpec(name="synthetic", root=out_dir)


__all__ = [
    "SPLITS",
    "CheckedFrame",
    "CuratedDataset",
    "LabelledFrame",
    "QuarantineRecord",
    "SourceSpec",
    "Taxonomy",
    "build_curated_dataset",
    "check_frame",
    "dataset_yaml_doc",
    "default_sources",
    "load_taxonomy",
    "make_synthetic_dataset",
    "safe_stem",
    "write_data_yaml",
]
