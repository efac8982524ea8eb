"""One site's part of a federated round: local training from the global weights, and eval.

The Flower ClientApp calls :func:`train_on_site` with the global arrays and returns the
resulting :class:`SiteUpdate`; :func:`evaluate_arrays` gives Ultralytics' real mAP of any
arrays on a YOLO dataset split. Training is Ultralytics' ``DetectionTrainer`` with settings
suited to short local runs (see :func:`trainer_overrides`) and a subclass that

* starts from exactly the given arrays (its ``get_model`` returns the template architecture
  with them loaded; checked again just before the first batch),
* adds FedProx's proximal gradient before each optimizer step,
* skips validation and checkpoint writing: the server evaluates, and the update is taken
  from memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from roadloop.errors import InvalidInputError, RoadloopError
from roadloop.federation.models import FederationConfig, SiteSpec
from roadloop.federation.weights import (
    load_arrays,
    load_detection_model,
    norm_layer_keys,
    state_arrays,
)
from roadloop.fsutil import atomic_path
from roadloop.models.training import configure_ultralytics, read_data_yaml, resolve_device

logger = logging.getLogger(__name__)

FEDBN_STATE_FILE = "fedbn_state.npz"


class SiteUpdate(BaseModel):
    """What a site sends back after a round of local training."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


def round_seed(seed: int, server_round: int) -> int:
    """A per-round seed: the same (seed, round) repeats, different rounds shuffle differently."""
    return (int(seed) * 1_000_003 + int(server_round)) % (2**31 - 1)


def trainer_overrides(
    cfg: FederationConfig, data_yaml: Path, template_checkpoint: Path, save_dir: Path, seed: int
) -> dict[str, Any]:
    """Ultralytics train arguments for one local round.

    No warmup and a constant learning rate (``lrf=1``): a round is a few local steps from the
    global model, and Ultralytics' per-run warmup and decay would restart every round. A fixed
    optimizer (SGD, Ultralytics' default momentum) instead of ``auto``, which picks by run
    length. ``nbs=batch``: one optimizer step per batch, so a site takes
    ``epochs x ceil(n / batch)`` local steps as FedAvg intends (Ultralytics' default nbs=64
    would accumulate a small site's whole epoch into a single step). No per-epoch val, no
    plots. Mosaic follows Ultralytics' default (``close_mosaic``: off in runs this short),
    as in the platform's centralised training.
    """
    return {
        "model": str(template_checkpoint),
        "data": str(data_yaml),
        "epochs": cfg.local_epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "nbs": cfg.batch,
        "optimizer": "SGD",
        "lr0": cfg.lr0,
        "lrf": 1.0,
        "cos_lr": False,
        "warmup_epochs": 0.0,
        "val": False,
        "plots": False,
        "save": False,
        "seed": seed,
        "deterministic": True,
        "device": resolve_device("auto"),
        "workers": 0,
        "project": str(save_dir.parent),
        "name": save_dir.name,
        "exist_ok": True,
        "verbose": False,
    }


def _make_trainer(
    overrides: dict[str, Any],
    start_model: Any,
    start_arrays: dict[str, np.ndarray],
    proximal_mu: float,
) -> Any:
    """A ``DetectionTrainer`` that trains ``start_model`` as given (see the module doc)."""
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.torch_utils import unwrap_model

    class _SiteTrainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            # Ultralytics would build a fresh model and copy `weights` by name; the round must
            # start from the global arrays instead, so hand over the prepared model.
            start_model.requires_grad_(True)  # checkpoints store frozen (EMA) tensors
            return start_model

        def preprocess_batch(self, batch):
            batch = super().preprocess_batch(batch)
            self.images_since_step += int(batch["img"].shape[0])
            return batch

        def optimizer_step(self):
            # BaseTrainer.optimizer_step with the proximal term added to the unscaled gradient
            # (unscale_ first, so AMP's loss scale never multiplies mu), before clipping.
            self.scaler.unscale_(self.optimizer)
            if proximal_mu > 0:
                self._add_proximal_gradient()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            if self.ema:
                self.ema.update(self.model)
            self.optimizer_steps += 1
            self.images_since_step = 0

        def _add_proximal_gradient(self):
            # FedProx's local objective is F(w) + mu/2 ||w - w_global||^2 with F the MEAN loss.
            # Ultralytics' loss is the batch-mean loss x batch size, summed over the batches
            # accumulated into this step, so the gradient here is n x grad F for the n images
            # since the last step. Adding n x mu (w - w_global) keeps mu in the paper's units.
            # It goes in before Ultralytics' clip (total norm 10), as part of the loss: a huge
            # mu cannot blow a step up, and while loss gradients are clipped a small mu barely
            # pulls (measured: at imgsz 64, mu 100 moved weights 2% less than mu 0, 1e4: 69%).
            scale = proximal_mu * max(self.images_since_step, 1)
            with torch.no_grad():
                for name, param in unwrap_model(self.model).named_parameters():
                    if param.grad is None or not param.requires_grad:
                        continue
                    anchor = self.anchors.get(name)
                    if anchor is None:
                        anchor = torch.from_numpy(start_arrays[name]).to(param.device, param.dtype)
                        self.anchors[name] = anchor
                    param.grad.add_(param.detach() - anchor, alpha=scale)

        def validate(self):
            # Local validation is not part of a round (the server evaluates the aggregate);
            # Ultralytics validates the final epoch even with val=False.
            return dict(self.metrics or {}), None

        def save_model(self):
            return False  # the update is taken from memory; no last.pt/best.pt per round

    trainer = _SiteTrainer(overrides=overrides)
    trainer.images_since_step = 0
    trainer.optimizer_steps = 0
    trainer.anchors = {}

    def _check_start(tr) -> None:
        now = state_arrays(unwrap_model(tr.model))
        if now.keys() != start_arrays.keys() or any(
            not np.array_equal(now[k], start_arrays[k]) for k in now
        ):
            raise RoadloopError("local training did not start from the round's start weights")

    trainer.add_callback("on_train_start", _check_start)
    return trainer


def _load_local_norms(path: Path, keys: set[str]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            local = {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(path, f"unreadable FedBN state: {exc}") from exc
    if set(local) != keys:
        raise InvalidInputError(
            path,
            "FedBN state does not match this model's normalisation layers "
            f"({len(local)} arrays, expected {len(keys)}); delete it to start from the global ones",
        )
    return local


def _save_local_norms(path: Path, arrays: dict[str, np.ndarray], keys: set[str]) -> None:
    with atomic_path(path, parents=True) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: arrays[k] for k in sorted(keys)})


def train_on_site(
    global_arrays: dict[str, np.ndarray],
    site: SiteSpec,
    cfg: FederationConfig,
    *,
    template_checkpoint: Path,
    work_dir: Path,
    server_round: int,
) -> SiteUpdate:
    """Train ``cfg.local_epochs`` epochs on ``site``'s train split from ``global_arrays``.

    The returned arrays are the trained model's own weights, not Ultralytics' EMA. A round
    builds a new EMA whose decay ramps up from zero (``d = 0.9999 (1 - exp(-updates/2000))``),
    so after a round's few hundred steps at most it is nearly the raw model anyway; the raw
    model is the exact result of local SGD that FedAvg/FedProx average, and its BatchNorm
    statistics are the ones its weights produced.

    With ``cfg.proximal_mu > 0`` each step adds ``n * mu * (w - w_start)`` to the gradient
    (n: images in the step, see ``_add_proximal_gradient``); ``w_start`` is the round's start
    point (the global arrays, with the site's own norm arrays under FedBN). With
    ``cfg.norm_layers == "local"`` (FedBN) the site's normalisation arrays live in
    ``work_dir/fedbn_state.npz``: they replace the global ones at the start (the global ones
    the first time) and are saved after training. The update still carries every key.
    """
    configure_ultralytics()
    from ultralytics.utils.torch_utils import unwrap_model

    work_dir = Path(work_dir).absolute()
    data_yaml = Path(site.data_yaml).absolute()
    class_names = read_data_yaml(data_yaml)
    model = load_detection_model(Path(template_checkpoint), class_names)
    start = {k: np.asarray(v, dtype=np.float32) for k, v in global_arrays.items()}

    fedbn_path = work_dir / FEDBN_STATE_FILE
    norm_keys = norm_layer_keys(model) if cfg.norm_layers == "local" else set()
    if norm_keys:
        local = _load_local_norms(fedbn_path, norm_keys)
        if local is not None:
            start.update({k: np.asarray(v, dtype=np.float32) for k, v in local.items()})
            logger.info(
                "site %s: FedBN, %d local norm arrays from %s", site.name, len(local), fedbn_path
            )
        else:
            logger.info("site %s: FedBN, first round: norm arrays from the global model", site.name)
    load_arrays(model, start, origin=f"global arrays for site {site.name}")
    start = state_arrays(model)  # exactly what training starts from (float32, model order)

    seed = round_seed(cfg.seed, server_round)
    save_dir = work_dir / "rounds" / f"round_{server_round:04d}"
    overrides = trainer_overrides(
        cfg, data_yaml, Path(template_checkpoint).absolute(), save_dir, seed
    )
    trainer = _make_trainer(overrides, model, start, cfg.proximal_mu)
    logger.info(
        "site %s round %d: training %d epoch(s) on %s (imgsz %d, batch %d, lr %g, mu %g, "
        "norm layers %s, device %s)",
        site.name,
        server_round,
        cfg.local_epochs,
        data_yaml,
        cfg.imgsz,
        cfg.batch,
        cfg.lr0,
        cfg.proximal_mu,
        cfg.norm_layers,
        overrides["device"],
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0

    trained = unwrap_model(trainer.model)
    arrays = state_arrays(trained)
    not_finite = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    if not_finite:
        raise RoadloopError(
            f"site {site.name} round {server_round}: training diverged "
            f"({len(not_finite)} arrays with NaN/Inf, e.g. {not_finite[:3]})"
        )
    if norm_keys:
        _save_local_norms(fedbn_path, arrays, norm_keys)

    num_examples = len(trainer.train_loader.dataset)
    metrics: dict[str, float] = {
        "seconds": float(seconds),
        "epochs": float(cfg.local_epochs),
        "optimizer_steps": float(trainer.optimizer_steps),
        "lr": float(cfg.lr0),
        "proximal_mu": float(cfg.proximal_mu),
    }
    if trainer.tloss:
        metrics.update(
            {k: float(v) for k, v in trainer.label_loss_items(trainer.tloss, "train").items()}
        )
    delta = float(np.sqrt(sum(float(np.sum((arrays[k] - start[k]) ** 2)) for k in arrays)))
    metrics["update_l2"] = delta
    logger.info(
        "site %s round %d: %d images, %d steps in %.1f s, update L2 %.4g, losses %s",
        site.name,
        server_round,
        num_examples,
        trainer.optimizer_steps,
        seconds,
        delta,
        {k: round(v, 4) for k, v in metrics.items() if k.startswith("train/")},
    )
    return SiteUpdate(arrays=arrays, num_examples=num_examples, metrics=metrics)


_VAL_KEYS = {
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
}


def evaluate_arrays(
    arrays: dict[str, np.ndarray],
    data_yaml: Path,
    *,
    split: str,
    template_checkpoint: Path,
    imgsz: int,
    work_dir: Path,
    class_names: list[str] | None = None,
) -> dict[str, float]:
    """Ultralytics validation of ``arrays`` on ``split`` of ``data_yaml``: mAP50, mAP50-95,
    precision, recall and num_examples (images validated). ``class_names`` default to the
    dataset's."""
    configure_ultralytics()
    from ultralytics.models.yolo.detect import DetectionValidator

    data_yaml, work_dir = Path(data_yaml).absolute(), Path(work_dir).absolute()
    names = class_names if class_names is not None else read_data_yaml(data_yaml)
    model = load_detection_model(Path(template_checkpoint), names)
    load_arrays(model, arrays, origin=f"arrays evaluated on {data_yaml}")
    validator = DetectionValidator(
        args={
            "data": str(data_yaml),
            "split": split,
            "imgsz": imgsz,
            "device": resolve_device("auto"),
            "workers": 0,
            "plots": False,
            "verbose": False,
            "project": str(work_dir),
            "name": f"eval_{split}",
            "exist_ok": True,
        }
    )
    t0 = time.perf_counter()
    stats = validator(model=model)
    out = {short: float(stats.get(long, 0.0)) for long, short in _VAL_KEYS.items()}
    out["num_examples"] = float(validator.seen)
    logger.info("evaluated on %s/%s in %.1f s: %s", data_yaml, split, time.perf_counter() - t0, out)
    return out
