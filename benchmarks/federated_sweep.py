"""Federated training benchmark (issue 11): mAP50 against rounds, by strategy and attack.

Sites are the non-IID camera sites of ``roadloop.federation.sites`` (ATL day, ATL night,
Manaus cameras); every model is evaluated after every round on the same held-out union of
the sources' test splits, which no site trains on. Every run starts from the same
checkpoint and processes the same frames per round:

The start is the ATL checkpoint with its class head re-initialised (``reinit_class_head``):
fine-tuned for a few epochs, the converged checkpoint itself barely moves on these frames
(mAP50 0.050 -> 0.051 -> 0.050 at lr 2e-4; it degrades at 2e-3), so a comparison from it
would measure noise. With the class logits re-initialised every run must learn the
platform's five classes from the sites' labels (backbone and box branch kept), a signal
well above the test set's round-to-round noise.

* ``central``: the union of the sites' frames, one local-training call per round (the same
  ``train_on_site`` the sites run, so optimizer, augmentation and image size match).
* ``local/<site>``: one site alone for the same rounds; the table gives their mean.
* Federated runs go through the real deployment (SuperLink + one SuperNode per site, node
  authentication on, ``flwr run``; ``roadloop.federation.runner``): FedAvg, FedProx, FedAvg
  with normalisation layers kept local (FedBN), DP (client-side clipping 1.0, noise 1.1);
  and with one site poisoned (``attack``: its update reversed and scaled, a norm the
  screening lets through): FedAvg, trimmed mean, median, Krum, Multi-Krum.

    python -m benchmarks.federated_sweep [--size small|full] [--only fedavg,central]

``small`` fits 2 CPU cores in well under an hour; ``full`` is the GPU sweep. Writes
``<out>/federated_sweep[-full].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from federated import APP_DIR
from roadloop.federation.local_training import evaluate_arrays, train_on_site
from roadloop.federation.models import FederationConfig, SiteSpec
from roadloop.federation.runner import FederationFailed, run_federation
from roadloop.federation.sites import SitePlan, build_site_datasets, centralized_dataset
from roadloop.federation.weights import (
    arrays_nbytes,
    load_detection_model,
    save_checkpoint,
    state_arrays,
)
from roadloop.fsutil import write_text_atomic
from roadloop.models.training import read_data_yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


class Size(BaseModel):
    reinit_class_head: bool = True
    lr0: float = 0.001
    imgsz: int
    rounds: int
    local_epochs: int
    batch: int
    manaus_sites: int
    start: str  # checkpoint file under shared/models
    attack_scale: float
    poisoned_site: str


SIZES = {
    "small": Size(imgsz=256, rounds=4, local_epochs=1, batch=8, manaus_sites=3,
                  start="atl_v2_yolo11n_320.pt", attack_scale=4.0, poisoned_site="manaus_mix1"),
    # The same frames cut into 7 sites (Manaus in 5): Bulyan needs 4f + 3 = 7 for f = 1.
    "small7": Size(imgsz=256, rounds=4, local_epochs=1, batch=8, manaus_sites=5,
                   start="atl_v2_yolo11n_320.pt", attack_scale=4.0, poisoned_site="manaus_mix1"),
    "full": Size(imgsz=480, rounds=20, local_epochs=2, batch=16, manaus_sites=3,
                 start="atl_v2_yolo11n_gpu.pt", attack_scale=4.0, poisoned_site="manaus_mix1"),
}

# name -> (FederationConfig overrides, poisoned?)
FEDERATED: dict[str, tuple[dict[str, Any], bool]] = {
    "fedavg": ({"strategy": "fedavg"}, False),
    "fedprox": ({"strategy": "fedprox", "proximal_mu": 0.01}, False),
    "fedbn": ({"strategy": "fedavg", "norm_layers": "local"}, False),
    "dp": ({"strategy": "fedavg", "dp": True}, False),
    "poisoned/fedavg": ({"strategy": "fedavg"}, True),
    "poisoned/trimmed_mean": ({"strategy": "trimmed_mean", "trim_beta": 0.2}, True),
    "poisoned/median": ({"strategy": "median"}, True),
    "poisoned/krum": ({"strategy": "krum", "num_malicious": 1}, True),
    "poisoned/multikrum": ({"strategy": "multikrum", "num_malicious": 1}, True),
    "poisoned/bulyan": ({"strategy": "bulyan", "num_malicious": 1}, True),
}


def start_model(plan: SitePlan, size: Size, work: Path) -> tuple[Path, dict]:
    """The sweep's start checkpoint (class head re-initialised when asked) and its arrays."""
    import torch

    checkpoint = SHARED / "models" / size.start
    names = read_data_yaml(plan.test_yaml)
    model = load_detection_model(checkpoint, names)
    if not size.reinit_class_head:
        return checkpoint, state_arrays(model)
    detect = model.model[-1]
    torch.manual_seed(0)
    for branch in detect.cv3:  # the last 1x1 conv of each scale's class branch
        branch[-1].reset_parameters()
    detect.bias_init()  # Ultralytics' prior for the class bias
    arrays = state_arrays(model)
    dest = save_checkpoint(arrays, checkpoint, work / "start.pt", class_names=names,
                           meta={"reinit_class_head": True, "from": size.start})
    return dest, arrays


def heldout_dataset(plan: SitePlan, out: Path) -> Path:
    """The sources' test splits plus every site's val frames (no run trains on either).

    Larger than the test splits alone (69 frames), so a round's mAP50 moves less by chance.
    """
    out = Path(out)
    if (out / "data.yaml").is_file():
        return out / "data.yaml"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "labels"):
        (tmp / sub / "test").mkdir(parents=True)
    folders = [(plan.test_yaml.parent, "test", "")] + [
        (site.data_yaml.parent, "val", f"{site.name}__") for site in plan.sites
    ]
    for root, split, prefix in folders:
        for img in sorted((root / "images" / split).iterdir()):
            os.link(img, tmp / "images" / "test" / f"{prefix}{img.name}")
            label = root / "labels" / split / f"{img.stem}.txt"
            if label.is_file():
                shutil.copyfile(label, tmp / "labels" / "test" / f"{prefix}{img.stem}.txt")
    doc = yaml.safe_load(plan.test_yaml.read_text())
    doc["path"] = str(out.absolute())
    (tmp / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.rename(out)
    return out / "data.yaml"


def _eval(arrays, plan: SitePlan, start: Path, size: Size, work: Path) -> dict[str, float]:
    return evaluate_arrays(
        arrays, plan.test_yaml, split="test", template_checkpoint=start, imgsz=size.imgsz,
        work_dir=work, class_names=read_data_yaml(plan.test_yaml),
    )


def run_alone(site: SiteSpec, plan: SitePlan, start: Path, size: Size, work: Path,
              initial: dict) -> dict[str, Any]:
    """One dataset trained alone for the sweep's rounds, evaluated after each."""
    cfg = FederationConfig(imgsz=size.imgsz, batch=size.batch, local_epochs=size.local_epochs,
                           lr0=size.lr0, min_train_sites=1, min_available_sites=1)
    arrays = initial
    curve, started = [], time.monotonic()
    for rnd in range(1, size.rounds + 1):
        arrays = train_on_site(arrays, site, cfg, template_checkpoint=start,
                               work_dir=work / "node", server_round=rnd).arrays
        curve.append(_eval(arrays, plan, start, size, work / f"eval-{rnd}")["mAP50"])
        log.info("%s round %d: mAP50 %.4f", site.name, rnd, curve[-1])
    return {"map50_by_round": curve, "seconds": time.monotonic() - started}


def run_federated(name: str, plan: SitePlan, start: Path, size: Size, work: Path) -> dict:
    overrides, poisoned = FEDERATED[name]
    cfg = FederationConfig(
        rounds=size.rounds, local_epochs=size.local_epochs, imgsz=size.imgsz, batch=size.batch,
        lr0=size.lr0, min_train_sites=len(plan.sites), min_available_sites=len(plan.sites), **overrides,
    )
    nodes = {}
    if poisoned:
        nodes[size.poisoned_site] = {"attack": "sign_flip", "attack-scale": size.attack_scale}
    started = time.monotonic()
    result = run_federation(
        plan.sites, cfg, app_dir=APP_DIR, initial_weights=start, work_dir=work,
        eval_yaml=plan.test_yaml, eval_split="test", node_overrides=nodes,
    )
    return {
        "map50_by_round": [r.eval_metrics.get("mAP50", float("nan")) for r in result.rounds],
        "seconds": time.monotonic() - started,
        "bytes_to_site_per_round": result.rounds[0].bytes_to_site if result.rounds else 0,
        "bytes_from_site_per_round": (
            sum(result.rounds[0].bytes_from_site.values()) / len(result.rounds[0].bytes_from_site)
            if result.rounds and result.rounds[0].bytes_from_site else 0
        ),
        "rejected": [[r.site, r.reason] for rec in result.rounds for r in rec.rejected],
        "aggregated_by_round": [rec.sites_aggregated for rec in result.rounds],
        "epsilon": result.epsilon,
        "poisoned_site": size.poisoned_site if poisoned else None,
        "config": cfg.model_dump(),
    }


def settled(curve: list[float]) -> float:
    """Mean mAP50 of the last two rounds: one round's mAP50 on these few frames is noisy."""
    tail = curve[-2:] if len(curve) >= 2 else curve
    return sum(tail) / len(tail) if tail else float("nan")


def _md(report: dict) -> str:
    size, rows = report["size"], report["runs"]
    central = settled(rows.get("central", {}).get("map50_by_round", []))
    rounds = size["rounds"]
    head = "| run | " + " | ".join(f"r{r}" for r in range(1, rounds + 1)) + \
        " | last 2 rounds | / central | notes |"
    sites = ", ".join(f"{k}: {v}" for k, v in report["sites"].items())
    lines = [
        f"# Federated training sweep ({report['size_name']})",
        "",
        (f"Generated {report['generated']} by `python -m benchmarks.federated_sweep "
         f"--size {report['size_name']}` on {report['machine']}; load average "
         f"{report['load_before']} before, {report['load_after']} after."),
        "",
        (f"{len(report['sites'])} sites ({sites} train frames); held-out test: "
         f"{report['test_frames']} frames (the sources' test splits + the sites' val frames) no "
         f"run trains on. Start: `{size['start']}`, imgsz "
         f"{size['imgsz']}, {rounds} rounds x {size['local_epochs']} local epoch(s), batch "
         f"{size['batch']}. mAP50 of the start model: {report['start_map50']:.4f}."),
        "",
        head,
        "|---" * (rounds + 4) + "|",
    ]
    for name, row in rows.items():
        curve = row["map50_by_round"]
        final = settled(curve)
        notes = []
        if row.get("epsilon") is not None:
            notes.append(f"epsilon {row['epsilon']:.1f} (delta 1e-5)")
        if row.get("poisoned_site"):
            notes.append(f"{row['poisoned_site']} poisoned")
        if row.get("rejected"):
            notes.append(f"{len(row['rejected'])} updates refused")
        if row.get("sites"):
            notes.append("mean of " + ", ".join(f"{k} {v:.3f}" for k, v in row["sites"].items()))
        notes.append(f"{row['seconds']:.0f} s")
        lines.append(
            f"| {name} | " + " | ".join(f"{v:.4f}" for v in curve)
            + f" | {final:.4f} | {final / central:.0%} | {'; '.join(notes)} |"
        )
    fed = rows.get("fedavg", {})
    if fed.get("bytes_to_site_per_round"):
        down, up = fed["bytes_to_site_per_round"], fed["bytes_from_site_per_round"]
        note = f"Bytes per round per site: {down / 1e6:.1f} MB down, {up / 1e6:.1f} MB up"
        lines += ["", f"{note} (float32 weights)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a thin CLI
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".cache" / "federated")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown from the JSON of an earlier sweep")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    size = SIZES[args.size]
    only = {s for s in args.only.split(",") if s}
    stem = "federated_sweep" if args.size == "small" else f"federated_sweep-{args.size}"
    json_path = args.out / f"{stem}.json"
    if args.render_only:
        write_text_atomic(args.out / f"{stem}.md", _md(json.loads(json_path.read_text())))
        return 0
    work = args.work / args.size
    plan = build_site_datasets(SHARED / "datasets", work / "sites", manaus_sites=size.manaus_sites)
    # Scored on the sources' test splits plus the sites' val frames (see heldout_dataset).
    plan = plan.model_copy(update={"test_yaml": heldout_dataset(plan, work / "heldout")})
    start, initial = start_model(plan, size, work)
    report: dict[str, Any] = {
        "size_name": args.size, "size": size.model_dump(),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {p: version(p) for p in ("flwr", "ultralytics", "torch", "opacus")},
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "sites": {s.name: s.frames for s in plan.sites},
        "test_frames": len(list((plan.test_yaml.parent / "images" / "test").iterdir())),
        "update_bytes": arrays_nbytes(initial),
        "runs": {},
    }
    if json_path.is_file() and only:  # add to an earlier sweep of the same size
        earlier = json.loads(json_path.read_text())
        if earlier.get("size") == report["size"]:
            report["runs"] = earlier["runs"]
            report["load_before"] = earlier.get("load_before", report["load_before"])
            report["reruns"] = [*earlier.get("reruns", []), {
                "only": sorted(only), "at": report["generated"],
                "load_before": [round(x, 2) for x in os.getloadavg()],
            }]
    report["start_map50"] = _eval(initial, plan, start, size, work / "eval-start")["mAP50"]

    def want(name: str) -> bool:
        return not only or name in only or name.split("/")[0] in only

    if want("central"):
        union = centralized_dataset(plan, work / "central")
        union_site = SiteSpec(name="central", data_yaml=union,
                              frames=sum(s.frames for s in plan.sites))
        report["runs"]["central"] = run_alone(union_site, plan, start, size, work / "central-run",
                                              initial)
    if want("local"):
        per_site = {s.name: run_alone(s, plan, start, size, work / f"local-{s.name}", initial)
                    for s in plan.sites}
        curves = [r["map50_by_round"] for r in per_site.values()]
        report["runs"]["local (mean)"] = {
            "map50_by_round": [sum(c[i] for c in curves) / len(curves) for i in range(size.rounds)],
            "seconds": sum(r["seconds"] for r in per_site.values()),
            "sites": {k: r["map50_by_round"][-1] for k, r in per_site.items()},
        }
    for name in FEDERATED:
        if want(name):
            try:
                FederationConfig(min_train_sites=len(plan.sites),
                                 min_available_sites=len(plan.sites), **FEDERATED[name][0])
            except ValueError as exc:
                log.info("skipping %s on %d sites: %s", name, len(plan.sites), exc)
                continue
            log.info("federated run %s", name)
            try:
                report["runs"][name] = run_federated(name, plan, start, size, work / name)
            except FederationFailed as exc:  # recorded; the sweep goes on
                log.error("federated run %s failed: %s", name, exc)
                report["failed"] = {**report.get("failed", {}), name: str(exc)[:2000]}
            report["load_after"] = [round(x, 2) for x in os.getloadavg()]
            write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / f"{stem}.md", _md(report))
    print(_md(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
