"""Does cleanlab find bad labels? Inject known label noise into real data and measure.

* **Data** — copies of curated (taxonomy) sets: ``atl_v2`` val+test and ``manaus_v4``
  train+val+test (``build_curated_dataset``, ``replay_fraction=0``).
* **Predictions (out-of-sample by construction)** — the shared ``atl_v2_yolo11n_gpu.pt``
  (``--model``; ``atl_v2_yolo11n_480.pt`` gave ``results/label_qa_480ckpt.md``), class head
  re-mapped onto the taxonomy. It was trained on ``atl_v2`` *train* only, so it
  never saw an ``atl_v2`` val/test frame nor any ``manaus_v4`` frame (a domain shift: its
  predictions there are weak, which this benchmark shows). No K-fold training is needed;
  ``roadloop.labeling.label_quality.out_of_sample_predictions`` is the path for sets a model did
  train on. Predictions at ``conf=0.01`` (cleanlab wants the low-confidence boxes), square
  letterbox at the model's own 480 px.
* **Noise** — 10 % of the label boxes, each given one noise type at random: *wrong class*
  (another taxonomy class), *dropped box*, *shifted box* (moved by 0.6–1.0 of its size, so
  IoU with the true box falls below ~0.25). Three noise seeds.
* **Scored** — cleanlab flags (``roadloop.labeling.label_quality.find_label_issues``):
  image level — recall of flagged images per noise type, precision of the flags (flagged
  images that carry injected noise), AUROC of the per-image quality score, and how many
  images cleanlab flags on the *clean* copy (original labels, which have errors of their
  own, plus model mistakes); box level — recall per noise type (a noisy box flagged by any
  issue type, and by the matching type: wrong class → ``swap``, dropped → ``overlooked``,
  shifted → ``badloc``) and precision per cleanlab issue type.
* **Two threshold policies** — cleanlab's defaults, and thresholds calibrated by measurement
  (``roadloop.labeling.label_qa_calibration``) on ONE set (``--calibrate-on``, default
  ``atl_v2`` val+test, original labels) by rules fixed in advance: (1) confident predictions
  for ``overlooked`` / ``swap`` start at the confidence whose precision against the labels
  reaches ``--target-precision`` (0.95, what cleanlab's 0.95 means for calibrated
  probabilities); (2) images are flagged when their label quality score is below a
  threshold (instead of by cleanlab's per-box checks) chosen so that
  ``--false-alarm-budget`` (10 %) of the calibration set's images are flagged. The other
  set is the held-out report. The measured values are the platform's defaults
  (``ROADLOOP_LABEL_QA_HIGH_PROBABILITY``, ``ROADLOOP_LABEL_QA_MAX_QUALITY``).

Writes ``benchmarks/results/label_qa.{json,md}``.

    .venv/bin/python -m benchmarks.label_qa [--model PT] [--noise 0.1] [--seeds 0 1 2]
        [--imgsz 480] [--calibrate-on atl_v2] [--target-precision 0.95]
        [--false-alarm-budget 0.1] [--name label_qa]
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import statistics
import time
from pathlib import Path

import numpy as np

from roadloop.fsutil import write_text_atomic
from roadloop.models.training import configure_ultralytics
from roadloop.settings import PROJECT_ROOT, get_settings

logger = logging.getLogger("label_qa")
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
NOISE_TYPES = ("wrong_class", "dropped_box", "shifted_box")
DEFAULT_MODEL = "atl_v2_yolo11n_gpu.pt"
SETS = {
    "atl_v2": ("atl_v2 val+test", ("val", "test")),
    "manaus_v4": ("manaus_v4 all splits", ("train", "val", "test")),
}
MATCHING_ISSUE = {"wrong_class": "swap", "dropped_box": "overlooked", "shifted_box": "badloc"}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def inject_noise(labels: list[dict], rate: float, classes: list[int], seed: int):
    """Noisy copy of ``labels`` and the ground truth of what was changed, per image."""
    rng = np.random.default_rng(seed)
    all_boxes = [(i, j) for i, lab in enumerate(labels) for j in range(len(lab["labels"]))]
    n_noisy = round(rate * len(all_boxes))
    chosen = [all_boxes[k] for k in rng.choice(len(all_boxes), n_noisy, replace=False)]
    kinds = {ij: NOISE_TYPES[int(rng.integers(3))] for ij in chosen}
    noisy, truth = [], []
    for i, lab in enumerate(labels):
        boxes, cls = lab["bboxes"].copy(), lab["labels"].copy()
        keep = np.ones(len(cls), bool)
        rec: list[dict] = []
        for j in range(len(cls)):
            kind = kinds.get((i, j))
            if kind == "wrong_class":
                cls[j] = int(rng.choice([c for c in classes if c != cls[j]]))
            elif kind == "dropped_box":
                keep[j] = False
            elif kind == "shifted_box":
                w, h = boxes[j, 2] - boxes[j, 0], boxes[j, 3] - boxes[j, 1]
                ang = rng.uniform(0, 2 * np.pi)
                mag = rng.uniform(0.6, 1.0)
                dx, dy = mag * w * np.cos(ang), mag * h * np.sin(ang)
                boxes[j] += np.array([dx, dy, dx, dy])
            if kind:
                rec.append({"type": kind, "orig_box": lab["bboxes"][j].tolist(), "orig_index": j})
        new_index = np.cumsum(keep) - 1
        for r in rec:
            r["index"] = int(new_index[r["orig_index"]]) if keep[r["orig_index"]] else None
        noisy.append({"bboxes": boxes[keep], "labels": cls[keep], "image_name": lab["image_name"]})
        truth.append(rec)
    return noisy, truth


def score(report, truth: list[list[dict]], clean_flagged: set[str], flag=None) -> dict:
    from sklearn.metrics import roc_auc_score

    imgs = report.images
    noisy_img = [bool(t) for t in truth]
    flag = flag or (lambda im: im.flagged)
    flagged = [bool(flag(im)) for im in imgs]
    out: dict = {
        "n_images": len(imgs),
        "n_noisy_images": int(sum(noisy_img)),
        "n_flagged": int(sum(flagged)),
        "n_injected": {t: sum(r["type"] == t for rec in truth for r in rec) for t in NOISE_TYPES},
    }
    tp = sum(f and n for f, n in zip(flagged, noisy_img))
    out["image_precision"] = tp / max(1, sum(flagged))
    out["image_recall"] = tp / max(1, sum(noisy_img))
    newly = [f and im.image not in clean_flagged for f, im in zip(flagged, imgs)]
    out["image_precision_new_flags"] = sum(n and x for n, x in zip(newly, noisy_img)) / max(
        1, sum(newly)
    )
    y = np.array(noisy_img, int)
    out["image_auroc_quality"] = (
        float(roc_auc_score(y, [-im.quality_score for im in imgs]))
        if 0 < y.sum() < len(y)
        else None
    )
    per_type: dict = {}
    for t in NOISE_TYPES:
        with_t = [i for i, rec in enumerate(truth) if any(r["type"] == t for r in rec)]
        box_any = box_typed = n_boxes = 0
        for i in range(len(truth)):
            for r in truth[i]:
                if r["type"] != t:
                    continue
                n_boxes += 1
                issues = imgs[i].issues
                if t == "dropped_box":
                    hit = [
                        x
                        for x in issues
                        if x.type == "overlooked"
                        and _iou(np.array(x.xyxy), np.array(r["orig_box"])) >= 0.5
                    ]
                    any_hit = bool(hit)
                    typed = bool(hit)
                else:
                    on_box = [x for x in issues if x.type != "overlooked" and x.box == r["index"]]
                    any_hit = bool(on_box)
                    typed = any(x.type == MATCHING_ISSUE[t] for x in on_box)
                box_any += any_hit
                box_typed += typed
        per_type[t] = {
            "images": len(with_t),
            "image_recall": sum(flagged[i] for i in with_t) / max(1, len(with_t)),
            "boxes": n_boxes,
            "box_recall_any_type": box_any / max(1, n_boxes),
            "box_recall_matching_type": box_typed / max(1, n_boxes),
        }
    out["per_noise_type"] = per_type
    # Box precision per cleanlab issue type: the flagged box is an injected noisy box.
    prec: dict = {}
    for ctype in ("swap", "badloc", "overlooked"):
        flagged_boxes = hits = 0
        for i, im in enumerate(imgs):
            for x in im.issues:
                if x.type != ctype:
                    continue
                flagged_boxes += 1
                if ctype == "overlooked":
                    hits += any(
                        r["type"] == "dropped_box"
                        and _iou(np.array(x.xyxy), np.array(r["orig_box"])) >= 0.5
                        for r in truth[i]
                    )
                else:
                    hits += any(r["index"] == x.box for r in truth[i] if r["index"] is not None)
        prec[ctype] = {
            "flagged_boxes": flagged_boxes,
            "precision": hits / flagged_boxes if flagged_boxes else None,
        }
    out["per_issue_type_box_precision"] = prec
    return out


def _cached_predictions(path: Path, compute):
    """Predictions are the slow part (CPU inference); keep them per model, size and set."""
    if path.is_file():
        with path.open("rb") as fh:
            return pickle.load(fh)
    preds = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(preds, fh)
    return preds


_REPORTS: dict = {}


def _cached_report(labels, preds, names, hp):
    """Policies that differ only in the image flag share cleanlab's (slow) per-box work."""
    from roadloop.labeling.label_quality import find_label_issues

    key = (id(preds), _labels_key(labels), hp)
    if key not in _REPORTS:
        _REPORTS[key] = find_label_issues(labels, preds, names, high_probability_threshold=hp)
    return _REPORTS[key]


def _labels_key(labels) -> int:
    return hash(b"".join(lab["bboxes"].tobytes() + lab["labels"].tobytes() for lab in labels))


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else None


def _evaluate(labels, preds, names, present, seeds, noise, hp, max_quality) -> dict:
    """cleanlab on the clean copy and on each noisy copy, under one threshold policy: ``hp``
    for confident predictions (None: cleanlab's 0.95), images flagged by the per-box checks
    (``max_quality`` None) or when their quality score is below ``max_quality`` — what
    ``find_label_issues(..., max_quality=...)`` does; the reports are shared between
    policies with the same ``hp``."""

    def flag(im) -> bool:
        return im.flagged if max_quality is None else im.quality_score < max_quality

    clean = _cached_report(labels, preds, names, hp)
    clean_flagged = {im.image for im in clean.images if flag(im)}
    runs = []
    for seed in seeds:
        noisy, truth = inject_noise(labels, noise, present, seed)
        report = _cached_report(noisy, preds, names, hp)
        runs.append({"seed": seed, **score(report, truth, clean_flagged, flag)})
    agg = {
        k: _mean([r[k] for r in runs])
        for k in (
            "image_precision",
            "image_precision_new_flags",
            "image_recall",
            "image_auroc_quality",
        )
    }
    agg["base_rate"] = _mean([r["n_noisy_images"] / r["n_images"] for r in runs])
    agg["flag_rate"] = _mean([r["n_flagged"] / r["n_images"] for r in runs])
    agg["per_noise_type"] = {
        t: {
            k: _mean([r["per_noise_type"][t][k] for r in runs])
            for k in runs[0]["per_noise_type"][t]
        }
        for t in NOISE_TYPES
    }
    agg["per_issue_type_box_precision"] = {
        c: _mean([r["per_issue_type_box_precision"][c]["precision"] for r in runs])
        for c in ("swap", "badloc", "overlooked")
    }
    agg["flagged_boxes_per_issue_type"] = {
        c: _mean([r["per_issue_type_box_precision"][c]["flagged_boxes"] for r in runs])
        for c in ("swap", "badloc", "overlooked")
    }
    return {
        "high_probability_threshold": hp,
        "max_quality": max_quality,
        "clean_copy_flagged": len(clean_flagged),
        "clean_copy_flag_rate": len(clean_flagged) / max(1, len(clean.images)),
        "clean_copy_issue_counts": clean.issue_counts,
        "mean_over_seeds": agg,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        type=Path,
        default=get_settings().models_dir / DEFAULT_MODEL,
        help=f"Ultralytics checkpoint (default {DEFAULT_MODEL}; the older "
        "atl_v2_yolo11n_480.pt reproduces label_qa_480ckpt.md)",
    )
    ap.add_argument("--imgsz", type=int, default=480)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--noise", type=float, default=0.10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--calibrate-on",
        choices=list(SETS),
        default="atl_v2",
        help="set the thresholds are measured on (the other set is the held-out report)",
    )
    ap.add_argument(
        "--target-precision",
        type=float,
        default=0.95,
        help="confident predictions: the confidence whose precision reaches this",
    )
    ap.add_argument(
        "--false-alarm-budget",
        type=float,
        default=0.10,
        help="share of the calibration set's images (original labels) that may be flagged",
    )
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="label_qa", help="results file stem")
    ap.add_argument("--work", type=Path, default=RESULTS / "work" / "label_qa")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work = args.work.absolute()
    configure_ultralytics(args.work / "ultralytics")
    from roadloop.data.datasets import SourceSpec, build_curated_dataset, load_taxonomy
    from roadloop.labeling.label_qa_calibration import (
        confidence_at_precision,
        quality_threshold_for_budget,
    )
    from roadloop.labeling.label_quality import (
        dataset_split_frames,
        predict_for_cleanlab,
        read_yolo_label,
    )
    from roadloop.models.training import (
        _checkpoint_names,
        adapt_checkpoint_to_taxonomy,
        load_source_class_map,
    )

    t0 = time.perf_counter()
    tax = load_taxonomy()
    names = list(tax.classes)
    adapted = args.work / f"{args.model.stem}_taxonomy.pt"
    if not adapted.is_file():
        adapt_checkpoint_to_taxonomy(
            args.model,
            names,
            load_source_class_map(_checkpoint_names(args.model) or [], names),
            adapted,
        )
    data: dict = {}
    for source, (set_name, splits) in SETS.items():
        if source not in args.sets and source != args.calibrate_on:
            continue
        curated = args.work / f"{source}_taxonomy"
        if not (curated / "summary.json").is_file():
            build_curated_dataset(
                [SourceSpec(name=source, root=get_settings().datasets_dir / source)],
                curated,
                tax,
                replay_fraction=0.0,
                progress=False,
            )
        frames = [f for s in splits for f in dataset_split_frames(curated, s)]
        labels = [read_yolo_label(img, lbl, len(names)) for img, lbl in frames]
        logger.info(
            "%s: %d frames, %d boxes; predicting",
            set_name,
            len(frames),
            sum(len(lab["labels"]) for lab in labels),
        )
        preds = _cached_predictions(
            args.work / f"preds_{args.model.stem}_{args.imgsz}_{source}.pkl",
            lambda frames=frames: predict_for_cleanlab(
                adapted, [f[0] for f in frames], len(names), imgsz=args.imgsz, device=args.device
            ),
        )
        data[source] = (labels, preds)

    # Calibration, on one set only, by the rules stated in the module docstring.
    cal_labels, cal_preds = data[args.calibrate_on]
    max_conf = max(float(a[:, 4].max()) for p in cal_preds for a in p if len(a))
    hp = confidence_at_precision(cal_labels, cal_preds, target_precision=args.target_precision)
    cal_clean = _cached_report(cal_labels, cal_preds, names, hp)
    mq = quality_threshold_for_budget(
        [im.quality_score for im in cal_clean.images], args.false_alarm_budget
    )
    calibration = {
        "calibrated_on": SETS[args.calibrate_on][0],
        "max_confidence": max_conf,
        "target_precision": args.target_precision,
        "high_probability_threshold": hp,
        "false_alarm_budget": args.false_alarm_budget,
        "images_flagged_by_box_checks": sum(im.flagged for im in cal_clean.images),
        "calibration_images": len(cal_clean.images),
        "max_quality": mq,
    }
    logger.info("calibration: %s", calibration)
    policies = {  # name: (confident-prediction threshold, image flag threshold)
        "cleanlab defaults": (None, None),
        "calibrated confidence, per-box flags": (hp, None),
        "calibrated (platform default)": (hp, mq),
    }
    results: dict = {}
    for source, (set_name, _) in SETS.items():
        if source not in args.sets:
            continue
        labels, preds = data[source]
        present = sorted({int(c) for lab in labels for c in lab["labels"]})
        results[set_name] = {
            "frames": len(labels),
            "boxes": sum(len(lab["labels"]) for lab in labels),
            "role": "calibration" if source == args.calibrate_on else "held out",
            "policies": {
                pname: _evaluate(labels, preds, names, present, args.seeds, args.noise, *policy)
                for pname, policy in policies.items()
            },
        }
    out = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "predictions": f"shared {args.model.name} re-headed to the taxonomy; out-of-sample "
        "by construction (trained on atl_v2 train only)",
        "calibration": calibration,
        "wall_seconds": time.perf_counter() - t0,
        "sets": results,
    }
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(out, indent=2), parents=True)
    write_text_atomic(args.out / f"{args.name}.md", markdown(out), parents=True)
    logger.info("done in %.0f s", out["wall_seconds"])
    return 0


def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _reading(out: dict) -> list[str]:
    """What the tables say, computed from them (no hand-written figures)."""
    cal = out["calibration"]
    lines = ["## Reading", ""]
    lines.append(
        f"- cleanlab's `overlooked` and `swap` checks only consider predicted boxes above 0.95; "
        f"this model's highest confidence on {cal['calibrated_on']} is "
        f"{cal['max_confidence']:.3f}, so with the defaults only `badloc` can fire."
    )
    for name, r in out["sets"].items():
        pols = r["policies"]
        d = pols["cleanlab defaults"]
        cb = pols["calibrated confidence, per-box flags"]
        c = pols["calibrated (platform default)"]
        dm, cm = d["mean_over_seeds"], c["mean_over_seeds"]
        nb = cb["mean_over_seeds"]["flagged_boxes_per_issue_type"]
        lines.append(
            f"- {name} ({r['role']}): at the calibrated confidence the per-box checks flag "
            f"{nb['overlooked']:.1f} `overlooked` and {nb['swap']:.1f} `swap` boxes per noisy "
            f"copy; AUROC of the image score {_f(dm['image_auroc_quality'])} with cleanlab's "
            f"defaults, {_f(cm['image_auroc_quality'])} calibrated. The score flag marks "
            f"{c['clean_copy_flag_rate']:.0%} of the clean copy (budget "
            f"{cal['false_alarm_budget']:.0%}, set on {cal['calibrated_on']}) and, after "
            f"injection, finds {_f(cm['image_recall'])} of the noisy images at precision "
            f"{_f(cm['image_precision'])} against a base rate of {_f(cm['base_rate'])} "
            f"(cleanlab defaults: recall {_f(dm['image_recall'])}, precision "
            f"{_f(dm['image_precision'])}, {d['clean_copy_flag_rate']:.0%} of the clean copy "
            "flagged)."
        )
    lines.append("")
    return lines


def markdown(out: dict) -> str:
    c = out["config"]
    cal = out["calibration"]
    lines = [
        "# Label QA: cleanlab on injected label noise",
        "",
        (
            f"{c['noise']:.0%} of label boxes corrupted (wrong class / dropped / shifted, "
            f"chosen uniformly), seeds {c['seeds']}. Predictions: {out['predictions']}, "
            f"conf ≥ 0.01, imgsz {c['imgsz']}. Means over seeds."
        ),
        "",
        "## Calibration (rules fixed before measuring; measured on one set only)",
        "",
        (
            f"Measured on **{cal['calibrated_on']}** with its original labels; the other set is "
            "reported with the thresholds fixed."
        ),
        "",
        (
            "1. *Confident predictions* (cleanlab's `HIGH_PROBABILITY_THRESHOLD`, 0.95, gates the "
            "`overlooked` and `swap` checks): the lowest confidence at which the predictions at or "
            f"above it match a labelled box of their class (IoU ≥ 0.5) with precision ≥ "
            f"{cal['target_precision']:.2f}, i.e. what 0.95 means for a calibrated model. Highest "
            f"confidence on the set: {cal['max_confidence']:.3f}; measured threshold "
            f"**{cal['high_probability_threshold']:.3f}** (`ROADLOOP_LABEL_QA_HIGH_PROBABILITY`)."
        ),
        (
            "2. *Image flag*: an image is flagged when its label quality score (cleanlab's "
            "per-image score with the threshold of 1.) is below a threshold that flags "
            f"{cal['false_alarm_budget']:.0%} of the calibration set's images with their "
            "original labels (a false-alarm budget), in place of cleanlab's per-box checks: "
            f"**{cal['max_quality']:.3f}** (`ROADLOOP_LABEL_QA_MAX_QUALITY`, with "
            "`ROADLOOP_LABEL_QA_FLAG_BY=score`). The per-box checks at the calibrated "
            f"confidence alone flag {cal['images_flagged_by_box_checks']} of "
            f"{cal['calibration_images']} of those images, over the budget before any noise."
        ),
        "",
        (
            "Box-level columns count the per-box issues cleanlab reports at the policy's "
            "confidence threshold; under the score flag they are the reasons shown with a "
            "flagged image, not what flags it."
        ),
        "",
    ]
    for name, r in out["sets"].items():
        pols = r["policies"]
        pnames = list(pols)
        lines += [
            f"## {name} ({r['role']}): {r['frames']} frames, {r['boxes']} boxes",
            "",
            "| image level | " + " | ".join(pnames) + " |",
            "|---|" + "---|" * len(pnames),
        ]
        rows = [
            ("images flagged on the clean copy (original labels)", None),
            ("base rate (share of images carrying injected noise)", "base_rate"),
            ("share of images flagged after injection", "flag_rate"),
            ("precision (flagged images with injected noise)", "image_precision"),
            ("precision, flags not already raised on the clean copy", "image_precision_new_flags"),
            ("recall (noisy images flagged)", "image_recall"),
            ("AUROC of quality score, noisy vs clean images", "image_auroc_quality"),
        ]
        for label, key in rows:
            if key is None:
                vals = [
                    f"{p['clean_copy_flagged']} ({p['clean_copy_flag_rate']:.0%})"
                    for p in pols.values()
                ]
            else:
                vals = [_f(p["mean_over_seeds"][key]) for p in pols.values()]
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        for pname, p in pols.items():
            m = p["mean_over_seeds"]
            lines += [
                "",
                f"{pname}, per noise type:",
                "",
                (
                    "| noise type | images | image recall | boxes | box recall (any issue) | "
                    "box recall (matching issue) |"
                ),
                "|---|---|---|---|---|---|",
            ]
            for t, v in m["per_noise_type"].items():
                lines.append(
                    f"| {t} | {v['images']:.1f} | {_f(v['image_recall'])} | {v['boxes']:.1f} | "
                    f"{_f(v['box_recall_any_type'])} | {_f(v['box_recall_matching_type'])} |"
                )
            lines += [
                "",
                "| cleanlab issue type | flagged boxes | box precision |",
                "|---|---|---|",
            ]
            for ct, v in m["per_issue_type_box_precision"].items():
                nb = m["flagged_boxes_per_issue_type"][ct]
                lines.append(f"| {ct} | {nb:.1f} | {_f(v)} |")
        lines.append("")
    lines += _reading(out)
    lines += [
        (
            f"Wall time {out['wall_seconds']:.0f} s (2 shared CPU cores; predictions cached "
            "under the work folder after the first run)."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
