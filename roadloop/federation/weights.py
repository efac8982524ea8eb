"""A detector's weights as named float32 arrays, the currency of the federation.

Flower moves numpy arrays; Ultralytics trains, validates and exports ``DetectionModel``s
loaded from ``.pt`` checkpoints. This module converts between the two: the model's
``state_dict`` as ``{name: float32 array}`` (parameters and normalisation statistics,
without integer counters), loading such arrays back with every key, shape and value
checked, and writing them as a checkpoint Ultralytics loads like any trained one.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from copy import deepcopy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.fsutil import atomic_path
from roadloop.models.training import (
    adapt_checkpoint_to_taxonomy,
    configure_ultralytics,
    load_source_class_map,
)

logger = logging.getLogger(__name__)


def _names_list(model: Any) -> list[str]:
    names = getattr(model, "names", None) or {}
    if isinstance(names, dict):
        return [str(names[i]) for i in sorted(names)]
    return [str(n) for n in names]


def _load(checkpoint: Path) -> Any:
    from ultralytics.nn.tasks import load_checkpoint

    try:
        model, _ = load_checkpoint(checkpoint)
    except Exception as exc:
        raise InvalidInputError(
            checkpoint, f"not a loadable Ultralytics checkpoint: {exc}"
        ) from exc
    return model


def load_detection_model(checkpoint: Path, class_names: list[str] | None = None) -> Any:
    """The Ultralytics ``DetectionModel`` (fp32, eval mode) of ``checkpoint``.

    With ``class_names`` different from the checkpoint's, the class head is re-mapped the way
    ``train_detector`` does it (taxonomy source map, :func:`adapt_checkpoint_to_taxonomy`);
    the adapted file lives in a temporary folder only while it is loaded.
    """
    configure_ultralytics()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise MissingDataError(f"checkpoint not found: {checkpoint}", checkpoint)
    model = _load(checkpoint)
    src_names = _names_list(model)
    if class_names is None or list(class_names) == src_names:
        return model
    class_names = [str(n) for n in class_names]
    class_map = load_source_class_map(src_names, class_names)
    with tempfile.TemporaryDirectory(prefix="roadloop-adapt-") as tmp:
        adapted = adapt_checkpoint_to_taxonomy(
            checkpoint, class_names, class_map, Path(tmp) / "adapted.pt"
        )
        model = _load(adapted)
    model.pt_path = str(checkpoint)
    return model


def state_arrays(model: Any) -> dict[str, np.ndarray]:
    """Every floating-point tensor of ``model.state_dict()`` as float32 numpy, in that order.

    Parameters and normalisation buffers (running mean/var); integer buffers such as
    ``num_batches_tracked`` are left out (they are counters, not weights to average).
    """
    return {
        name: t.detach().to("cpu", copy=True).float().numpy()
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }


def norm_layer_keys(model: Any) -> set[str]:
    """The array keys of normalisation layers (BatchNorm*, GroupNorm, LayerNorm), for FedBN."""
    from torch import nn

    kinds = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    keys: set[str] = set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                keys.add(prefix + name)
    return keys


def load_arrays(
    model: Any,
    arrays: Mapping[str, np.ndarray],
    *,
    skip: set[str] | frozenset[str] = frozenset(),
    origin: str | Path = "weight arrays",
) -> None:
    """Copy ``arrays`` into ``model`` in place (every key of :func:`state_arrays` but ``skip``).

    Everything is checked before anything is written: a missing or unexpected key, a wrong
    shape or a non-finite value raises :class:`InvalidInputError` naming ``origin`` and the
    first offending keys, and leaves the model untouched.
    """
    import torch

    targets = {k: t for k, t in model.state_dict().items() if t.is_floating_point()}
    wanted = [k for k in targets if k not in skip]
    missing = [k for k in wanted if k not in arrays]
    unexpected = [k for k in arrays if k not in targets]
    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    values: dict[str, np.ndarray] = {}
    bad_shape: list[str] = []
    not_finite: list[str] = []
    for key in wanted:
        if key not in arrays:
            continue
        try:
            value = np.asarray(arrays[key], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            problems.append(f"{key}: not numeric ({exc})")
            continue
        if tuple(value.shape) != tuple(targets[key].shape):
            bad_shape.append(f"{key} {tuple(value.shape)} != {tuple(targets[key].shape)}")
        elif not np.isfinite(value).all():
            not_finite.append(key)
        else:
            values[key] = value
    if bad_shape:
        problems.append(f"{len(bad_shape)} wrong shapes (e.g. {bad_shape[:3]})")
    if not_finite:
        problems.append(f"{len(not_finite)} arrays with NaN/Inf (e.g. {not_finite[:3]})")
    if problems:
        raise InvalidInputError(origin, "; ".join(problems))
    with torch.no_grad():
        for key, value in values.items():
            target = targets[key]
            target.copy_(torch.from_numpy(value).to(device=target.device, dtype=target.dtype))


def save_checkpoint(
    arrays: Mapping[str, np.ndarray],
    template_checkpoint: Path,
    dest: Path,
    *,
    class_names: list[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``arrays`` as an Ultralytics checkpoint at ``dest`` (atomically).

    The architecture and training arguments come from ``template_checkpoint`` (re-headed for
    ``class_names`` when they differ); every weight comes from ``arrays``. ``YOLO(dest)``
    then loads, predicts, validates and exports it like a trained checkpoint, with
    ``names``/``nc`` equal to ``class_names``. The model is stored in float32 (Ultralytics
    stores fp16) so a saved global model reloads to exactly the arrays that were aggregated;
    ``meta`` is kept under the ``roadloop_federation`` key.
    """
    import torch
    from ultralytics import __version__

    template_checkpoint, dest = Path(template_checkpoint), Path(dest)
    model = load_detection_model(template_checkpoint, class_names)
    load_arrays(model, arrays)
    names = _names_list(model)
    model.names = dict(enumerate(names))
    model.nc = len(names)
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = len(names)
    ckpt = torch.load(template_checkpoint, map_location="cpu", weights_only=False)
    train_args = {k: v for k, v in (ckpt.get("train_args") or {}).items() if k != "data"}
    model.args = {k: v for k, v in (getattr(model, "args", None) or {}).items() if k != "data"}
    out = {
        "date": datetime.now(UTC).isoformat(),
        "version": __version__,
        "license": ckpt.get("license", "AGPL-3.0 License (https://ultralytics.com/license)"),
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": deepcopy(model).float().eval(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        "train_metrics": {},
        "roadloop_federation": {
            "template_checkpoint": str(template_checkpoint),
            "class_names": names,
            **(meta or {}),
        },
    }
    with atomic_path(dest, parents=True) as tmp:
        torch.save(out, tmp)
    logger.info("wrote federated checkpoint %s (%d arrays, classes %s)", dest, len(arrays), names)
    return dest


def arrays_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays' data (what one model transfer costs, before framing)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
