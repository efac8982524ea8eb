"""Per-frame embeddings from the detector's own backbone, cached by image hash and model version.

A frame's embedding is the global-average-pooled output of the backbone's last layer
(YOLO11: layer 10, C2PSA, 256 channels for the ``n`` scale), L2-normalised. It comes from
Ultralytics' ``YOLO.embed()`` (8.4: ``predict(..., embed=[layer])`` returns per-image pooled
vectors). Frames are letterboxed to a square ``imgsz`` (``rect=False``) so a frame's vector
does not depend on which other frames shared its batch.

Cache: one ``<cache_dir>/<model_version>.npz`` per model version, holding ``keys``
(image sha256), ``vectors`` and a JSON ``meta`` (model version, imgsz, layers). Only hashes
missing from it are computed; the file is rewritten atomically (temp file + ``os.replace``).
A cache written for another imgsz/layer set is ignored (and replaced); an unreadable cache
file is moved aside to ``<name>.corrupt-<n>`` with a warning, never silently deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.fsutil import atomic_path, sha256_file

logger = logging.getLogger(__name__)


class EmbeddingTable(BaseModel):
    """Embeddings of a set of frames: ``vectors[i]`` belongs to image ``keys[i]`` (sha256)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_version: str
    imgsz: int
    layers: list[int]
    keys: list[str]
    vectors: np.ndarray = Field(description="(n, dim) float32, rows L2-normalised")
    images: list[Path] = Field(default_factory=list, description="Image of each key, in order.")
    computed: int = Field(default=0, description="How many were computed now (not cached).")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def get(self, sha256: str) -> np.ndarray:
        try:
            return self.vectors[self.keys.index(sha256)]
        except ValueError:
            raise KeyError(sha256) from None

    def matrix(self, shas: Sequence[str]) -> np.ndarray:
        """Rows for ``shas`` in that order (KeyError for an unknown hash)."""
        index = {k: i for i, k in enumerate(self.keys)}
        missing = [s for s in shas if s not in index]
        if missing:
            raise KeyError(f"{len(missing)} hash(es) not in the table, e.g. {missing[0]}")
        return self.vectors[[index[s] for s in shas]] if shas else np.zeros((0, self.dim))


def cache_path(cache_dir: Path, model_version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_version).lstrip(".") or "_"
    return Path(cache_dir) / f"{safe}.npz"


def _load_cache(path: Path, meta_want: dict) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            keys = [str(k) for k in z["keys"]]
            vecs = np.asarray(z["vectors"], dtype=np.float32)
        if len(keys) != len(vecs):
            raise ValueError(f"{len(keys)} keys but {len(vecs)} vectors")
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is moved aside, not trusted
        n = 0
        while (aside := path.with_name(f"{path.name}.corrupt-{n}")).exists():
            n += 1
        os.replace(path, aside)
        logger.warning("embedding cache %s is unreadable (%s); moved aside to %s", path, exc, aside)
        return {}
    if meta != meta_want:
        logger.warning(
            "embedding cache %s was written for %s, not %s; recomputing", path, meta, meta_want
        )
        return {}
    return dict(zip(keys, vecs))


def _save_cache(path: Path, table: dict[str, np.ndarray], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(table)
    vecs = np.stack([table[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0))
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to other names
        np.savez(
            tmp, keys=np.array(keys, dtype="U64"), vectors=vecs, meta=np.array(json.dumps(meta))
        )


def backbone_last_layer(model) -> int:
    """Index of the backbone's last layer of an Ultralytics DetectionModel (from its YAML)."""
    yaml_cfg = getattr(model, "yaml", None) or {}
    backbone = yaml_cfg.get("backbone")
    if backbone:
        return len(backbone) - 1
    return len(model.model) - 2  # Ultralytics' own default for embed()


def compute_embeddings(
    model_path: Path,
    images: Sequence[Path],
    *,
    imgsz: int,
    cache_dir: Path,
    model_version: str,
    batch: int = 8,
    layers: Sequence[int] | None = None,
    device: str = "cpu",
) -> EmbeddingTable:
    """Embeddings of ``images`` (in order; duplicates share a row), computing only cache misses.

    Raises ``MissingDataError`` for a missing image or model and ``InvalidInputError`` naming
    the file for an image that does not decode; in both cases the cache is left unchanged.
    """
    if not model_version:
        raise ValueError("model_version must be a non-empty string")
    images = [Path(p) for p in images]
    shas: list[str] = []
    for p in images:
        if not p.is_file():
            raise MissingDataError(f"image not found: {p}", p)
        shas.append(sha256_file(p))

    model = None
    if layers is None:
        model = _load_model(model_path)
        layers = [backbone_last_layer(model.model)]
    meta = {"model_version": model_version, "imgsz": int(imgsz), "layers": [int(x) for x in layers]}
    path = cache_path(Path(cache_dir), model_version)
    cached = _load_cache(path, meta)

    todo: dict[str, Path] = {}
    for sha, p in zip(shas, images):
        if sha not in cached and sha not in todo:
            todo[sha] = p
    logger.info(
        "embeddings (%s): %d frames, %d cached, %d to compute",
        model_version,
        len(images),
        len(set(shas)) - len(todo),
        len(todo),
    )
    fresh: dict[str, np.ndarray] = {}
    if todo:
        model = model or _load_model(model_path)
        items = list(todo.items())
        for s in tqdm(range(0, len(items), batch), desc="embeddings", unit="batch", leave=False):
            chunk = items[s : s + batch]
            arrays = []
            for _, p in chunk:
                im = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if im is None:
                    raise InvalidInputError(p, "image does not decode (cannot embed it)")
                arrays.append(im)
            out = model.embed(
                arrays, imgsz=imgsz, embed=list(layers), rect=False, device=device, verbose=False
            )
            for (sha, _), v in zip(chunk, out):
                v = v.detach().float().cpu().numpy().reshape(-1)
                fresh[sha] = (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
        _save_cache(path, {**cached, **fresh}, meta)
    table = {**cached, **fresh}
    return EmbeddingTable(
        model_version=model_version,
        imgsz=int(imgsz),
        layers=list(meta["layers"]),
        keys=shas,
        vectors=np.stack([table[s] for s in shas]) if shas else np.zeros((0, 0), np.float32),
        images=images,
        computed=len(fresh),
    )


def _load_model(model_path: Path):
    from ultralytics import YOLO

    model_path = Path(model_path)
    if not model_path.is_file():
        raise MissingDataError(f"model file not found: {model_path}", model_path)
    if model_path.suffix != ".pt":
        raise InvalidInputError(model_path, "embeddings need a PyTorch .pt model (layer outputs)")
    try:
        return YOLO(str(model_path), task="detect")
    except Exception as exc:
        raise InvalidInputError(model_path, f"Ultralytics cannot load the model ({exc})") from exc


__all__ = [
    "EmbeddingTable",
    "backbone_last_layer",
    "cache_path",
    "compute_embeddings",
]
