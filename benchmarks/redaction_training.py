"""What edge redaction does to the learning loop: a model fine-tuned on redacted frames
against one fine-tuned on the same frames unredacted, both evaluated on the same
**unredacted** val split (docs/privacy.md).

manaus_v4 in the taxonomy (``car, truck, bus, two_wheeler, person``), the shared 320
checkpoint re-headed for it (as ``benchmarks.label_efficiency`` does), then two runs with the
same seed and settings:

* ``unredacted``: the curated train split as is;
* ``redacted``: every train frame passed through ``edge_agent.redaction.Redactor`` (blur) the
  way an agent serving a taxonomy model would: its ``person``/``two_wheeler`` boxes (here the
  labelled ones: a stand-in for a serving model with full recall, so this is the upper bound
  of what redaction removes) plus CenterFace faces. Labels are unchanged: a labeller draws the
  blurred person's box.

Usage: ``python -m benchmarks.redaction_training [--epochs 4] [--imgsz 320] [--work DIR]``.
Writes ``redaction_training.json`` and ``redaction_training.md`` under ``--out``. Resumable:
a finished run's metrics are kept in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import cv2

from roadloop.fsutil import write_text_atomic
from roadloop.settings import PROJECT_ROOT, get_settings

logger = logging.getLogger("benchmarks.redaction_training")
REDACTED_CLASSES = ("person", "two_wheeler")


def _yolo_boxes(label: Path, names: list[str], w: int, h: int) -> list[SimpleNamespace]:
    out = []
    for line in label.read_text().splitlines() if label.is_file() else []:
        p = line.split()
        if len(p) < 5:
            continue
        c, cx, cy, bw, bh = int(p[0]), *map(float, p[1:5])
        out.append(SimpleNamespace(class_name=names[c], xyxy=(
            (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)))
    return out


def redact_dataset(curated: Path, out: Path, names: list[str]) -> dict:
    """A copy of ``curated`` whose train images are redacted; val/test linked unchanged."""
    from edge_agent.redaction import CenterFaceDetector, Redactor

    done = out / "redaction_summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    redactor = Redactor(CenterFaceDetector(), None, person_classes=REDACTED_CLASSES)
    counts: dict[str, int] = {}
    shares, t0 = [], time.perf_counter()
    for split in ("train", "val", "test"):
        src_img, src_lab = curated / "images" / split, curated / "labels" / split
        if not src_img.is_dir():
            continue
        (out / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copytree(src_lab, out / "labels" / split, dirs_exist_ok=True)
        dst = out / "images" / split
        if split != "train":
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src_img.resolve(), target_is_directory=True)
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for img in sorted(src_img.iterdir()):
            image = cv2.imread(str(img))
            if image is None:
                continue
            h, w = image.shape[:2]
            dets = _yolo_boxes(src_lab / (img.stem + ".txt"), names, w, h)
            res = redactor.redact(image, dets, "blur")
            for k, v in res.record["counts"].items():
                counts[k] = counts.get(k, 0) + v
            shares.append(res.record["area_share"])
            cv2.imwrite(str(dst / (img.stem + ".jpg")), res.image,
                        [int(cv2.IMWRITE_JPEG_QUALITY), 90])
    shutil.copyfile(curated / "data.yaml", out / "data.yaml")  # its path: set by _data_yaml
    summary = {"frames": len(shares), "regions": counts, "version": redactor.version,
               "mean_area_share": round(sum(shares) / max(1, len(shares)), 5),
               "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(done, json.dumps(summary, indent=2))
    return summary


def _data_yaml(root: Path) -> Path:
    """A data YAML whose ``path`` is ``root`` (the curated one may hold another path)."""
    import yaml

    spec = yaml.safe_load((root / "data.yaml").read_text())
    spec["path"] = str(root)
    out = root / "data_bench.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def train_eval(name: str, data_root: Path, eval_yaml: Path, start: Path, args) -> dict:
    from roadloop.evaluation.accuracy import evaluate_detector
    from roadloop.models.training import TrainConfig, train_detector

    rdir = args.work / "runs" / name
    done = rdir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    cfg = TrainConfig(model=str(start), fallback_weights=[], imgsz=args.imgsz,
                      epochs=args.epochs, batch=args.batch, device="cpu", workers=0,
                      seed=args.seed, extra={"warmup_epochs": 0, "val": False, "amp": False,
                                             "deterministic": True})
    res = train_detector(cfg, _data_yaml(data_root), rdir)
    t_train = time.perf_counter() - t0
    m = evaluate_detector(res.best_weights, eval_yaml, imgsz=args.imgsz, split="val",
                          device="cpu")
    out = {"run": name, "map50": m.map50, "map50_95": m.map50_95,
           "per_class_ap50": m.per_class_ap50, "per_class_ap50_95": m.per_class_ap50_95,
           "weights": str(res.best_weights), "seconds_train": round(t_train, 1),
           "seconds": round(time.perf_counter() - t0, 1)}
    write_text_atomic(done, json.dumps(out, indent=2))
    return out


def markdown(rec: dict) -> str:
    runs = {r["run"]: r for r in rec["runs"]}
    classes = sorted({c for r in rec["runs"] for c in r["per_class_ap50"]})
    red = rec["redaction"]
    lines = [
        (f"# Training on redacted frames (manaus_v4 → taxonomy, fine-tune {rec['start_model']} "
         f"{rec['epochs']} epochs at {rec['imgsz']}, seed {rec['seed']}, CPU; eval on the "
         "unredacted val split)"), "",
        (f"Redacted train frames: {red['frames']}, regions {red['regions']} (person and "
         f"two_wheeler boxes from the labels, faces from CenterFace), mean area blurred "
         f"{100 * red['mean_area_share']:.2f} % ({red['version']})."),
        "", "| train frames | mAP50 | mAP50-95 | " + " | ".join(f"AP50 {c}" for c in classes)
        + " | train s |", "|---" * (4 + len(classes)) + "|"]
    for name in ("unredacted", "redacted"):
        r = runs.get(name)
        if r is None:
            continue
        lines.append(f"| {name} | {r['map50']:.3f} | {r['map50_95']:.3f} | "
                     + " | ".join(f"{r['per_class_ap50'].get(c, float('nan')):.3f}"
                                  for c in classes) + f" | {r['seconds_train']:.0f} |")
    if "delta_map50" in rec:
        lines += ["", (f"Redacted − unredacted: mAP50 {rec['delta_map50']:+.3f}, mAP50-95 "
                       f"{rec['delta_map50_95']:+.3f} (one run each, same seed).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-model", type=Path,
                    default=get_settings().models_dir / "atl_v2_yolo11n_320.pt")
    ap.add_argument("--work", type=Path,
                    default=Path(os.environ.get("TMPDIR", "/tmp")) / "roadloop_redaction_train")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from benchmarks.label_efficiency import prepare

    args.work.mkdir(parents=True, exist_ok=True)
    curated, adapted, names = prepare(args.work, args.start_model)
    redaction = redact_dataset(curated, args.work / "manaus_redacted", names)
    logger.info("redacted train split: %s", redaction)
    eval_yaml = _data_yaml(curated)
    runs = [train_eval("unredacted", curated, eval_yaml, adapted, args)]
    logger.info("unredacted: %s", runs[-1])
    runs.append(train_eval("redacted", args.work / "manaus_redacted", eval_yaml, adapted, args))
    logger.info("redacted: %s", runs[-1])
    rec = {"start_model": args.start_model.name, "epochs": args.epochs, "imgsz": args.imgsz,
           "batch": args.batch, "seed": args.seed, "redaction": redaction, "runs": runs,
           "delta_map50": round(runs[1]["map50"] - runs[0]["map50"], 4),
           "delta_map50_95": round(runs[1]["map50_95"] - runs[0]["map50_95"], 4),
           "platform": platform.platform(), "cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "redaction_training.json", json.dumps(rec, indent=2))
    write_text_atomic(args.out / "redaction_training.md", markdown(rec))
    print(markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
