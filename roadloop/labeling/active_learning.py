"""Active learning: which unlabelled frames annotators should review first.

Three scores per candidate frame, each in ``[0, 1]`` (higher = more worth labelling):

* **uncertainty** — from the current model's detection confidences on the frame
  (:func:`uncertainty_score`). A detection confidence ``p`` is Ultralytics' per-class
  sigmoid score of the predicted class, so each box is a binary "is it this class?" call:
  ``least_confidence = 1 - p``, ``margin = 1 - |2p - 1|`` (1 at ``p = 0.5``),
  ``entropy = H(p) / ln 2``. **Per-frame aggregation:** the mean of the ``top_k`` (3) most
  uncertain boxes — one ambiguous vehicle matters even among many confident ones, and the
  top-3 mean is less noisy than the single max. **A frame with no detections** scores
  ``empty_score`` (default 1.0): on a traffic camera an empty prediction is more often a
  miss (new domain, night) than an empty road, so it is worth a look. Predictions for
  scoring should be taken at a low confidence threshold (``SCORING_CONF``) so that the
  uncertain boxes are there to be seen.
* **diversity** — selection-aware k-center coverage: the Euclidean distance (on
  L2-normalised embeddings) from the candidate to the nearest frame that is *already
  labelled or already picked into this queue*, updated after every pick and divided by
  the largest such distance before the first pick. A frame just like one already chosen
  drops to ~0, so the queue does not fill with near-copies of one hard scene.
* **rarity** — :func:`rarity_score`: rare predicted classes (against the labelled set's box
  counts per class), rare cameras and rare conditions (day/night ...) against the labelled
  frames' counts.

``combined`` (the default strategy) picks greedily by
``w_u·uncertainty + w_d·diversity + w_r·rarity`` (``ALWeights``, default 0.4/0.3/0.3),
recomputing diversity after every pick. ``uncertainty`` ranks by uncertainty alone and
``random`` is a seeded shuffle: both exist for the label-efficiency benchmark.

**Per-camera fairness:** every camera with candidates is guaranteed
``min(its candidates, floor(per_camera_min_share · budget))`` slots (default share
``0.5 / n_cameras``: half the budget is spread evenly, the rest goes by score); when the
remaining slots are exactly what the unmet floors still need, only cameras below their
floor may be picked.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from roadloop.data.frame_records import Detection

logger = logging.getLogger(__name__)

UncertaintyMethod = Literal["margin", "entropy", "least_confidence"]
Strategy = Literal["random", "uncertainty", "combined"]
STRATEGIES: tuple[str, ...] = ("random", "uncertainty", "combined")

SCORING_CONF = 0.05
"""Confidence threshold for the predictions the queue is scored from (keeps uncertain boxes)."""
PREANNOTATION_CONF = 0.25
"""Boxes at or above this confidence are attached to queue rows as pre-annotations."""


# --------------------------------------------------------------------------- inputs


class FramePrediction(BaseModel):
    """The current model's view of one unlabelled frame."""

    frame_id: str
    camera_id: str
    image: Path
    detections: list[Detection] = Field(default_factory=list)
    conditions: list[str] = Field(
        default_factory=list, description='Condition tags, e.g. ["night"], ["day", "rain"].'
    )
    model_version: str | None = None
    sha256: str | None = None


class ALWeights(BaseModel):
    """Weights of the combined score; they need not sum to 1 (the total is their weighted sum)."""

    model_config = ConfigDict(frozen=True)

    uncertainty: float = Field(default=0.4, ge=0.0)
    diversity: float = Field(default=0.3, ge=0.0)
    rarity: float = Field(default=0.3, ge=0.0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> ALWeights:
        if self.uncertainty + self.diversity + self.rarity <= 0:
            raise ValueError("at least one AL weight must be > 0")
        return self


# --------------------------------------------------------------------------- scores


def _box_uncertainty(p: np.ndarray, method: str) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 0.0, 1.0)
    if method == "least_confidence":
        return 1.0 - p
    if method == "margin":
        return 1.0 - np.abs(2.0 * p - 1.0)
    if method == "entropy":
        q = np.clip(p, 1e-12, 1 - 1e-12)
        return -(q * np.log(q) + (1 - q) * np.log(1 - q)) / math.log(2.0)
    raise ValueError(f"unknown uncertainty method {method!r}; use margin|entropy|least_confidence")


def uncertainty_score(
    confidences: Sequence[float] | np.ndarray,
    method: UncertaintyMethod = "margin",
    *,
    top_k: int = 3,
    empty_score: float = 1.0,
) -> float:
    """Frame uncertainty in [0, 1]: mean of the ``top_k`` most uncertain boxes' scores.

    See the module docstring for the per-box formulas; an empty frame gets ``empty_score``.
    """
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if conf.size == 0:
        return float(empty_score)
    if not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be finite")
    per_box = np.sort(_box_uncertainty(conf, method))[::-1]
    return float(per_box[: max(1, top_k)].mean())


def _rarity_table(counts: Mapping[str, float] | None) -> dict[str, float]:
    """1 - count/max_count per key (most common → 0); keys absent from ``counts`` are rare (1)."""
    if not counts:
        return {}
    top = max(float(v) for v in counts.values())
    if top <= 0:
        return {}
    return {k: 1.0 - float(v) / top for k, v in counts.items()}


def rarity_score(
    prediction: FramePrediction,
    class_frequencies: Mapping[str, float],
    camera_frequencies: Mapping[str, float] | None = None,
    condition_frequencies: Mapping[str, float] | None = None,
    *,
    conf: float = PREANNOTATION_CONF,
    parts: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> float:
    """Rarity in [0, 1] of a frame against what is already labelled.

    ``class_frequencies``: labelled boxes per class name; ``camera_frequencies`` /
    ``condition_frequencies``: labelled frames per camera / condition tag (counts or shares).
    Each key's rarity is ``1 - count / max count`` (unseen = 1). The frame's class rarity is
    the max over its detections at ``conf`` or above (0 with none); camera rarity is its
    camera's; condition rarity the max over its tags (0 with none). A part whose frequency
    table is empty or None is left out and the ``parts`` weights are renormalised.
    """
    pieces: list[tuple[float, float]] = []
    cls_tab = _rarity_table(class_frequencies)
    if cls_tab or class_frequencies is not None:
        names = {d.class_name for d in prediction.detections if d.confidence >= conf}
        pieces.append((parts[0], max((cls_tab.get(n, 1.0) for n in names), default=0.0)))
    cam_tab = _rarity_table(camera_frequencies)
    if cam_tab:
        pieces.append((parts[1], cam_tab.get(prediction.camera_id, 1.0)))
    cond_tab = _rarity_table(condition_frequencies)
    if cond_tab:
        r = max((cond_tab.get(c, 1.0) for c in prediction.conditions), default=0.0)
        pieces.append((parts[2], r))
    total_w = sum(w for w, _ in pieces)
    if total_w <= 0:
        return 0.0
    return float(sum(w * r for w, r in pieces) / total_w)


def _min_dist_to(points: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Euclidean distance from each row of ``points`` to its nearest row of ``centres``."""
    if len(centres) == 0:
        return np.full(len(points), np.inf)
    out = np.empty(len(points))
    c2 = (centres**2).sum(1)
    for s in range(0, len(points), chunk):
        p = points[s : s + chunk]
        d2 = (p**2).sum(1)[:, None] + c2[None, :] - 2.0 * p @ centres.T
        out[s : s + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def _dist_to_one(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((points - centre[None, :]) ** 2).sum(1), 0.0))


def _as_matrix(x: np.ndarray | None, name: str, dim: int | None = None) -> np.ndarray:
    if x is None:
        return np.zeros((0, dim or 0))
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, dim if dim is not None else (a.shape[1] if a.ndim == 2 else 0)))
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has dimension {a.shape[1]}, expected {dim}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


def k_center_greedy(
    candidates: np.ndarray, labelled: np.ndarray | None, k: int, *, seed: int | None = None
) -> list[int]:
    """Greedy k-center (Sener & Savarese 2018): ``k`` candidate indices that cover the set.

    Each pick is the candidate farthest from everything labelled or already picked, so the
    covering radius (max over candidates of the distance to the nearest labelled/picked
    point) never increases. With nothing labelled, the first pick is the candidate nearest
    the candidates' mean (a representative start), or a seeded random one when ``seed`` is
    given.
    """
    cand = _as_matrix(candidates, "candidates")
    if k < 0:
        raise ValueError("k must be >= 0")
    k = min(k, len(cand))
    if k == 0:
        return []
    lab = _as_matrix(labelled, "labelled", cand.shape[1])
    min_d = _min_dist_to(cand, lab)
    picked: list[int] = []
    if len(lab) == 0:
        if seed is None:
            first = int(np.argmin(_dist_to_one(cand, cand.mean(0))))
        else:
            first = int(np.random.default_rng(seed).integers(len(cand)))
        picked.append(first)
        min_d = np.minimum(min_d, _dist_to_one(cand, cand[first]))
    while len(picked) < k:
        d = min_d.copy()
        d[picked] = -1.0
        nxt = int(np.argmax(d))
        picked.append(nxt)
        min_d = np.minimum(min_d, _dist_to_one(cand, cand[nxt]))
    return picked


def covering_radius(candidates: np.ndarray, centres: np.ndarray) -> float:
    """Max over candidates of the distance to the nearest centre (k-center objective)."""
    cand = _as_matrix(candidates, "candidates")
    return float(_min_dist_to(cand, _as_matrix(centres, "centres", cand.shape[1])).max())


# --------------------------------------------------------------------------- queue


class ScoreBreakdown(BaseModel):
    uncertainty: float
    diversity: float
    rarity: float
    total: float


class QueueRow(BaseModel):
    """One frame in the review queue, best first (``rank`` 1)."""

    rank: int
    frame_id: str
    camera_id: str
    image: Path
    conditions: list[str] = Field(default_factory=list)
    scores: ScoreBreakdown
    pre_annotations: list[Detection] = Field(
        default_factory=list, description="Model predictions at PREANNOTATION_CONF or above."
    )
    model_version: str | None = None


class ALQueue(BaseModel):
    """The review queue for one run of :func:`build_queue`."""

    strategy: str
    weights: ALWeights
    budget: int
    n_candidates: int
    uncertainty_method: str
    camera_floors: dict[str, int] = Field(default_factory=dict)
    rows: list[QueueRow] = Field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def frame_ids(self) -> list[str]:
        return [r.frame_id for r in self.rows]

    def histogram(self, component: str = "total", bins: int = 10) -> dict[str, list[float]]:
        """Histogram of one score component over the queued rows: ``{"edges", "counts"}``."""
        if component not in ScoreBreakdown.model_fields:
            raise ValueError(f"unknown score component {component!r}")
        vals = np.array([getattr(r.scores, component) for r in self.rows], dtype=float)
        hi = max(1.0, float(vals.max())) if vals.size else 1.0
        counts, edges = np.histogram(vals, bins=bins, range=(0.0, hi))
        return {"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]}

    def per_camera(self) -> dict[str, int]:
        """Queued frames per camera."""
        return dict(sorted(Counter(r.camera_id for r in self.rows).items()))

    def expected_class_mix(self) -> dict[str, float]:
        """Expected objects per class in the queue: sum of pre-annotation confidences."""
        mix: dict[str, float] = {}
        for r in self.rows:
            for d in r.pre_annotations:
                mix[d.class_name] = mix.get(d.class_name, 0.0) + float(d.confidence)
        return dict(sorted(mix.items(), key=lambda kv: -kv[1]))

    def to_markdown(self, top: int = 20) -> str:
        lines = [
            (
                f"Review queue: {len(self.rows)} of {self.n_candidates} candidate frames "
                f"(strategy `{self.strategy}`, budget {self.budget}, weights "
                f"u={self.weights.uncertainty} d={self.weights.diversity} r={self.weights.rarity})."
            ),
            "",
            "| camera | queued |",
            "|---|---|",
            *[f"| {c} | {n} |" for c, n in self.per_camera().items()],
            "",
            "| rank | camera | frame | uncertainty | diversity | rarity | total | boxes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows[:top]:
            s = r.scores
            lines.append(
                f"| {r.rank} | {r.camera_id} | {r.frame_id} | {s.uncertainty:.3f} | "
                f"{s.diversity:.3f} | {s.rarity:.3f} | {s.total:.3f} | {len(r.pre_annotations)} |"
            )
        return "\n".join(lines) + "\n"


def _camera_floors(
    cameras: list[str], budget: int, per_camera_min_share: float | None
) -> dict[str, int]:
    avail = Counter(cameras)
    if not avail:
        return {}
    share = 0.5 / len(avail) if per_camera_min_share is None else per_camera_min_share
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"per_camera_min_share must be in [0, 1], got {share}")
    floor = math.floor(share * budget)
    floors = {c: min(n, floor) for c, n in avail.items()}
    # Floors must fit in the budget (share > 1/n_cameras): scale them down, largest first.
    while sum(floors.values()) > budget:
        c = max(floors, key=lambda k: (floors[k], k))
        floors[c] -= 1
    return floors


def build_queue(
    predictions: Sequence[FramePrediction],
    embeddings: np.ndarray | None,
    labelled_embeddings: np.ndarray | None,
    class_frequencies: Mapping[str, float],
    *,
    weights: ALWeights | None = None,
    budget: int = 1000,
    strategy: Strategy = "combined",
    per_camera_min_share: float | None = None,
    camera_frequencies: Mapping[str, float] | None = None,
    condition_frequencies: Mapping[str, float] | None = None,
    uncertainty_method: UncertaintyMethod = "margin",
    preannotation_conf: float = PREANNOTATION_CONF,
    seed: int = 0,
) -> ALQueue:
    """Rank unlabelled frames for review and keep the best ``budget`` (see module docstring).

    ``embeddings[i]`` belongs to ``predictions[i]`` (required for ``combined``; rows are
    L2-normalised here); ``labelled_embeddings`` are the already-labelled frames'. Ties are
    broken by a seeded shuffle, so ``seed`` matters only for ties and for ``random``.
    """
    weights = weights or ALWeights()
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if budget < 0:
        raise ValueError("budget must be >= 0")
    preds = list(predictions)
    n = len(preds)
    ids = [(p.camera_id, p.frame_id) for p in preds]
    if len(set(ids)) != n:
        dup = [k for k, c in Counter(ids).items() if c > 1][:3]
        raise ValueError(f"duplicate (camera_id, frame_id) in predictions, e.g. {dup}")
    rng = np.random.default_rng(seed)

    unc = np.array(
        [uncertainty_score([d.confidence for d in p.detections], uncertainty_method) for p in preds]
    )
    rar = np.array(
        [
            rarity_score(p, class_frequencies, camera_frequencies, condition_frequencies)
            for p in preds
        ]
    )
    if embeddings is not None and n:
        emb = _as_matrix(embeddings, "embeddings")
        if len(emb) != n:
            raise ValueError(f"embeddings has {len(emb)} rows but there are {n} predictions")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        lab = _as_matrix(labelled_embeddings, "labelled_embeddings", emb.shape[1])
        lab = (
            lab / np.maximum(np.linalg.norm(lab, axis=1, keepdims=True), 1e-12) if len(lab) else lab
        )
        min_d = _min_dist_to(emb, lab)
    elif strategy == "combined" and weights.diversity > 0 and n:
        raise ValueError("strategy 'combined' with a diversity weight needs embeddings")
    else:
        emb, min_d = None, np.full(n, np.inf)
    # Diversity is divided by the largest nearest-distance before the first pick; with
    # nothing labelled every frame is equally new (1.0) and the scale is taken after the
    # first pick, so diversity stays in [0, 1] (distances only shrink as picks are added).
    finite = np.isfinite(min_d)
    scale: float | None = float(min_d[finite].max()) if finite.any() else None

    def div_now() -> np.ndarray:
        if scale is None or scale <= 0:
            return np.where(np.isfinite(min_d), 0.0, 1.0)
        return np.where(np.isfinite(min_d), min_d / scale, 1.0)

    floors = _camera_floors([p.camera_id for p in preds], min(budget, n), per_camera_min_share)
    cams = np.array([p.camera_id for p in preds], dtype=object)
    order = rng.permutation(n)  # tie-break order (and the random strategy's order)
    picked_cnt: Counter = Counter()
    chosen = np.zeros(n, dtype=bool)
    rows: list[QueueRow] = []
    static_div = div_now()
    k = min(budget, n)
    for _ in range(k):
        remaining = k - len(rows)
        deficit = {c: f - picked_cnt[c] for c, f in floors.items() if f - picked_cnt[c] > 0}
        allowed = ~chosen
        if deficit and remaining <= sum(deficit.values()):
            allowed &= np.isin(cams, list(deficit))
        if strategy == "random":
            score = np.zeros(n)
            div = static_div
        elif strategy == "uncertainty":
            score = unc.copy()
            div = static_div
        else:
            div = div_now()
            score = weights.uncertainty * unc + weights.diversity * div + weights.rarity * rar
        masked = np.where(allowed, score, -np.inf)[order]
        i = int(order[int(np.argmax(masked))])
        chosen[i] = True
        picked_cnt[preds[i].camera_id] += 1
        total = float(
            weights.uncertainty * unc[i] + weights.diversity * div[i] + weights.rarity * rar[i]
        )
        p = preds[i]
        rows.append(
            QueueRow(
                rank=len(rows) + 1,
                frame_id=p.frame_id,
                camera_id=p.camera_id,
                image=p.image,
                conditions=list(p.conditions),
                scores=ScoreBreakdown(
                    uncertainty=float(unc[i]),
                    diversity=float(div[i]),
                    rarity=float(rar[i]),
                    total=total,
                ),
                pre_annotations=[d for d in p.detections if d.confidence >= preannotation_conf],
                model_version=p.model_version,
            )
        )
        if emb is not None:
            min_d = np.minimum(min_d, _dist_to_one(emb, emb[i]))
            if scale is None:
                scale = float(min_d.max())
    logger.info(
        "queue (%s): %d of %d frames, per camera %s",
        strategy,
        len(rows),
        n,
        dict(Counter(r.camera_id for r in rows)),
    )
    return ALQueue(
        strategy=strategy,
        weights=weights,
        budget=budget,
        n_candidates=n,
        uncertainty_method=uncertainty_method,
        camera_floors=floors,
        rows=rows,
    )


# --------------------------------------------------------------------------- predictions


def predict_frames(
    model_path: Path,
    frames: Sequence[tuple[str, str, Path, list[str]]],
    *,
    imgsz: int,
    conf: float = SCORING_CONF,
    device: str = "cpu",
    batch: int = 8,
    model_version: str | None = None,
) -> list[FramePrediction]:
    """Run the detector on ``(frame_id, camera_id, image, conditions)`` tuples.

    Square ``imgsz`` letterbox (``rect=False``), as the deployed ONNX sees frames; boxes in
    the original image's pixels. Predictions are kept down to ``conf`` (low, for scoring).
    """
    from tqdm import tqdm
    from ultralytics import YOLO

    from roadloop.errors import InvalidInputError, MissingDataError

    model_path = Path(model_path)
    if not model_path.is_file():
        raise MissingDataError(f"model file not found: {model_path}", model_path)
    try:
        model = YOLO(str(model_path), task="detect")
    except Exception as exc:
        raise InvalidInputError(model_path, f"Ultralytics cannot load the model ({exc})") from exc
    names = model.names
    out: list[FramePrediction] = []
    frames = list(frames)
    for s in tqdm(range(0, len(frames), batch), desc="predict frames", unit="batch", leave=False):
        chunk = frames[s : s + batch]
        for fid, _, img, _ in chunk:
            if not Path(img).is_file():
                raise MissingDataError(f"frame {fid}: image not found: {img}", img)
        results = model.predict(
            source=[str(f[2]) for f in chunk],
            imgsz=imgsz,
            conf=conf,
            device=device,
            rect=False,
            verbose=False,
            save=False,
            batch=len(chunk),
        )
        for (fid, cam, img, conds), r in zip(chunk, results):
            dets: list[Detection] = []
            if r.boxes is not None and len(r.boxes):
                xyxy = r.boxes.xyxy.cpu().numpy()
                cls = r.boxes.cls.cpu().numpy().astype(int)
                cf = r.boxes.conf.cpu().numpy()
                for b, c, p in zip(xyxy, cls, cf):
                    dets.append(
                        Detection(
                            class_id=int(c),
                            class_name=str(names[int(c)]),
                            confidence=float(min(max(p, 0.0), 1.0)),
                            xyxy=tuple(float(v) for v in b),
                        )
                    )
            out.append(
                FramePrediction(
                    frame_id=fid,
                    camera_id=cam,
                    image=Path(img),
                    detections=dets,
                    conditions=list(conds),
                    model_version=model_version,
                )
            )
    return out


__all__ = [
    "PREANNOTATION_CONF",
    "SCORING_CONF",
    "STRATEGIES",
    "ALQueue",
    "ALWeights",
    "FramePrediction",
    "QueueRow",
    "ScoreBreakdown",
    "build_queue",
    "covering_radius",
    "k_center_greedy",
    "predict_frames",
    "rarity_score",
    "uncertainty_score",
]
