"""Is a heartbeat physically possible? The numbers rollout health is computed from, checked.

The gateway keeps a heartbeat's payload as the agent sent it (the agent owns the schema), but
the numbers it *reads* — counts, window, latency percentiles, the shadow block — must describe
something a device could have done, or one device could skew what the platform concludes:

* counts are integers (not booleans, not floats) ``>= 0``;
* ``errors <= frames_processed``: an error is a frame the detector failed on, and every frame
  run through the detector is counted in ``frames_processed`` (absent means 0);
* ``frames_processed <= HEARTBEAT_MAX_FPS * window_s + 1`` (the frame in flight when the
  window closed; without ``window_s`` the longest window, ``HEARTBEAT_MAX_WINDOW_S``, bounds it);
* ``0 <= window_s <= HEARTBEAT_MAX_WINDOW_S``;
* latency percentiles are finite, ``>= 0``, no longer than the longest window, and ordered
  ``p50 <= p95 <= p99`` (top-level ``latency_p*_ms`` and the nested ``latency_ms`` alike);
* the ``shadow`` block (a candidate model's window) obeys the same rules, its
  ``agreement_f1`` lies in [0, 1] and its ``model_version`` is a string (or null), as are
  ``rollout_id`` and ``update_status``: rollout health matches on them;
* the per-frame histograms drift monitoring reads (``FRAME_HISTOGRAMS``), when present, are
  ``{bin_edges: increasing finite numbers, counts: one integer >= 0 per bin}`` whose counts
  sum to at most ``frames_processed`` (one value per frame; absent means 0), and whose edges
  lie in the quantity's physical range (``roadloop.monitoring.features.EDGE_RANGES``:
  brightness 0..256, sharpness 0..10, detections 0..1000), the one drift monitoring reads by.

``heartbeat_problems`` returns one message per violation, each naming its field: the route
refuses such a heartbeat with 422 (``fleet.schemas.HeartbeatIn``), and rollout health skips
stored ones (rows written before these checks existed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from fleet.config import HEARTBEAT_MAX_FPS, HEARTBEAT_MAX_WINDOW_S
from roadloop.monitoring.features import edges_problem

# The indexed count columns are 32-bit integers (PostgreSQL INTEGER).
MAX_COUNT = 2**31 - 1
MAX_LATENCY_MS = HEARTBEAT_MAX_WINDOW_S * 1000.0
PERCENTILES = ("p50", "p95", "p99")
# One value per frame the detector finished (edge_agent.heartbeat).
FRAME_HISTOGRAMS = ("brightness_histogram", "sharpness_histogram", "detections_histogram")
_ABSENT = object()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def count(self, block: dict[str, Any], key: str, prefix: str, upper: float,
              why: Callable[[], str] = str) -> int | None:
        """An optional integer count in ``[0, upper]``; its value when valid, else None."""
        v = block.get(key, _ABSENT)
        if v is _ABSENT or v is None:
            return None
        name = prefix + key
        if not isinstance(v, int) or isinstance(v, bool):
            self.problems.append(f"{name} must be an integer count, got {v!r}"[:200])
            return None
        if v < 0:
            self.problems.append(f"{name} must not be negative (got {v})")
            return None
        if v > upper:
            self.problems.append(f"{name} ({v}) must be at most {math.floor(upper)}{why()}")
            return None
        return v

    def number(self, block: dict[str, Any], key: str, prefix: str, lo: float,
               hi: float) -> float | None:
        """An optional finite number in ``[lo, hi]``; its value when valid, else None."""
        v = block.get(key, _ABSENT)
        if v is _ABSENT or v is None:
            return None
        name = prefix + key
        if not _is_number(v) or not math.isfinite(v):
            self.problems.append(f"{name} must be a finite number, got {v!r}"[:200])
            return None
        if not lo <= v <= hi:
            self.problems.append(f"{name} ({v:g}) must be between {lo:g} and {hi:g}")
            return None
        return float(v)

    def latencies(self, block: dict[str, Any], keys: dict[str, str], prefix: str) -> None:
        """Percentile latencies (``{"p50": key, ...}``): finite, >= 0, ordered."""
        seen: list[tuple[str, float]] = []
        for pct in PERCENTILES:
            if pct not in keys:
                continue
            v = self.number(block, keys[pct], prefix, 0.0, MAX_LATENCY_MS)
            if v is not None:
                seen.append((prefix + keys[pct], v))
        for (a, va), (b, vb) in itertools.pairwise(seen):
            if va > vb:
                self.problems.append(f"{a} ({va:g}) must not exceed {b} ({vb:g}): "
                                     "percentiles are ordered")


def _histogram(c: _Checker, payload: dict[str, Any], key: str, frames: int | None) -> None:
    """A per-frame histogram (absent or null is fine): well formed, at most one value per
    frame of the window."""
    h = payload.get(key)
    if h is None:
        return
    edges = h.get("bin_edges") if isinstance(h, dict) else None
    counts = h.get("counts") if isinstance(h, dict) else None
    if not isinstance(edges, list) or not isinstance(counts, list):
        c.problems.append(f"{key} must be an object {{bin_edges: [...], counts: [...]}}")
        return
    if len(edges) < 2 or len(counts) != len(edges) - 1:
        c.problems.append(f"{key} must have one count per bin ({len(counts)} counts for "
                          f"{len(edges)} bin edges)")
        return
    if not all(_is_number(e) and math.isfinite(e) for e in edges) or any(
            a >= b for a, b in itertools.pairwise(edges)):
        c.problems.append(f"{key}.bin_edges must be finite numbers in increasing order")
        return
    problem = edges_problem(key, edges)
    if problem is not None:
        c.problems.append(f"{key}.bin_edges: {problem}")
        return
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        c.problems.append(f"{key}.counts must be integer counts >= 0")
        return
    total = sum(counts)
    if frames is not None and total > frames:
        c.problems.append(f"{key} counts {total} values, more than frames_processed "
                          f"({frames}): a frame gives one value")


def _per_window(window: float | None) -> str:
    if window is None:
        return (f" ({HEARTBEAT_MAX_FPS:g} frames/s over the longest window, "
                f"{HEARTBEAT_MAX_WINDOW_S:g} s, as window_s is absent)")
    return f" ({HEARTBEAT_MAX_FPS:g} frames/s over a window_s of {window:g} s)"


def frames_limit(window_s: float | None) -> float:
    """Most frames a window of ``window_s`` seconds can hold (unknown: the longest window)."""
    w = HEARTBEAT_MAX_WINDOW_S if window_s is None else window_s
    return HEARTBEAT_MAX_FPS * w + 1


def heartbeat_problems(payload: dict[str, Any]) -> list[str]:
    """Every implausible number in a heartbeat payload, each message naming its field."""
    c = _Checker()
    window = c.number(payload, "window_s", "", 0.0, HEARTBEAT_MAX_WINDOW_S)
    if "window_s" in payload and payload["window_s"] is not None and window is None:
        window = HEARTBEAT_MAX_WINDOW_S  # already reported; bound the rest generously
    limit = frames_limit(window)
    def why() -> str:
        return _per_window(window)

    frames = c.count(payload, "frames_processed", "", limit, why)
    frames_known = frames is not None or payload.get("frames_processed") is None  # absent: 0
    for key in ("errors", "error_count"):
        err = c.count(payload, key, "", MAX_COUNT)
        if err is not None and frames_known and err > (frames or 0):
            c.problems.append(
                f"{key} ({err}) must not exceed frames_processed ({frames or 0}): an error is "
                "a frame the detector failed on, counted among the frames processed")
    c.count(payload, "dropped_frames", "", limit, why)
    for key in ("outbox_depth", "errors_total", "dropped_frames_total"):
        c.count(payload, key, "", MAX_COUNT)
    fps_cap = (limit / window) if window else HEARTBEAT_MAX_FPS
    for key in ("fps", "frames_per_s"):  # either fills the fps column (HEARTBEAT_COLUMNS)
        c.number(payload, key, "", 0.0, fps_cap)
    c.latencies(payload, {p: f"latency_{p}_ms" for p in PERCENTILES}, "")
    c.number(payload, "inference_p50_ms", "", 0.0, MAX_LATENCY_MS)
    nested = payload.get("latency_ms")
    if isinstance(nested, dict):
        c.latencies(nested, {p: p for p in PERCENTILES}, "latency_ms.")
    elif nested is not None:
        c.problems.append("latency_ms must be an object {p50, p95, p99}")
    for key in FRAME_HISTOGRAMS:
        _histogram(c, payload, key, (frames or 0) if frames_known else None)
    for key in ("rollout_id", "update_status"):  # what rollout health matches on
        if not isinstance(payload.get(key), (str, type(None))):
            c.problems.append(f"{key} must be a string or null")
    shadow = payload.get("shadow")
    if isinstance(shadow, dict):
        s_frames = c.count(shadow, "frames", "shadow.", limit, why)
        s_known = s_frames is not None or shadow.get("frames") is None
        s_err = c.count(shadow, "errors", "shadow.", MAX_COUNT)
        if s_err is not None and s_known and s_err > (s_frames or 0):
            c.problems.append(
                f"shadow.errors ({s_err}) must not exceed shadow.frames ({s_frames or 0}): "
                "an error is a frame the candidate failed on, counted among its frames")
        for key in ("tp", "fp", "fn", "skipped", "frames_total"):
            c.count(shadow, key, "shadow.", MAX_COUNT)
        c.number(shadow, "latency_p95_ms", "shadow.", 0.0, MAX_LATENCY_MS)
        c.number(shadow, "serving_latency_p95_ms", "shadow.", 0.0, MAX_LATENCY_MS)
        c.number(shadow, "agreement_f1", "shadow.", 0.0, 1.0)
        if not isinstance(shadow.get("model_version"), (str, type(None))):
            c.problems.append("shadow.model_version must be a string or null (the candidate "
                              "model's version)")
    elif shadow is not None:
        c.problems.append("shadow must be an object or null")
    return c.problems
