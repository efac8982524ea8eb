"""What does frame-level DP-SGD (Opacus) cost on YOLO11n? Measure, don't guess.

Three variants of one fine-tune (``roadloop.federation.private_training``), each in its own
process so that peak RSS is that variant's:

- ``plain``: non-private SGD, BatchNorm in train mode (the reference);
- ``groupnorm``: BatchNorm replaced by GroupNorm, DP-SGD;
- ``frozen_bn``: BatchNorm frozen (eval mode, affine frozen), DP-SGD.

For each: seconds per step and per epoch, peak RSS, epsilon per epoch and in total (RDP,
delta 1e-5, Poisson sampling), and Ultralytics' mAP50 on atl_v2 *val* before and after, at
the training size and at the checkpoint's 320. Writes ``benchmarks/results/dp_per_sample.
{json,md}``; intermediate files go to the git-ignored ``benchmarks/results/work/``.

    .venv/bin/python -m benchmarks.dp_per_sample [--frames 32 --imgsz 192 --epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roadloop.federation.private_training import (
    VARIANTS,
    PrivateTrainConfig,
    build_frames,
    dataset_view,
    evaluate_detector,
    load_detector,
    prepare_variant,
    train_private,
)
from roadloop.fsutil import write_text_atomic
from roadloop.settings import PROJECT_ROOT, get_settings

EVAL_IMGSZ = 320  # the checkpoint's training size


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_variant(args: argparse.Namespace) -> dict:
    """One variant, start to end, in this process."""
    work = Path(tempfile.mkdtemp(prefix="dp_view_", dir=args.work_dir))
    data = dataset_view(args.data, work)
    base = load_detector(args.checkpoint)
    model = prepare_variant(base, args.variant)
    del base
    sizes = sorted({args.imgsz, EVAL_IMGSZ})
    start = {sz: evaluate_detector(model, data, sz) for sz in sizes}
    frames = build_frames(data, "train", args.imgsz, args.frames)
    cfg = PrivateTrainConfig(
        variant=args.variant,
        imgsz=args.imgsz,
        batch=args.batch,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        seed=args.seed,
    )
    rss_before_train = _peak_rss_mb()
    result = train_private(model, frames, cfg)
    rss_after_train = _peak_rss_mb()
    end = {sz: evaluate_detector(model, data, sz) for sz in sizes}
    return {
        "variant": args.variant,
        "config": cfg.model_dump(),
        "train": result.model_dump(mode="json"),
        "peak_rss_mb_before_train": rss_before_train,
        "peak_rss_mb_train": rss_after_train,
        "map_start": {str(k): v for k, v in start.items()},
        "map_end": {str(k): v for k, v in end.items()},
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def write_markdown(record: dict, path: Path) -> None:
    a = record["args"]
    sz, ev = str(a["imgsz"]), str(EVAL_IMGSZ)
    sizes = [sz] if sz == ev else [sz, ev]
    lines = [
        "# Frame-level DP-SGD (Opacus) on YOLO11n: what each BatchNorm choice costs",
        "",
        (
            f"`python -m benchmarks.dp_per_sample --frames {a['frames']} --imgsz {a['imgsz']} "
            f"--batch {a['batch']} --epochs {a['epochs']} --lr {a['lr']}` on {record['machine']}, "
            f"{record['started']}. Load average (1/5/15 min) at start {record['loadavg_start']}, "
            f"at end {record['loadavg_end']}. Each variant ran in its own process, one after the "
            "other."
        ),
        "",
        (
            f"Start: `{Path(a['checkpoint']).name}`; train: first {a['frames']} frames of atl_v2 "
            f"train (letterboxed, no augmentation); SGD lr {a['lr']}, momentum {a['momentum']}; "
            "DP: noise multiplier 1.1, clip 1.0, Poisson sampling at rate batch/frames, RDP "
            "accountant, delta 1e-5. mAP50: Ultralytics val on atl_v2 val (31 frames), at the "
            f"training size ({sz}) and the checkpoint's ({ev})."
        ),
        "",
        "| variant | private | trainable params | s/step | s/epoch | peak RSS MB (train) | "
        + "ε epoch 1 | ε total | "
        + " | ".join(f"mAP50 start @{x} | mAP50 end @{x}" for x in sizes)
        + " |",
        "|---" * (8 + 2 * len(sizes)) + "|",
    ]
    for r in record["variants"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} |" + " |" * 6)
            continue
        t = r["train"]
        per_epoch = sum(e["seconds"] for e in t["epochs"]) / max(len(t["epochs"]), 1)
        lines.append(
            f"| {r['variant']} | {'yes' if t['private'] else 'no'} | "
            f"{t['trainable_parameters']:,} | {_fmt(t['seconds_per_step'], 2)} | "
            f"{_fmt(per_epoch, 1)} | {r['peak_rss_mb_train']:.0f} | "
            f"{_fmt(t['epochs'][0]['epsilon'], 2)} | {_fmt(t['epsilon'], 2)} | "
            + " | ".join(
                f"{_fmt(r['map_start'][x]['mAP50'])} | {_fmt(r['map_end'][x]['mAP50'])}"
                for x in sizes
            )
            + " |"
        )
    lines += ["", "Per-epoch mean loss (each frame's own Ultralytics loss, box+cls+dfl):", ""]
    for r in record["variants"]:
        if "error" not in r:
            losses = ", ".join(f"{e['mean_loss']:.3f}" for e in r["train"]["epochs"])
            lines.append(f"- {r['variant']}: {losses}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> None:
    models = get_settings().shared_dir / "models"
    datasets = get_settings().shared_dir / "datasets"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=models / "atl_v2_yolo11n_320.pt")
    ap.add_argument("--data", type=Path, default=datasets / "atl_v2" / "data.yaml")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--imgsz", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help="(internal) run one variant here, print its JSON")
    ap.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="dp_per_sample", help="results file stem")
    ap.add_argument(
        "--work-dir", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "work"
    )
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.variant:
        print("@@RESULT@@" + json.dumps(run_variant(args)))
        return

    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "variants": [],
    }
    for variant in args.variants.split(","):
        cmd = [sys.executable, "-m", "benchmarks.dp_per_sample", "--variant", variant]
        for key in ("checkpoint", "data", "frames", "imgsz", "batch", "epochs", "lr"):
            cmd += [f"--{key}", str(getattr(args, key))]
        cmd += ["--momentum", str(args.momentum), "--seed", str(args.seed)]
        cmd += ["--work-dir", str(args.work_dir), "--name", args.name]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=PROJECT_ROOT)
        out = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
        if proc.returncode != 0 or not out:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            record["variants"].append({"variant": variant, "error": " / ".join(tail)})
        else:
            record["variants"].append(json.loads(out[-1][len("@@RESULT@@") :]))
        record["variants"][-1]["wall_s"] = time.perf_counter() - t0
        print(variant, f"{record['variants'][-1]['wall_s']:.0f} s", flush=True)
    record["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out_dir / f"{args.name}.json", json.dumps(record, indent=2) + "\n")
    write_markdown(record, args.out_dir / f"{args.name}.md")
    print((args.out_dir / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
