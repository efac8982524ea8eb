"""Drift features of one window, read from the heartbeats the camera sent in it.

A heartbeat (``edge_agent.heartbeat``) carries fixed-bin histograms of per-frame and per-box
quantities. Summing them over a window gives that window's *distribution* of each quantity
over hundreds or thousands of frames — a sample large enough for a distribution test,
where the per-heartbeat means (a few dozen rows per window) are not.

=======================  ==========  =====================  ==========================
feature                  kind        heartbeat field        what a change means
=======================  ==========  =====================  ==========================
brightness               input       brightness_histogram   light, night, exposure
sharpness                input       sharpness_histogram    focus, fog, rain, noise
detections_per_frame     output      detections_histogram   traffic or a blind model
confidence               output      confidence_histogram   the model is less sure
class_mix                output      class_counts           new scene / new classes
low_confidence_share     performance confidence_histogram   share of boxes below 0.5
=======================  ==========  =====================  ==========================

Numeric features are scaled to ``[0, 1]`` over their histogram's full range (detections on
a ``log1p`` scale, where 2 → 4 boxes matters as much as 20 → 40), so one distance threshold
means the same for every feature and does not depend on how noisy a camera's reference was.

Heartbeats are checked field by field: a malformed or absurd histogram (wrong length,
negative or non-integer counts, edges that differ from the window's others, more frames
than the heartbeat processed, or a per-frame histogram in a heartbeat whose
``frames_processed`` is missing or absurd, so that bound cannot be checked, edges outside the
feature's physical range ``EDGE_RANGES`` or that give no finite [0, 1] scale) is left out of
that feature with a reason, never guessed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

FeatureKind = Literal["input", "output", "performance"]

LOW_CONFIDENCE_BELOW = 0.5
"""Boxes under this confidence count as low-confidence (the agent drops boxes < 0.25)."""

_MAX_COUNT = 10**9  # per bin per heartbeat: far beyond any real window
MAX_BOXES_PER_FRAME = 300
"""The agent keeps at most 300 boxes a frame (its NMS ``max_det``): more is not a real count."""

EDGE_RANGES: dict[str, tuple[float, float]] = {
    # mean grey level of an 8-bit frame, 0..255; the agent's last edge is 256 (the right edge
    # of its last bin, edge_agent.heartbeat.BRIGHTNESS_BIN_EDGES)
    "brightness_histogram": (0.0, 256.0),
    # log10(1 + variance of the Laplacian) of an 8-bit grey frame: under 7 whatever the
    # kernel (the agent's edges span 0..5)
    "sharpness_histogram": (0.0, 10.0),
    # boxes per frame: a count, so >= 0; the agent's edges end at 100 and keep 300 a frame
    "detections_histogram": (0.0, 1000.0),
    "confidence_histogram": (0.0, 1.0),  # a box's confidence
}
"""The physical range of each heartbeat histogram's bin edges: the drift monitor leaves out a
histogram with an edge outside it (a ``log1p`` of -1, midpoints of 1e308 edges: no scale),
and the gateway refuses it (``fleet.heartbeat_plausibility``, the per-frame histograms)."""


def edges_problem(field: str, edges: list[float]) -> str | None:
    """Why finite, increasing ``edges`` of heartbeat histogram ``field`` are outside its
    physical range (``EDGE_RANGES``), or None."""
    lo, hi = EDGE_RANGES[field]
    if edges[0] < lo or edges[-1] > hi:
        return (f"edges must lie within [{lo:g}, {hi:g}] (got {edges[0]:g} .. "
                f"{edges[-1]:g})")
    return None


@dataclass(frozen=True)
class HistogramFeature:
    """A numeric feature carried as a fixed-bin histogram in each heartbeat."""

    name: str
    field: str
    kind: FeatureKind
    unit: Literal["frames", "boxes"]
    transform: Literal["linear", "log1p"] = "linear"

    def unit_values(self, edges: np.ndarray) -> np.ndarray:
        """Each bin's representative value scaled to [0, 1] over the histogram's range."""
        lo, hi = edges[:-1], edges[1:]
        width1 = (hi - lo) <= 1.0 + 1e-9
        # integer-count bins of width 1 hold exactly their left edge (0, 1, 2 boxes ...)
        centres = np.where(width1 & (self.unit == "frames") & (self.transform == "log1p"),
                           lo, (lo + hi) / 2.0)
        if self.transform == "log1p":
            f = np.log1p
            return (f(centres) - f(edges[0])) / (f(edges[-1]) - f(edges[0]))
        return (centres - edges[0]) / (edges[-1] - edges[0])


NUMERIC_FEATURES: tuple[HistogramFeature, ...] = (
    HistogramFeature("brightness", "brightness_histogram", "input", "frames"),
    HistogramFeature("sharpness", "sharpness_histogram", "input", "frames"),
    HistogramFeature("detections_per_frame", "detections_histogram", "output", "frames", "log1p"),
    HistogramFeature("confidence", "confidence_histogram", "output", "boxes"),
)
CLASS_MIX = "class_mix"
LOW_CONFIDENCE_SHARE = "low_confidence_share"
FEATURE_KINDS: dict[str, FeatureKind] = {
    **{f.name: f.kind for f in NUMERIC_FEATURES},
    CLASS_MIX: "output",
    LOW_CONFIDENCE_SHARE: "performance",
}


@dataclass
class Histogram:
    """Summed counts over fixed edges."""

    edges: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram(self.edges, self.counts + other.counts)

    def same_bins(self, other: Histogram) -> bool:
        return self.edges.shape == other.edges.shape and bool(np.allclose(self.edges, other.edges))


@dataclass
class WindowFeatures:
    """Everything the drift tests need from one window's heartbeats."""

    histograms: dict[str, Histogram] = field(default_factory=dict)
    class_counts: Counter[str] = field(default_factory=Counter)
    heartbeats: int = 0
    frames: int = 0
    skipped: list[str] = field(default_factory=list)  # "<heartbeat #>: <field>: <why>"

    def merged(self, other: WindowFeatures) -> WindowFeatures:
        """The features of both windows pooled (a reference is the pool of its windows)."""
        out = WindowFeatures(class_counts=self.class_counts + other.class_counts,
                             heartbeats=self.heartbeats + other.heartbeats,
                             frames=self.frames + other.frames,
                             skipped=[*self.skipped, *other.skipped])
        for name in {*self.histograms, *other.histograms}:
            a, b = self.histograms.get(name), other.histograms.get(name)
            if a is None or b is None:
                out.histograms[name] = a or b  # type: ignore[assignment]
            elif a.same_bins(b):
                out.histograms[name] = a + b
            else:  # cannot pool different bins: keep the larger, say so
                out.histograms[name] = a if a.total >= b.total else b
                out.skipped.append(f"{name}: windows used different bins; kept the larger")
        return out

    def samples(self, name: str) -> int:
        if name == CLASS_MIX:
            return sum(self.class_counts.values())
        if name == LOW_CONFIDENCE_SHARE:
            name = "confidence"
        h = self.histograms.get(name)
        return h.total if h is not None else 0

    def low_confidence_share(self) -> float | None:
        h = self.histograms.get("confidence")
        if h is None or h.total == 0:
            return None
        low = h.counts[h.edges[1:] <= LOW_CONFIDENCE_BELOW + 1e-9].sum()
        return float(low / h.total)


def finite_number(v: Any) -> float | None:
    """A JSON number that is finite and not a bool, as float; else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _histogram(raw: Any, frames: int | None,
               feature: HistogramFeature) -> tuple[Histogram | None, str | None]:
    unit = feature.unit
    if raw is None:
        return None, "absent"
    if not isinstance(raw, Mapping):
        return None, "not an object"
    edges, counts = raw.get("bin_edges"), raw.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list):
        return None, "bin_edges/counts are not lists"
    if not 2 <= len(edges) <= 257 or len(counts) != len(edges) - 1:
        return None, f"{len(counts)} counts for {len(edges)} edges"
    e = [finite_number(x) for x in edges]
    if any(x is None for x in e):
        return None, "non-numeric edge"
    ea = np.asarray(e, dtype=np.float64)
    if not np.all(np.diff(ea) > 0):
        return None, "edges not increasing"
    problem = edges_problem(feature.field, ea.tolist())
    if problem is not None:
        return None, problem
    with np.errstate(all="ignore"):
        scale = feature.unit_values(ea)
    if not (np.all(np.isfinite(scale)) and np.all((scale >= -1e-9) & (scale <= 1.0 + 1e-9))):
        return None, "edges give no finite [0, 1] scale"
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= _MAX_COUNT
               for c in counts):
        return None, "counts must be non-negative integers"
    ca = np.asarray(counts, dtype=np.int64)
    if frames is None:
        return None, "frames_processed missing or absurd, so its counts cannot be checked"
    if unit == "frames" and ca.sum() > frames:
        return None, f"{int(ca.sum())} frames counted but {frames} processed"
    if unit == "boxes" and ca.sum() > frames * MAX_BOXES_PER_FRAME:
        return None, f"{int(ca.sum())} boxes in {frames} frames (> {MAX_BOXES_PER_FRAME} a frame)"
    return Histogram(ea, ca), None


def window_features(heartbeats: Iterable[Mapping[str, Any]]) -> WindowFeatures:
    """Sum the drift histograms of a window's heartbeats (payload dicts, any schema)."""
    out = WindowFeatures()
    for i, hb in enumerate(heartbeats):
        if not isinstance(hb, Mapping):
            out.skipped.append(f"#{i}: not an object")
            continue
        out.heartbeats += 1
        fp = finite_number(hb.get("frames_processed"))
        frames = int(fp) if fp is not None and 0 <= fp <= _MAX_COUNT else None
        if frames is None:
            out.skipped.append(f"#{i}: frames_processed missing or absurd")
        else:
            out.frames += frames
        for feat in NUMERIC_FEATURES:
            hist, why = _histogram(hb.get(feat.field), frames, feat)
            if hist is None:
                if why != "absent":
                    out.skipped.append(f"#{i}: {feat.field}: {why}")
                continue
            if hist.total == 0:
                continue
            have = out.histograms.get(feat.name)
            if have is None:
                out.histograms[feat.name] = hist
            elif have.same_bins(hist):
                out.histograms[feat.name] = have + hist
            else:
                out.skipped.append(f"#{i}: {feat.field}: bins differ from the window's others")
        cc = hb.get("class_counts")
        if isinstance(cc, Mapping):
            good = {str(k)[:64]: int(v) for k, v in cc.items()
                    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_COUNT}
            if len(good) != len(cc):
                out.skipped.append(f"#{i}: class_counts: non-integer or negative counts dropped")
            if frames is None or sum(good.values()) > frames * MAX_BOXES_PER_FRAME:
                out.skipped.append(f"#{i}: class_counts: more boxes than {MAX_BOXES_PER_FRAME} "
                                   "a frame, or frames_processed unknown")
            else:
                out.class_counts.update({k: v for k, v in good.items() if v})
        elif cc is not None:
            out.skipped.append(f"#{i}: class_counts: not an object")
    return out


def expand(hist: Histogram, feature: HistogramFeature, max_samples: int) -> np.ndarray:
    """The histogram as unit-scaled samples for a distribution test, at most ``max_samples``
    (counts scaled down proportionally, largest remainders first, so shape is kept)."""
    counts = hist.counts.astype(np.float64)
    total = counts.sum()
    if total > max_samples:
        exact = counts * (max_samples / total)
        counts = np.floor(exact)
        short = int(max_samples - counts.sum())
        if short > 0:
            counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return np.repeat(feature.unit_values(hist.edges), counts.astype(np.int64))


def expand_classes(counts: Mapping[str, int], max_samples: int) -> list[str]:
    """Class labels as categorical samples (proportionally capped like :func:`expand`)."""
    names = sorted(counts)
    if not names:
        return []
    hist = Histogram(np.arange(len(names) + 1, dtype=np.float64),
                     np.asarray([counts[n] for n in names], dtype=np.int64))
    idx = expand(hist, HistogramFeature("_", "_", "output", "boxes"), max_samples)
    # unit values are (i + .5) / n: map back to the name
    return [names[min(int(v * len(names)), len(names) - 1)] for v in idx]
