"""Detector training with Ultralytics: start-weight resolution, class-head surgery, training.

Start weights are resolved in order: the configured weights (``yolo11n.pt`` is downloaded by
Ultralytics where the network allows; offline that fails in well under a second), then the
shared checkpoints trained here, then the model YAML (random init). A checkpoint whose class
names differ from the dataset's has its class-logit rows re-mapped onto the dataset's
classes (:func:`adapt_checkpoint_to_taxonomy`) instead of being dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from copy import deepcopy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from roadloop.errors import InvalidInputError, MissingDataError, RoadloopError
from roadloop.fsutil import atomic_path
from roadloop.settings import get_settings

logger = logging.getLogger(__name__)

_INTEGRATIONS = (
    "mlflow",
    "raytune",
    "wandb",
    "tensorboard",
    "clearml",
    "comet",
    "dvc",
    "neptune",
    "hub",
)

_configured_dir: Path | None = None


def configure_ultralytics(config_dir: Path | None = None) -> None:
    """Point Ultralytics at ``config_dir`` and switch off its own integrations.

    Ultralytics otherwise turns on its MLflow/Ray Tune/... callbacks whenever the package is
    installed (it wrote an ``mlflow.db`` into the working directory); the platform logs to
    MLflow itself. ``YOLO_CONFIG_DIR`` is read when ``ultralytics`` is first imported, so
    call this before that. Without ``config_dir`` an existing ``YOLO_CONFIG_DIR`` is kept,
    else ``<roadloop home>/ultralytics`` is used. Idempotent.
    """
    global _configured_dir
    if config_dir is None:
        env = os.environ.get("YOLO_CONFIG_DIR")
        config_dir = Path(env) if env else get_settings().home / "ultralytics"
    config_dir = Path(config_dir).absolute()
    if _configured_dir == config_dir:
        return
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    from ultralytics import settings

    off: dict[str, Any] = {k: False for k in _INTEGRATIONS if k in settings}
    if "sync" in settings:
        off["sync"] = False  # no usage analytics events
    settings.update(off)
    _configured_dir = config_dir


#: Shared checkpoints a training run falls back to when ``TrainConfig.model`` cannot be had,
#: strongest first: the gpu checkpoint (152 more epochs at 307-717 px), then the older CPU
#: ones (``../shared/models/README.md``); a model YAML (random init) last.
DEFAULT_START_CHECKPOINTS = (
    "atl_v2_yolo11n_gpu.pt",
    "atl_v2_yolo11n_480.pt",
    "atl_v2_yolo11n_320.pt",
)


def _default_fallbacks() -> list[str]:
    models = get_settings().models_dir
    return [
        *(str(models / name) for name in DEFAULT_START_CHECKPOINTS),
        "yolo11n.yaml",
    ]


class TrainConfig(BaseModel):
    """How to train a detector. ``extra`` is passed verbatim to Ultralytics ``train()``."""

    model: str = "yolo11n.pt"  # weights name/path or model YAML
    fallback_weights: list[str] = Field(default_factory=_default_fallbacks)
    imgsz: int = 320
    epochs: int = 3
    batch: int = 16
    device: str = "auto"  # "auto" → cuda:0 when torch sees a GPU, else cpu
    workers: int = 0
    seed: int = 0
    patience: int = 50
    lr0: float | None = None
    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    freeze: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class ResolvedWeights(BaseModel):
    path_or_name: str
    kind: Literal["pretrained", "checkpoint", "scratch"]
    note: str


class TrainResult(BaseModel):
    best_weights: Path
    last_weights: Path
    epochs_run: int
    # mAP50, mAP50-95, precision, recall of the last validation (Ultralytics' final val of best.pt)
    final_metrics: dict[str, float]
    per_epoch: list[dict[str, float]]
    start_weights: ResolvedWeights
    device: str
    train_dir: Path
    class_names: list[str]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def _try_download(name: str) -> Path | None:
    """Ask Ultralytics for an official asset; returns None (fast) when offline or it fails."""
    from ultralytics.utils import SETTINGS, is_online
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if name not in GITHUB_ASSETS_NAMES:
        return None
    target = Path(SETTINGS["weights_dir"]) / name
    if target.is_file():
        return target
    if not is_online():  # DNS check, ~1 ms offline; avoids retry loops
        logger.info("offline: cannot download %s", name)
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        got = Path(attempt_download_asset(str(target), retry=1))
    except Exception as exc:  # noqa: BLE001 - ConnectionError, HTTP errors, partial files ...
        logger.info("download of %s failed: %s", name, exc)
        return None
    return got if got.is_file() else None


def resolve_start_weights(cfg: TrainConfig) -> ResolvedWeights:
    """First usable start point among ``cfg.model`` then ``cfg.fallback_weights``."""
    configure_ultralytics()
    tried: list[str] = []
    for i, cand in enumerate([cfg.model, *cfg.fallback_weights]):
        why_prefix = "configured" if i == 0 else "fallback"
        if cand.endswith((".yaml", ".yml")):
            from ultralytics.nn.tasks import yaml_model_load

            try:
                yaml_model_load(cand)  # resolves scale suffixes: yolo11n.yaml → yolo11.yaml, n
                resolved = cand
            except Exception as exc:  # noqa: BLE001 - any unusable YAML → next candidate
                tried.append(f"{cand}: {exc}")
                continue
            note = f"{why_prefix} model YAML {cand}: random init (no pretrained weights)"
            if tried:
                note += "; tried " + "; ".join(tried)
            logger.warning(note) if tried else logger.info(note)
            return ResolvedWeights(path_or_name=str(resolved), kind="scratch", note=note)
        path = Path(cand).expanduser()
        if path.is_file():
            kind: Literal["pretrained", "checkpoint"] = "pretrained" if i == 0 else "checkpoint"
            note = f"{why_prefix} weights {path}"
            if tried:
                note += "; tried " + "; ".join(tried)
                logger.warning("falling back to %s", note)
            return ResolvedWeights(path_or_name=str(path.absolute()), kind=kind, note=note)
        got = _try_download(cand)
        if got is not None:
            note = f"{why_prefix} weights {cand} (downloaded to {got})"
            return ResolvedWeights(path_or_name=str(got), kind="pretrained", note=note)
        tried.append(f"{cand}: not found locally and not downloadable")
    raise MissingDataError("no usable start weights; tried " + "; ".join(tried))


def load_source_class_map(source_names: list[str], target_names: list[str]) -> dict[str, str]:
    """Map a checkpoint's class names onto ``target_names`` via the taxonomy's source maps.

    Picks the taxonomy source whose map covers every source class (e.g. ``atl_v2``: bike →
    two_wheeler); names equal in both lists map to themselves otherwise.
    """
    tax_file = get_settings().taxonomy_file
    sources: dict[str, dict[str, str]] = {}
    if Path(tax_file).is_file():
        sources = (yaml.safe_load(Path(tax_file).read_text()) or {}).get("sources", {}) or {}
    targets = set(target_names)
    for source, mapping in sources.items():
        if mapping and set(source_names) <= set(mapping):
            logger.info("class map from taxonomy source %r", source)
            return {s: mapping[s] for s in source_names if mapping[s] in targets}
    return {s: s for s in source_names if s in targets}


def adapt_checkpoint_to_taxonomy(
    checkpoint: Path,
    target_names: list[str],
    class_map: dict[str, str],
    out_path: Path,
) -> Path:
    """Re-head ``checkpoint`` for ``target_names``, keeping what its class head learned.

    Every tensor transfers as is, except the class-logit convs (last layer of each Detect
    ``cv3`` branch): for each mapped source class, its weight row and bias are copied to the
    target class's row; unmapped target classes keep fresh (prior-biased) init. Ultralytics'
    own transfer only re-maps rows whose names are identical (bike ≠ two_wheeler) and drops
    the head entirely on older versions. The result is saved the way Ultralytics saves
    models (``{"model": fp16 module, "train_args": ..., ...}``), atomically.
    """
    import torch
    from ultralytics import __version__
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    configure_ultralytics()
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if not checkpoint.is_file():
        raise MissingDataError(f"checkpoint not found: {checkpoint}", checkpoint)
    try:
        src, ckpt = load_checkpoint(checkpoint)
    except Exception as exc:
        raise InvalidInputError(
            checkpoint, f"not a loadable Ultralytics checkpoint: {exc}"
        ) from exc
    src_names = [src.names[i] for i in sorted(src.names)]
    unknown = [t for t in class_map.values() if t not in target_names]
    if unknown:
        raise RoadloopError(f"class map targets {unknown} are not in target names {target_names}")

    cfg = deepcopy(src.yaml)
    cfg["nc"] = len(target_names)
    new = DetectionModel(
        cfg, nc=len(target_names), verbose=False
    )  # placeholder names: no name remap
    new.load(src, verbose=False)  # everything whose shape matches (all but the class-logit convs)

    head, src_head = new.model[-1], src.model[-1]
    copied: dict[str, str] = {}
    with torch.no_grad():
        for attr in ("cv3", "one2one_cv3"):
            dst_branches, src_branches = getattr(head, attr, None), getattr(src_head, attr, None)
            if dst_branches is None or src_branches is None:
                continue
            for dst_seq, src_seq in zip(dst_branches, src_branches):
                dst_conv, src_conv = dst_seq[-1], src_seq[-1]
                if dst_conv.weight.shape[1:] != src_conv.weight.shape[1:]:
                    raise RoadloopError(
                        f"{checkpoint}: class conv input width differs; cannot re-map"
                    )
                for s_idx, s_name in enumerate(src_names):
                    t_name = class_map.get(s_name)
                    if t_name is None:
                        continue
                    if t_name in copied and copied[t_name] != s_name:
                        logger.warning(
                            "%s and %s both map to %s; keeping %s's row",
                            copied[t_name],
                            s_name,
                            t_name,
                            copied[t_name],
                        )
                        continue
                    t_idx = target_names.index(t_name)
                    dst_conv.weight[t_idx] = src_conv.weight[s_idx].to(dst_conv.weight.dtype)
                    dst_conv.bias[t_idx] = src_conv.bias[s_idx].to(dst_conv.bias.dtype)
                    copied[t_name] = s_name
    new.names = dict(enumerate(target_names))
    new.args = getattr(src, "args", {})
    logger.info(
        "adapted %s %s -> %s (rows copied: %s)", checkpoint.name, src_names, target_names, copied
    )

    train_args = {k: v for k, v in (ckpt.get("train_args") or {}).items() if k != "data"}
    out = {
        "date": datetime.now(UTC).isoformat(),
        "version": __version__,
        "license": ckpt.get("license", "AGPL-3.0 License (https://ultralytics.com/license)"),
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": deepcopy(new).half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        "train_metrics": {},
        "roadloop_adaptation": {
            "source_checkpoint": str(checkpoint),
            "source_names": src_names,
            "target_names": list(target_names),
            "rows_copied": copied,
        },
    }
    with atomic_path(out_path, parents=True) as tmp:
        torch.save(out, tmp)
    return out_path


def read_data_yaml(data_yaml: Path) -> list[str]:
    """Class names of a YOLO data.yaml; a missing/malformed file raises naming it."""
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise MissingDataError(f"dataset yaml not found: {data_yaml}", data_yaml)
    try:
        data = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as exc:
        raise InvalidInputError(data_yaml, f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(data_yaml, "expected a mapping with train/val/names")
    missing = [k for k in ("train", "val", "names") if not data.get(k)]
    if missing:
        raise InvalidInputError(data_yaml, f"missing keys: {', '.join(missing)}")
    names = data["names"]
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise InvalidInputError(data_yaml, "'names' must be a list or an id → name mapping")


def _checkpoint_names(path: Path) -> list[str] | None:
    from ultralytics.nn.tasks import load_checkpoint

    try:
        model, _ = load_checkpoint(path)
    except Exception as exc:
        raise InvalidInputError(path, f"not a loadable Ultralytics checkpoint: {exc}") from exc
    names = getattr(model, "names", None)
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else None


def adapt_start_to_taxonomy(
    checkpoint: Path, class_names: list[str], out: Path
) -> tuple[Path, list[str] | None, dict[str, str] | None]:
    """A start checkpoint ready for ``class_names``: ``(weights, its own class names, the
    class map)``. When its names already are ``class_names`` (or it has none) the checkpoint
    itself comes back with no map; otherwise its class head is re-mapped into ``out``
    (``adapt_checkpoint_to_taxonomy``)."""
    names = _checkpoint_names(Path(checkpoint))
    if names is None or names == class_names:
        return Path(checkpoint), names, None
    class_map = load_source_class_map(names, class_names)
    return adapt_checkpoint_to_taxonomy(Path(checkpoint), class_names, class_map, out), names, \
        class_map


def _floats(d: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


_FINAL_KEYS = {
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}


def train_detector(
    cfg: TrainConfig,
    data_yaml: Path,
    out_dir: Path,
    *,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on ``data_yaml``; ``on_epoch_end(epoch, metrics)`` gets plain floats each epoch.

    Outputs go to ``out_dir/train`` (``weights/best.pt``, ``weights/last.pt``, results.csv).
    """
    configure_ultralytics()
    data_yaml, out_dir = Path(data_yaml).absolute(), Path(out_dir).absolute()
    class_names = read_data_yaml(data_yaml)
    start = resolve_start_weights(cfg)
    start_path = start.path_or_name
    if start.kind != "scratch":
        adapted, src_names, class_map = adapt_start_to_taxonomy(
            Path(start_path), class_names, out_dir / "start_weights_adapted.pt")
        if class_map is not None:
            start = ResolvedWeights(
                path_or_name=str(adapted),
                kind=start.kind,
                note=f"{start.note}; class head re-mapped {src_names} -> {class_names} via {class_map}",
            )
            start_path = str(adapted)
    device = resolve_device(cfg.device)

    from ultralytics import YOLO

    model = YOLO(start_path, task="detect")
    per_epoch: list[dict[str, float]] = []
    final_eval: dict[str, float] = {}
    in_epoch = {"open": False}

    def _epoch_start(trainer) -> None:
        in_epoch["open"] = True

    def _epoch_end(trainer) -> None:
        metrics = _floats(
            {
                **trainer.label_loss_items(trainer.tloss, prefix="train"),
                **(trainer.metrics or {}),
                **(getattr(trainer, "lr", None) or {}),
            }
        )
        if not in_epoch["open"]:  # Ultralytics re-fires it for the final validation of best.pt
            final_eval.update(metrics)
            return
        in_epoch["open"] = False
        epoch = int(trainer.epoch) + 1
        per_epoch.append({"epoch": float(epoch), **metrics})
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    model.add_callback("on_train_epoch_start", _epoch_start)
    model.add_callback("on_fit_epoch_end", _epoch_end)
    kwargs: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": cfg.epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "device": device,
        "workers": cfg.workers,
        "seed": cfg.seed,
        "patience": cfg.patience,
        "fraction": cfg.fraction,
        "project": str(out_dir),
        "name": "train",
        "exist_ok": True,
        "plots": False,
        "verbose": False,
    }
    if cfg.lr0 is not None:
        kwargs["lr0"] = cfg.lr0
    if cfg.freeze is not None:
        kwargs["freeze"] = cfg.freeze
    kwargs.update(cfg.extra)
    logger.info("training from %s (%s) on %s, device=%s", start_path, start.kind, data_yaml, device)
    model.train(**kwargs)

    trainer = model.trainer
    save_dir = Path(trainer.save_dir)
    best, last = Path(trainer.best), Path(trainer.last)
    if not best.is_file():
        best = last
    # The last validation: Ultralytics' final one of best.pt, else the last epoch's.
    last_val = (
        final_eval
        if "metrics/mAP50(B)" in final_eval
        else next((e for e in reversed(per_epoch) if "metrics/mAP50(B)" in e), {})
    )
    final = {short: float(last_val.get(long, 0.0)) for long, short in _FINAL_KEYS.items()}
    return TrainResult(
        best_weights=best,
        last_weights=last,
        epochs_run=len(per_epoch),
        final_metrics=final,
        per_epoch=per_epoch,
        start_weights=start,
        device=device,
        train_dir=save_dir,
        class_names=class_names,
    )
