"""Frame-level differential privacy for the detector: DP-SGD with Opacus on YOLO.

Opacus clips each frame's gradient to ``max_grad_norm`` and adds Gaussian noise of
``noise_multiplier x max_grad_norm`` to their sum (Poisson-sampled batches, RDP accountant),
so epsilon bounds what one *frame* reveals. That needs per-frame gradients, which BatchNorm
in train mode forbids (each frame's output depends on the others in its batch). Two ways out,
both built here (:func:`prepare_variant`):

- ``groupnorm``: every BatchNorm becomes a GroupNorm (``ModuleValidator.fix``). GroupNorm
  normalises each frame by its own statistics, so the pretrained BN statistics are lost and
  the detector starts far lower.
- ``frozen_bn``: BatchNorm stays, in eval mode, with its running statistics fixed and its
  affine parameters frozen: a fixed per-channel affine map, trained around.

``plain`` is the non-private reference (BN in train mode, ordinary SGD).

Ultralytics' loss (``v8DetectionLoss``) couples the frames of a batch: it divides by the
batch's summed target scores and multiplies by the batch size. A frame's clipped gradient
would then depend on its batch-mates, which the DP analysis does not allow. So the loss is
evaluated frame by frame (:func:`per_frame_loss`): each frame's loss is Ultralytics' loss of
that frame alone, and the batch loss is their mean, which Opacus' ``loss_reduction="mean"``
turns back into exact per-frame gradients (it multiplies the hooks' backprops by the batch
size).

Two things YOLO needs for Opacus' hooks: SiLU must not be in place (an in-place op on a hooked
module's output is refused by autograd), and the DFL conv stays frozen (it is a fixed
projection in Ultralytics too).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.models.training import configure_ultralytics, read_data_yaml

logger = logging.getLogger(__name__)

Variant = Literal["plain", "groupnorm", "frozen_bn"]
VARIANTS: tuple[Variant, ...] = ("plain", "groupnorm", "frozen_bn")


class PrivateTrainConfig(BaseModel):
    """One fine-tuning run. ``batch`` is the expected batch (Poisson rate = batch / frames)."""

    variant: Variant = "frozen_bn"
    imgsz: int = Field(160, ge=32, le=1280)
    batch: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (tests); epsilon counts steps taken
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    noise_multiplier: float = Field(1.1, gt=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    grad_sample_mode: Literal["hooks", "functorch", "ew"] = "hooks"
    seed: int = 0


class EpochRecord(BaseModel):
    epoch: int
    steps: int
    frames_seen: int
    seconds: float
    mean_loss: float
    epsilon: float | None = None  # cumulative after this epoch; None for the plain variant


class PrivateTrainResult(BaseModel):
    variant: Variant
    private: bool
    frames: int
    sample_rate: float
    steps: int
    seconds: float
    seconds_per_step: float
    epochs: list[EpochRecord]
    epsilon: float | None = None  # (epsilon, delta)-DP at frame level, all steps composed
    delta: float | None = None
    trainable_parameters: int
    frozen_parameters: int


def _bn_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def load_detector(checkpoint: Path) -> Any:
    """An Ultralytics ``DetectionModel`` in float32 with its loss hyper-parameters set."""
    configure_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import load_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingDataError(f"checkpoint not found: {checkpoint}", checkpoint)
    try:
        model, _ = load_checkpoint(checkpoint)
    except Exception as exc:
        raise InvalidInputError(
            checkpoint, f"not a loadable Ultralytics checkpoint: {exc}"
        ) from exc
    model = model.float()
    model.args = get_cfg()  # box/cls/dfl gains for v8DetectionLoss (the checkpoint's are a dict)
    return model


def prepare_variant(model: Any, variant: Variant) -> Any:
    """A copy of ``model`` made trainable the way ``variant`` says (see the module doc)."""

    if variant not in VARIANTS:
        raise InvalidInputError(variant, f"unknown variant; expected one of {VARIANTS}")
    model = copy.deepcopy(model)
    for p in model.parameters():  # the checkpoint's are frozen; fix() only visits trainable ones
        p.requires_grad_(True)
    if variant == "groupnorm":
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    for module in model.modules():
        if hasattr(module, "inplace"):  # SiLU(inplace=True) in the checkpoint
            module.inplace = False
    for name, p in model.named_parameters():
        if ".dfl" in name:
            p.requires_grad_(False)
    if variant == "frozen_bn":
        for module in model.modules():
            if isinstance(module, _bn_types()):
                for p in module.parameters():
                    p.requires_grad_(False)
    set_train_mode(model, variant)
    return model


def set_train_mode(model: Any, variant: Variant) -> None:
    """``model.train()``, but frozen BatchNorm stays in eval mode (running stats fixed)."""
    model.train()
    if variant == "frozen_bn":
        for module in model.modules():
            if isinstance(module, _bn_types()):
                module.eval()


def dataset_view(data_yaml: Path, root: Path) -> Path:
    """A data.yaml under ``root`` whose splits link to ``data_yaml``'s folders.

    Ultralytics writes a ``labels/<split>.cache`` beside the labels it reads; through the
    view that lands in ``root``, so a read-only (or shared) dataset is never written to.
    """
    data_yaml, root = Path(data_yaml), Path(root)
    read_data_yaml(data_yaml)  # raises on a missing or malformed file
    data = yaml.safe_load(data_yaml.read_text())
    base = Path(data.get("path") or data_yaml.parent)
    if not base.is_absolute():
        base = data_yaml.parent / base
    view: dict[str, Any] = {"path": str(root.absolute()), "names": data["names"]}
    for split in ("train", "val", "test"):
        rel = data.get(split)
        if not isinstance(rel, str):
            continue
        images = (base / rel).absolute()
        labels = Path(str(images).replace(f"{os.sep}images", f"{os.sep}labels", 1))
        if not images.is_dir() or "images" not in rel:
            raise InvalidInputError(data_yaml, f"{split}: expected an images/ folder, got {rel}")
        for src, kind in ((images, "images"), (labels, "labels")):
            # real folders of file links: Ultralytics resolve()s folder links back to the source
            folder = root / kind / split
            folder.mkdir(parents=True, exist_ok=True)
            for file in src.iterdir() if src.is_dir() else ():
                link = folder / file.name
                if file.is_file() and not link.exists():
                    link.symlink_to(file)
        view[split] = f"images/{split}"
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump(view, sort_keys=False))
    return out


def build_frames(data_yaml: Path, split: str, imgsz: int, max_frames: int | None = None) -> Any:
    """Ultralytics' own letterboxed dataset (no augmentation) of ``split``, first N frames.

    Pass a :func:`dataset_view` when the dataset must not be written to (label cache).
    """
    configure_ultralytics()
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    read_data_yaml(Path(data_yaml))  # raises on a missing or malformed file
    data = check_det_dataset(str(data_yaml))
    cfg = get_cfg(overrides={"imgsz": imgsz, "rect": False, "cache": False})
    dataset = build_yolo_dataset(cfg, data[split], batch=1, data=data, mode="val", rect=False)
    if max_frames is not None and max_frames < len(dataset):
        dataset = torch.utils.data.Subset(dataset, list(range(max_frames)))
    return dataset


def _collate(frames: list[dict]) -> dict:
    from ultralytics.data.dataset import YOLODataset

    return YOLODataset.collate_fn(frames)


def per_frame_loss(criterion: Any, preds: dict, batch: dict) -> tuple[Any, Any]:
    """Mean over frames of each frame's own Ultralytics loss (box, cls, dfl summed).

    Returns ``(loss, items)`` with ``items`` the per-frame losses, detached.
    """
    import torch

    n = preds["boxes"].shape[0]
    losses = []
    for i in range(n):
        pred_i = {
            "boxes": preds["boxes"][i : i + 1],
            "scores": preds["scores"][i : i + 1],
            "feats": [f[i : i + 1] for f in preds["feats"]],
        }
        mask = batch["batch_idx"] == i
        batch_i = {
            "batch_idx": torch.zeros(int(mask.sum()), dtype=batch["batch_idx"].dtype),
            "cls": batch["cls"][mask],
            "bboxes": batch["bboxes"][mask],
        }
        loss_i, _ = criterion(pred_i, batch_i)  # x batch size 1: the gained box+cls+dfl
        losses.append(loss_i.sum())
    stacked = torch.stack(losses)
    return stacked.mean(), stacked.detach()


def _images(batch: dict) -> Any:
    return batch["img"].float() / 255.0


def _empty_noise_step(model: Any, optimizer: Any) -> None:
    """A Poisson-sampled empty batch still releases noise: zero-length per-frame grads."""
    import torch

    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_private(model: Any, dataset: Any, cfg: PrivateTrainConfig) -> PrivateTrainResult:
    """Fine-tune ``model`` (from :func:`prepare_variant` with ``cfg.variant``) on ``dataset``.

    The model is trained in place (Opacus' wrapper shares its parameters). The plain
    variant runs the same loss and optimiser without clipping, noise or accounting.
    """
    import torch
    from torch.utils.data import DataLoader

    if len(dataset) == 0:
        raise InvalidInputError("dataset", "no frames to train on")
    torch.manual_seed(cfg.seed)
    private = cfg.variant != "plain"
    criterion = model.init_criterion()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum)
    loader = DataLoader(
        dataset,
        batch_size=min(cfg.batch, len(dataset)),
        shuffle=True,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    engine = None
    net = model
    if private:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        net, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            loss_reduction="mean",
            grad_sample_mode=cfg.grad_sample_mode,
        )
    sample_rate = min(cfg.batch, len(dataset)) / len(dataset)
    epochs: list[EpochRecord] = []
    steps = 0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        set_train_mode(model, cfg.variant)
        t0, epoch_steps, seen, loss_sum = time.perf_counter(), 0, 0, 0.0
        for batch in loader:
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if not isinstance(batch, dict) or len(batch.get("img", ())) == 0:
                _empty_noise_step(model, optimizer)
            else:
                loss, per_frame = per_frame_loss(criterion, net(_images(batch)), batch)
                if not torch.isfinite(loss):
                    raise InvalidInputError("loss", f"non-finite training loss at step {steps}")
                loss.backward()
                optimizer.step()
                seen += len(per_frame)
                loss_sum += float(per_frame.sum())
            steps += 1
            epoch_steps += 1
        eps = float(engine.get_epsilon(cfg.delta)) if engine is not None and steps else None
        epochs.append(
            EpochRecord(
                epoch=epoch,
                steps=epoch_steps,
                frames_seen=seen,
                seconds=time.perf_counter() - t0,
                mean_loss=loss_sum / seen if seen else math.nan,
                epsilon=eps,
            )
        )
        logger.info("%s epoch %d: %s", cfg.variant, epoch, epochs[-1])
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    if engine is not None:
        if hasattr(net, "remove_hooks"):
            net.remove_hooks()  # leave the caller's module as it was
        for p in model.parameters():
            p.grad_sample = None
    model.eval()
    seconds = time.perf_counter() - started
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return PrivateTrainResult(
        variant=cfg.variant,
        private=private,
        frames=len(dataset),
        sample_rate=sample_rate,
        steps=steps,
        seconds=seconds,
        seconds_per_step=seconds / steps if steps else math.nan,
        epochs=epochs,
        epsilon=epochs[-1].epsilon if private and epochs else None,
        delta=cfg.delta if private else None,
        trainable_parameters=sum(p.numel() for p in trainable),
        frozen_parameters=n_frozen,
    )


def _foldable_for_val(model: Any) -> Any:
    """A copy Ultralytics can validate: GroupNorm moved into the conv's slot.

    Ultralytics fuses every ``Conv.bn`` into its conv before inference, which only BatchNorm
    allows; a GroupNorm (per-frame statistics) cannot be folded, so it is kept as
    ``Sequential(conv, norm)`` and the module runs its fused path (``act(conv(x))``).
    """
    from torch import nn

    model = copy.deepcopy(model)
    for module in model.modules():
        norm = getattr(module, "bn", None)
        if isinstance(norm, nn.GroupNorm) and hasattr(module, "forward_fuse"):
            module.conv = nn.Sequential(module.conv, norm)
            delattr(module, "bn")
            module.forward = module.forward_fuse
    return model


def evaluate_detector(
    model: Any, data_yaml: Path, imgsz: int, batch: int = 8, split: str = "val"
) -> dict[str, float]:
    """Ultralytics' detection validation of an in-memory model: mAP50, mAP50-95, P, R."""
    configure_ultralytics()
    from ultralytics.models.yolo.detect import DetectionValidator

    args = {
        "data": str(data_yaml),
        "imgsz": imgsz,
        "batch": batch,
        "split": split,
        "device": "cpu",
        "plots": False,
        "verbose": False,
        "save_json": False,
        "workers": 0,
        "rect": False,
    }
    validator = DetectionValidator(args=args)
    stats = validator(model=_foldable_for_val(model).eval())
    keys = {
        "metrics/mAP50(B)": "mAP50",
        "metrics/mAP50-95(B)": "mAP50-95",
        "metrics/precision(B)": "precision",
        "metrics/recall(B)": "recall",
    }
    return {short: float(stats.get(long, 0.0)) for long, short in keys.items()}
