"""Does the active-learning queue beat random picking? Label efficiency on real data.

Setup (all real data, all in the roadloop taxonomy):

* **Start model** — ``../shared/models/atl_v2_yolo11n_gpu.pt`` (trained on atl_v2 only;
  ``--start-model ../shared/models/atl_v2_yolo11n_480.pt`` is the one behind the recorded
  ``label_efficiency{,_gpu,_gpu_5seeds}.md``), class head re-mapped onto the taxonomy with
  ``adapt_checkpoint_to_taxonomy``.
* **Pool** — ``manaus_v4`` train (every train frame; a domain the start model never saw),
  curated with ``build_curated_dataset`` (``replay_fraction=0``). **Test** — ``manaus_v4``
  test. Ultralytics needs a val split while training: the first ``--val-frames`` frames of
  ``manaus_v4`` val (never scored here).
* **Rounds** — each round the strategy picks ``--budget`` frames from the unlabelled pool
  with the *previous* round's model (round 1: the start model) as the scorer; the
  simulated annotator's labels are the ground truth. Then a model is trained on all
  frames labelled so far and scored on test (Ultralytics ``val`` via
  ``roadloop.evaluation.accuracy.evaluate_detector``, mAP50 and mAP50-95).
* **Warm start (decided):** every round fine-tunes *from the adapted start model* on the
  cumulative labelled set, rather than from the previous round's weights. The mAP at n
  labels then depends only on which n frames were picked (what we compare), not on how
  many fine-tuning passes a model has had; the previous round's model is still what
  scores the pool. ``warmup_epochs=0`` (a fine-tune; Ultralytics' 100-iteration warm-up
  would otherwise span the whole run at these sizes).
* **Strategies** — ``random``, ``uncertainty`` (margin, top-3 mean) and ``combined``
  (0.4 uncertainty + 0.3 k-center diversity on backbone embeddings + 0.3 rarity), all from
  ``roadloop.labeling.active_learning.build_queue``; several seeds (random picks + training seed).
* **Target** — combined reaches random's full-budget mean mAP50 with ≤ 60 % of the labels.

Writes ``benchmarks/results/label_efficiency.{json,md,png}``; work files under
``benchmarks/results/work/label_efficiency/``. Progress is saved after every round, and
``--resume`` skips finished runs.

    .venv/bin/python -m benchmarks.label_efficiency                       # 2-CPU default
    .venv/bin/python -m benchmarks.label_efficiency --device 0 --imgsz 480 --epochs 20 \\
        --rounds 6 --budget 25 --seeds 0 1 2 3 4                         # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from roadloop.fsutil import write_text_atomic
from roadloop.labeling.label_quality import symlink_yolo_dataset
from roadloop.models.training import configure_ultralytics
from roadloop.settings import PROJECT_ROOT, get_settings

logger = logging.getLogger("label_efficiency")

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
TARGET_SHARE = 0.6


def _label_of(img: Path) -> Path:
    return img.parent.parent.parent / "labels" / img.parent.name / f"{img.stem}.txt"


def _round_dataset(root: Path, train: list[Path], val: list[Path], names: list[str]) -> Path:
    """A fresh YOLO dataset of symlinks: Ultralytics' caches land here, not in the curated set."""
    if root.exists():
        shutil.rmtree(root)
    return symlink_yolo_dataset(root, train, val, names)


def _box_counts(imgs: list[Path], names: list[str]) -> dict[str, int]:
    c: Counter = Counter()
    for img in imgs:
        lbl = _label_of(img)
        if lbl.is_file():
            for line in lbl.read_text().splitlines():
                if line.strip():
                    c[names[int(float(line.split()[0]))]] += 1
    return dict(c)


def _condition(img: Path) -> str:
    from roadloop.data.replay import NIGHT_MAX_BRIGHTNESS

    grey = cv2.imread(str(img), cv2.IMREAD_REDUCED_GRAYSCALE_4)
    return "night" if grey is not None and float(grey.mean()) < NIGHT_MAX_BRIGHTNESS else "day"


def prepare(work: Path, start_model: Path) -> tuple[Path, Path, list[str]]:
    """Curated manaus_v4 (taxonomy) and the adapted start model."""
    from roadloop.data.datasets import SourceSpec, build_curated_dataset, load_taxonomy
    from roadloop.models.training import (
        _checkpoint_names,
        adapt_checkpoint_to_taxonomy,
        load_source_class_map,
    )

    tax = load_taxonomy()
    curated = work / "manaus_taxonomy"
    if not (curated / "summary.json").is_file():
        src = SourceSpec(name="manaus_v4", root=get_settings().datasets_dir / "manaus_v4")
        build_curated_dataset([src], curated, tax, replay_fraction=0.0, progress=False)
    adapted = work / f"start_adapted_{Path(start_model).stem}.pt"  # one per start model
    if not adapted.is_file():
        src_names = _checkpoint_names(start_model) or []
        adapt_checkpoint_to_taxonomy(
            start_model, tax.classes, load_source_class_map(src_names, tax.classes), adapted
        )
    return curated, adapted, list(tax.classes)


def select(
    strategy: str,
    pool: list[Path],
    labelled: list[Path],
    scorer: Path,
    k: int,
    seed: int,
    args: argparse.Namespace,
    names: list[str],
    conditions: dict[Path, str],
    version: str,
) -> list[Path]:
    from roadloop.labeling.active_learning import FramePrediction, build_queue, predict_frames
    from roadloop.labeling.embeddings import compute_embeddings

    unl = [p for p in pool if p not in set(labelled)]
    if strategy == "random":
        preds = [FramePrediction(frame_id=p.stem, camera_id="manaus", image=p) for p in unl]
        emb = lab_emb = None
    else:
        preds = predict_frames(
            scorer,
            [(p.stem, "manaus", p, [conditions[p]]) for p in unl],
            imgsz=args.imgsz,
            device=args.device,
            model_version=version,
        )
        emb = lab_emb = None
        if strategy == "combined":
            cache = args.work / "embeddings"
            table = compute_embeddings(
                scorer,
                unl + labelled,
                imgsz=args.imgsz,
                cache_dir=cache,
                model_version=version,
                device=args.device,
            )
            emb, lab_emb = table.vectors[: len(unl)], table.vectors[len(unl) :]
    queue = build_queue(
        preds,
        emb,
        lab_emb,
        _box_counts(labelled, names),
        budget=k,
        strategy=strategy,
        seed=seed,
        condition_frequencies=dict(Counter(conditions[p] for p in labelled)) or None,
    )
    by_stem = {p.stem: p for p in unl}
    return [by_stem[fid] for fid in queue.frame_ids]


def run_one(
    strategy: str,
    seed: int,
    args,
    curated: Path,
    adapted: Path,
    names: list[str],
    conditions: dict[Path, str],
    record: dict,
) -> None:
    from roadloop.evaluation.accuracy import evaluate_detector
    from roadloop.models.training import TrainConfig, train_detector

    pool = sorted((curated / "images" / "train").iterdir())
    val = sorted((curated / "images" / "val").iterdir())[: args.val_frames]
    key = f"{strategy}/seed{seed}"
    runs = record.setdefault("runs", {})
    done = runs.get(key, {"strategy": strategy, "seed": seed, "rounds": []})
    runs[key] = done
    labelled = [curated / "images" / "train" / f for r in done["rounds"] for f in r["picked"]]
    scorer = Path(done["rounds"][-1]["weights"]) if done["rounds"] else adapted
    for rnd in range(len(done["rounds"]) + 1, args.rounds + 1):
        t0 = time.perf_counter()
        version = f"{strategy}-s{seed}-r{rnd - 1}"
        picks = select(
            strategy,
            pool,
            labelled,
            scorer,
            args.budget,
            seed * 1000 + rnd,
            args,
            names,
            conditions,
            version,
        )
        labelled = labelled + picks
        rdir = args.work / "runs" / strategy / f"seed{seed}" / f"round{rnd}"
        data_yaml = _round_dataset(rdir / "data", labelled, val, names)
        cfg = TrainConfig(
            model=str(adapted),
            fallback_weights=[],
            imgsz=args.imgsz,
            epochs=args.epochs,
            batch=args.batch,
            device=args.device,
            workers=args.workers,
            seed=seed,
            extra={"warmup_epochs": 0, "val": False, "amp": False},
        )
        res = train_detector(cfg, data_yaml, rdir)
        t_train = time.perf_counter() - t0
        m = evaluate_detector(
            res.best_weights,
            curated / "data.yaml",
            imgsz=args.imgsz,
            split="test",
            device=args.device,
        )
        done["rounds"].append(
            {
                "round": rnd,
                "n_labelled": len(labelled),
                "map50": m.map50,
                "map50_95": m.map50_95,
                "picked": [p.name for p in picks],
                "conditions": dict(Counter(conditions[p] for p in labelled)),
                "weights": str(res.best_weights),
                "seconds": time.perf_counter() - t0,
                "seconds_select_train": t_train,
            }
        )
        scorer = res.best_weights
        logger.info(
            "%s round %d: %d labels, mAP50 %.4f, mAP50-95 %.4f (%.0f s)",
            key,
            rnd,
            len(labelled),
            m.map50,
            m.map50_95,
            time.perf_counter() - t0,
        )
        write_text_atomic(args.work / "progress.json", json.dumps(record, indent=2))


def summarise(record: dict, args) -> dict:
    """Mean and spread per strategy and round, and the target verdict."""
    base = record["baseline"]
    table: dict[str, list[dict]] = {}
    for strategy in args.strategies:
        rows = []
        for rnd in range(1, args.rounds + 1):
            vals = [
                r["rounds"][rnd - 1]
                for r in record["runs"].values()
                if r["strategy"] == strategy and len(r["rounds"]) >= rnd
            ]
            if not vals:
                continue
            m50 = [v["map50"] for v in vals]
            m5095 = [v["map50_95"] for v in vals]
            rows.append(
                {
                    "round": rnd,
                    "n_labelled": vals[0]["n_labelled"],
                    "n_seeds": len(vals),
                    "map50_mean": statistics.fmean(m50),
                    "map50_std": statistics.stdev(m50) if len(m50) > 1 else 0.0,
                    "map50_min": min(m50),
                    "map50_max": max(m50),
                    "map50_95_mean": statistics.fmean(m5095),
                    "map50_95_std": statistics.stdev(m5095) if len(m5095) > 1 else 0.0,
                }
            )
        table[strategy] = rows
    verdict: dict = {
        "target": f"combined reaches random's full-budget mean mAP50 with <= "
        f"{TARGET_SHARE:.0%} of the labels"
    }
    rnd_rows, comb_rows = table.get("random", []), table.get("combined", [])
    if rnd_rows and comb_rows and rnd_rows[-1]["round"] == args.rounds:
        goal = rnd_rows[-1]["map50_mean"]
        full = rnd_rows[-1]["n_labelled"]
        reached = next((r for r in comb_rows if r["map50_mean"] >= goal), None)
        verdict.update(
            {
                "random_full_budget_map50": goal,
                "full_budget_labels": full,
                "combined_labels_to_reach": reached["n_labelled"] if reached else None,
                "share": reached["n_labelled"] / full if reached else None,
            }
        )
        verdict["met"] = bool(reached and reached["n_labelled"] <= TARGET_SHARE * full)
    else:
        verdict["met"] = None
        verdict["note"] = "incomplete: random or combined did not finish every round"
    return {"baseline": base, "table": table, "verdict": verdict}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "map50", "mAP50"), (axes[1], "map50_95", "mAP50-95")):
        base = summary["baseline"][key]
        for strategy, rows in summary["table"].items():
            x = [0] + [r["n_labelled"] for r in rows]
            y = np.array([base] + [r[f"{key}_mean"] for r in rows])
            s = np.array([0.0] + [r[f"{key}_std"] for r in rows])
            ax.plot(x, y, marker="o", label=strategy)
            ax.fill_between(x, y - s, y + s, alpha=0.15)
        ax.set_xlabel("labelled manaus_v4 frames")
        ax.set_ylabel(f"{label} on manaus_v4 test")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Label efficiency: mean ± 1 std over seeds (start: atl_v2 YOLO11n)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(record: dict, summary: dict) -> str:
    c = record["config"]
    v = summary["verdict"]
    lines = [
        "# Label efficiency: active-learning queue vs random picking",
        "",
        (
            f"Start model `{Path(c['start_model']).name}` adapted to the taxonomy; pool manaus_v4 "
            f"train ({c['pool_size']} frames), test manaus_v4 test ({c['test_size']} frames). "
            f"{c['rounds']} rounds × {c['budget']} frames, {c['epochs']} epoch(s) per round at "
            f"imgsz {c['imgsz']}, batch {c['batch']}, device `{c['device']}`, seeds {c['seeds']}. "
            "Each round fine-tunes the adapted start model on all labels so far; the previous "
            "round's model scores the pool. Labels come from the simulated annotator "
            "(ground truth)."
        ),
        "",
        (
            f"Before any manaus label (start model): mAP50 {summary['baseline']['map50']:.4f}, "
            f"mAP50-95 {summary['baseline']['map50_95']:.4f}."
        ),
        "",
        "| strategy | labels | seeds | mAP50 mean ± std | mAP50 min–max | mAP50-95 mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, rows in summary["table"].items():
        for r in rows:
            lines.append(
                f"| {strategy} | {r['n_labelled']} | {r['n_seeds']} | "
                f"{r['map50_mean']:.4f} ± {r['map50_std']:.4f} | "
                f"{r['map50_min']:.4f}–{r['map50_max']:.4f} | "
                f"{r['map50_95_mean']:.4f} ± {r['map50_95_std']:.4f} |"
            )
    lines += ["", f"**Target:** {v['target']}."]
    if v.get("met") is None:
        lines.append(f"Not decided: {v.get('note')}.")
    else:
        reach = v["combined_labels_to_reach"]
        lines.append(
            f"Random's full-budget mean mAP50 = {v['random_full_budget_map50']:.4f} at "
            f"{v['full_budget_labels']} labels; combined reaches it "
            + (f"at {reach} labels ({v['share']:.0%})." if reach else "at no budget tried.")
            + (" **Target met.**" if v["met"] else " **Target not met.**")
        )
    base = summary["baseline"]["map50"]
    finals = {s: rows[-1]["map50_mean"] for s, rows in summary["table"].items() if rows}
    above = [s for s, v in finals.items() if v > base]
    lines += [
        "",
        (
            f"Against the start model (mAP50 {base:.4f} with no manaus labels), the final "
            "round's mean mAP50 is "
            + ", ".join(f"{s} {v:.4f}" for s, v in finals.items())
            + (
                f": only {', '.join(above)} end(s) above it."
                if above
                else ": no strategy ends above it."
            )
            + " Differences smaller than the seed spread (std column) are not evidence."
        ),
    ]
    lines += [
        "",
        f"Wall time {record.get('wall_seconds', 0) / 60:.1f} min on {record['machine']}.",
        "",
        "![curves](label_efficiency.png)",
        "",
    ]
    return "\n".join(lines)


def _child_argv(argv: list[str], strategy: str, seed: int, work: Path) -> list[str]:
    """The parent's arguments minus the ones the child gets its own values for."""
    own = {"--jobs", "--deadline-s", "--seeds", "--strategies", "--work", "--out", "--name"}
    out: list[str] = []
    skipping = False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=", 1)[0] in own and "=" not in a
            if a.split("=", 1)[0] in own:
                continue
        elif skipping:
            continue
        out.append(a)
    return [*out, "--seeds", str(seed), "--strategies", strategy, "--work", str(work),
            "--out", str(work / "out"), "--name", "run", "--resume"]


def run_parallel(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Every (strategy, seed) in its own process, ``--jobs`` at a time; then one report.

    Each child curates and trains in its own work folder (no shared Ultralytics caches) and
    saves its progress after every round, so a ``--deadline-s`` cut keeps finished rounds.
    """
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args.work = (args.work or args.out / "work" / args.name).absolute()
    jobs_dir = args.work / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    pending = [(st, sd) for sd in args.seeds for st in args.strategies]
    running: list[tuple[subprocess.Popen, Path, str]] = []
    t0 = time.perf_counter()
    deadline = None if args.deadline_s is None else t0 + args.deadline_s
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            strategy, seed = pending.pop(0)
            work = jobs_dir / f"{strategy}-s{seed}"
            work.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.label_efficiency",
                   *_child_argv(argv, strategy, seed, work)]
            log = (work / "child.log").open("ab")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=PROJECT_ROOT), work, f"{strategy}/seed{seed}"))
            logger.info("started %s (%d running, %d waiting)", running[-1][2], len(running),
                        len(pending))
        time.sleep(2.0)
        for proc, work, key in list(running):
            if proc.poll() is not None:
                running.remove((proc, work, key))
                if proc.returncode != 0:
                    failed.append(key)
                    logger.error("%s exited %d; see %s", key, proc.returncode,
                                 work / "child.log")
                else:
                    logger.info("%s done", key)
        if deadline is not None and time.perf_counter() > deadline and (running or pending):
            logger.warning("deadline: stopping %d run(s), %d never started",
                           len(running), len(pending))
            for proc, _, key in running:
                proc.terminate()
                failed.append(f"{key} (stopped at the deadline)")
            for proc, _, _ in running:
                proc.wait(30)
            failed += [f"{st}/seed{sd} (not started)" for st, sd in pending]
            running, pending = [], []

    record: dict = {"runs": {}}
    for progress in sorted(jobs_dir.glob("*/progress.json")):
        child = json.loads(progress.read_text())
        record.setdefault("baseline", child.get("baseline"))
        record["runs"].update(child.get("runs", {}))
    if not record["runs"] or record.get("baseline") is None:
        logger.error("no run finished a round; nothing to report")
        return 1
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    first = json.loads(next(jobs_dir.glob("*/progress.json")).read_text())["config"]
    config.update(pool_size=first["pool_size"], test_size=first["test_size"], failed=failed)
    record["config"] = config
    record["machine"] = f"{platform.node()} ({os.cpu_count()} CPUs), device {args.device}, " \
        f"{args.jobs} runs in parallel"
    record["wall_seconds"] = time.perf_counter() - t0
    write_report(record, args)
    return 1 if failed else 0


def write_report(record: dict, args: argparse.Namespace) -> None:
    """``<out>/<name>.{json,md,png}`` from the runs in ``record``."""
    summary = summarise(record, args)
    out = {
        "config": record["config"],
        "machine": record["machine"],
        "wall_seconds": record["wall_seconds"],
        **summary,
        "runs": {
            k: {
                **v,
                "rounds": [
                    {kk: vv for kk, vv in r.items() if kk != "weights"} for r in v["rounds"]
                ],
            }
            for k, v in record["runs"].items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(out, indent=2))
    plot(summary, args.out / f"{args.name}.png")
    write_text_atomic(
        args.out / f"{args.name}.md",
        markdown(record, summary).replace("label_efficiency.png", f"{args.name}.png"),
    )
    logger.info("verdict: %s", summary["verdict"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--start-model", type=Path, default=get_settings().models_dir / "atl_v2_yolo11n_gpu.pt"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=["random", "uncertainty", "combined"])
    ap.add_argument("--val-frames", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="label_efficiency")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="Ultralytics dataloader workers")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run each (strategy, seed) in its own process, this many at a time (a GPU box)",
    )
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="with --jobs: stop unfinished runs after this long and report the rounds done",
    )
    args = ap.parse_args(argv)
    if args.jobs > 1:
        return run_parallel(args, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work = (args.work or args.out / "work" / args.name).absolute()
    args.work.mkdir(parents=True, exist_ok=True)
    configure_ultralytics(args.work / "ultralytics")
    if not args.start_model.is_file():
        raise SystemExit(f"start model not found: {args.start_model}")
    if not (get_settings().datasets_dir / "manaus_v4" / "data.yaml").is_file():
        raise SystemExit(f"manaus_v4 not found under {get_settings().datasets_dir}")

    t0 = time.perf_counter()
    curated, adapted, names = prepare(args.work, args.start_model)
    pool = sorted((curated / "images" / "train").iterdir())
    conditions = {p: _condition(p) for p in pool}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(pool_size=len(pool), test_size=len(list((curated / "images" / "test").iterdir())))
    progress = args.work / "progress.json"
    record: dict = {}
    if args.resume and progress.is_file():
        record = json.loads(progress.read_text())
        if {k: record["config"].get(k) for k in ("imgsz", "epochs", "budget", "batch")} != {
            k: config[k] for k in ("imgsz", "epochs", "budget", "batch")
        }:
            raise SystemExit("--resume: saved progress has another config; drop --resume")
    record.setdefault("runs", {})
    record["config"] = config
    record["machine"] = f"{platform.node()} ({os.cpu_count()} CPUs), device {args.device}"
    if "baseline" not in record:
        from roadloop.evaluation.accuracy import evaluate_detector

        m = evaluate_detector(
            adapted, curated / "data.yaml", imgsz=args.imgsz, split="test", device=args.device
        )
        record["baseline"] = {"map50": m.map50, "map50_95": m.map50_95}
    elapsed0 = record.get("wall_seconds", 0.0)
    for seed in args.seeds:
        for strategy in args.strategies:
            run_one(strategy, seed, args, curated, adapted, names, conditions, record)
            record["wall_seconds"] = elapsed0 + time.perf_counter() - t0
            write_text_atomic(progress, json.dumps(record, indent=2))
    record["wall_seconds"] = elapsed0 + time.perf_counter() - t0
    write_report(record, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
