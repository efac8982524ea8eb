"""How much accuracy does the platform's INT8 recipe cost, overall and per class?

For each shared fp32 ONNX export (default: the gpu checkpoint at 320 and 480 px) this
quantizes with the platform's recipe (``QuantConfig()``, calibration on atl_v2 *train*), with
the same recipe on two other random 100-frame calibration subsets (how much the INT8 figure
moves with nothing but the calibration frames: the noise a relative gate must tolerate), and
with ONNX Runtime's defaults over the whole graph (the broken quantization the gate must
refuse). Every file is scored by the platform's own evaluator
(``roadloop.evaluation.accuracy.evaluate_detector``: Ultralytics ``val``, per-class AP and
support) on atl_v2 val and test, and judged by the INT8 gate (``check_int8_drop``) with its
defaults.

    .venv/bin/python -m benchmarks.int8_drop [--imgsz 320,480] [--out-dir benchmarks/results]
    .venv/bin/python -m benchmarks.int8_drop --rejudge   # stored metrics, current gate limits

Writes ``int8_drop.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.quantization_sweep import write_data_yaml
from roadloop.evaluation.accuracy import evaluate_detector
from roadloop.evaluation.gates import GateConfig, check_int8_drop, int8_class_drops
from roadloop.evaluation.results import (
    BenchmarkResults,
    DetectionMetrics,
    LatencyConfig,
    MetricsRow,
    ModelSet,
)
from roadloop.fsutil import atomic_path
from roadloop.models.quantize import QuantConfig, list_images, quantize_int8
from roadloop.models.training import configure_ultralytics
from roadloop.settings import PROJECT_ROOT, get_settings

logger = logging.getLogger("int8_drop")
SPLITS = ("val", "test")


def variants(train: list[Path]) -> dict[str, tuple[str, QuantConfig, list[Path]]]:
    """name → (description, config, calibration images)."""
    recipe = QuantConfig()
    n = recipe.num_calibration_frames
    out = {"recipe": ("platform recipe (QuantConfig defaults)", recipe, train)}
    for seed in (1, 2):
        subset = random.Random(seed).sample(train, min(n, len(train)))
        out[f"recipe-cal{seed}"] = (f"recipe, random calibration subset (seed {seed})", recipe, subset)
    naive = QuantConfig(exclude_node_patterns=[], num_calibration_frames=32)
    out["naive"] = ("ORT defaults over the whole graph (broken)", naive, train)
    return out


def _results(ref: DetectionMetrics, int8: DetectionMetrics, split: str, imgsz: int) -> BenchmarkResults:
    rows = [
        MetricsRow(model="candidate", version="x", format=f, test_set=split, metrics=m)
        for f, m in (("onnx_fp32", ref), ("onnx_int8", int8))
    ]
    return BenchmarkResults(
        created_at=datetime.now(UTC).isoformat(), imgsz=imgsz, split=split, conf=0.25,
        models={"candidate": ModelSet(version="x")}, test_sets=[split],
        test_set_kinds={split: "source"}, latency_config=LatencyConfig(enabled=False), rows=rows,
    )


def measure(model: Path, imgsz: int, data_yaml: Path, train: list[Path], work: Path) -> dict:
    gate = GateConfig.from_settings(get_settings())
    fp32 = {s: evaluate_detector(model, data_yaml, imgsz=imgsz, split=s) for s in SPLITS}
    out: dict = {"model": model.name, "imgsz": imgsz,
                 "fp32": {s: m.model_dump() for s, m in fp32.items()}, "int8": {}}
    for name, (desc, cfg, cal) in variants(train).items():
        q = work / f"{model.stem}-{name}.onnx"
        t = time.perf_counter()
        quantize_int8(model, q, cal, imgsz=imgsz, config=cfg)
        q_s = time.perf_counter() - t
        row: dict = {"description": desc, "quantize_s": round(q_s, 1), "splits": {}}
        for s in SPLITS:
            m = evaluate_detector(q, data_yaml, imgsz=imgsz, split=s)
            verdict = check_int8_drop(_results(fp32[s], m, s, imgsz), gate.model_copy(
                update={"primary_test_set": s}))
            row["splits"][s] = {
                "metrics": m.model_dump(),
                "gate_passed": verdict.passed,
                "gate": verdict.description,
                "classes": int8_class_drops(fp32[s], m, gate),
            }
            logger.info("%s %s %s: %s", model.name, name, s, verdict.description)
        out["int8"][name] = row
    return out


def rejudge(report: dict, gate: GateConfig) -> dict:
    """The stored metrics judged again with ``gate`` (after its limits changed)."""
    report["gate"] = gate.model_dump()
    for r in report["models"]:
        for v in r["int8"].values():
            for s, d in v["splits"].items():
                ref = DetectionMetrics.model_validate(r["fp32"][s])
                m = DetectionMetrics.model_validate(d["metrics"])
                out = check_int8_drop(_results(ref, m, s, r["imgsz"]),
                                      gate.model_copy(update={"primary_test_set": s}))
                d.update(gate_passed=out.passed, gate=out.description,
                         classes=int8_class_drops(ref, m, gate))
    return report


def spread(report: dict) -> dict:
    """Relative mAP50-95 drop (%) of the sound quantizations (every variant but ``naive``):
    overall and for each class, with its support."""
    out: dict[str, list[float]] = {"overall": []}
    for r in report["models"]:
        for name, v in r["int8"].items():
            if name == "naive":
                continue
            for s, d in v["splits"].items():
                f, m = r["fp32"][s]["map50_95"], d["metrics"]["map50_95"]
                out["overall"].append((f - m) / f * 100 if f else 0.0)
                for c in d["classes"]:
                    out.setdefault(f"{c['class']} ({c['instances']} boxes)", []).append(c["drop_pct"])
    return {k: {"n": len(v), "mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1
                else 0.0, "min": min(v), "max": max(v)} for k, v in out.items()}


def to_markdown(report: dict) -> str:
    g = report["gate"]
    lines = [
        "# INT8 accuracy drop (platform recipe) and the INT8 gate",
        "",
        (f"Measured {report['created_at'][:10]} on {report['cpu']} (thread-limited: "
        f"{report['threads']}), ONNX Runtime {report['onnxruntime']}. Scored by "
        "`evaluate_detector` (Ultralytics `val`, square letterbox, batch 1) on atl_v2 val "
        f"({report['frames']['val']} frames) and test ({report['frames']['test']} frames); "
        "calibration on atl_v2 train. Gate limits: "
        f"{g['max_int8_drop_points']} points and {g['max_int8_drop_pct']} % overall; classes with "
        f">= {g['int8_class_min_instances']} boxes at most {g['int8_class_max_drop_points']} points "
        f"and {g['int8_class_max_drop_pct']} %."),
        "",
        ("| model | imgsz | INT8 variant | split | fp32 mAP50 | INT8 mAP50 | fp32 mAP50-95 "
         "| INT8 mAP50-95 | drop (points, %) | gate |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        for name, v in r["int8"].items():
            for s, d in v["splits"].items():
                f, m = r["fp32"][s], d["metrics"]
                pts = (f["map50_95"] - m["map50_95"]) * 100
                pct = pts / (f["map50_95"] * 100) * 100 if f["map50_95"] else 0.0
                lines.append(
                    f"| `{r['model']}` | {r['imgsz']} | {name} | {s} | {f['map50']:.3f} | "
                    f"{m['map50']:.3f} | {f['map50_95']:.4f} | {m['map50_95']:.4f} | "
                    f"{pts:+.2f}, {pct:+.1f}% | {'pass' if d['gate_passed'] else '**fail**'} |"
                )
    lines += ["", "## Spread of the sound quantizations (every variant but `naive`), relative drop %",
              "", "| what | n | mean | sd | min | max |", "|---|---|---|---|---|---|"]
    for k, v in spread(report).items():
        lines.append(f"| {k} | {v['n']} | {v['mean']:+.1f} | {v['sd']:.1f} | {v['min']:+.1f} "
                     f"| {v['max']:+.1f} |")
    lines += ["", ("Why the gate's limits are what they are: `roadloop/evaluation/gates.py` "
              "(`INT8_MAX_DROP_PCT`) reads this table."), ""]
    lines += ["", "## Per class (AP50-95, fp32 → INT8; boxes = ground-truth support)", ""]
    lines += ["| model | imgsz | INT8 variant | split | class | boxes | fp32 | INT8 | drop (points, %) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        for name, v in r["int8"].items():
            if name == "naive":
                continue
            for s, d in v["splits"].items():
                for c in d["classes"]:
                    gated = "" if c["gated"] else " (not gated)"
                    lines.append(
                        f"| `{r['model']}` | {r['imgsz']} | {name} | {s} | {c['class']}{gated} | "
                        f"{c['instances']} | {c['reference_ap50_95']:.4f} | {c['int8_ap50_95']:.4f} | "
                        f"{c['drop_points']:+.2f}, {c['drop_pct']:+.1f}% |"
                    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--imgsz", default="320,480", help="comma-separated: gpu_<imgsz>.onnx each")
    ap.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    ap.add_argument("--rejudge", action="store_true",
                    help="judge the stored int8_drop.json again with the current gate limits")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    if args.rejudge:
        stored = json.loads((args.out_dir / "int8_drop.json").read_text())
        write(args.out_dir, rejudge(stored, GateConfig.from_settings(settings)))
        return
    dataset = settings.datasets_dir / "atl_v2"
    sizes = [int(s) for s in args.imgsz.split(",") if s]
    gate = GateConfig.from_settings(settings)
    with tempfile.TemporaryDirectory(prefix="int8-drop-") as tmp:
        work = Path(tmp)
        configure_ultralytics(work / "ultralytics")
        data_yaml = write_data_yaml(dataset, work / "atl_v2")
        train = list_images(dataset / "images" / "train")
        report = {
            "created_at": datetime.now(UTC).isoformat(),
            "cpu": f"{platform.machine()}, {os.cpu_count()} logical cores, shared",
            "threads": os.environ.get("OMP_NUM_THREADS", "default") + " (OMP_NUM_THREADS)"
            + (", taskset " + os.environ["ROADLOOP_TASKSET"] if "ROADLOOP_TASKSET" in os.environ else ""),
            "onnxruntime": __import__("onnxruntime").__version__,
            "load_avg_start": os.getloadavg(),
            "frames": {s: len(list_images(dataset / "images" / s)) for s in SPLITS},
            "gate": gate.model_dump(),
            "models": [],
        }
        for imgsz in sizes:
            model = settings.models_dir / f"atl_v2_yolo11n_gpu_{imgsz}.onnx"
            report["models"].append(measure(model, imgsz, data_yaml, train, work))
        report["load_avg_end"] = os.getloadavg()
    write(args.out_dir, report)


def write(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("int8_drop.json", json.dumps(report, indent=2)),
                       ("int8_drop.md", to_markdown(report))):
        with atomic_path(out_dir / name) as p:
            Path(p).write_text(text)
    print(to_markdown(report))


if __name__ == "__main__":
    main()
