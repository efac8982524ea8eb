"""Score a tracker + line counter against a synthetic scene's truth.

The counter is anything with ``update(detections, stream_time)`` (``wall_time=`` is passed
too where its signature takes it) returning a frame result whose ``tracks`` carry
``track_id`` (< 0: unconfirmed, ignored), ``class_name`` and ``xyxy`` and whose ``crossings``
are the crossings counted on that frame (each with ``line``, ``direction``, ``class_name``,
``track_id`` and, where known, ``speed_kmh`` and ``stream_time``); a counter that keeps them
in ``counter.crossings`` instead works too. ``edge_agent.traffic.TrafficCounter`` is the one
this is for.

What is measured:

* **counts** per line, direction and class, per line and in total: counted − true
  (absolute and relative). Crossings within ``warmup_s`` of the first frame or ``tail_s`` of
  the last are left out on both sides (the counter cannot have seen the vehicle on both
  sides of the line); a counted crossing is left out when the vehicle it belongs to crossed
  that line in those windows.
* **which** crossings: each counted crossing is attributed to the true vehicle its track
  overlapped most (IoU ≥ ``attr_iou``, one-to-one per frame) → matched, duplicate (the same
  vehicle counted again on that line), ghost (no vehicle, or one that never crossed that line
  in the scored window), missed (a true crossing nobody counted); matched ones with the
  wrong direction or class are counted too.
* **tracking**: MOTA, IDF1, ID switches, fragmentations from ``trackers.eval`` (CLEAR and
  identity metrics, IoU ≥ 0.5) on the truth boxes at least ``min_visibility`` visible.
* **speed**: counted − true speed (km/h) of matched crossings: median absolute error, bias
  (median signed error), n.
* **cost**: wall time of each ``update`` call (ms), for the record only.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.optimize import linear_sum_assignment

from edge_agent.inference import Detection
from roadloop.evaluation.traffic_scenes import FrameTruth, Scene, TruthCrossing


class CounterLike(Protocol):
    def update(self, detections: list[Detection], stream_time: float) -> Any: ...


@dataclass(frozen=True)
class CountedCrossing:
    line: str
    direction: str
    class_name: str
    track_id: int | None
    t: float | None
    speed_kmh: float | None


def _get(obj: Any, *names: str) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return None


def counted_crossings(records: Iterable[Any]) -> list[CountedCrossing]:
    """Crossing records, whatever their type (attribute or key names), normalised."""
    out = []
    for c in records:
        tid = _get(c, "track_id")
        t = _get(c, "stream_time", "t", "at_stream_s")
        sp = _get(c, "speed_kmh", "speed")
        out.append(CountedCrossing(str(_get(c, "line", "line_name")), str(_get(c, "direction")),
                                   str(_get(c, "class_name")),
                                   None if tid is None else int(tid),
                                   None if t is None else float(t),
                                   None if sp is None else float(sp)))
    return out


def _tracks(frame_out: Any) -> list[tuple[int, str, tuple[float, ...]]]:
    tracks = _get(frame_out, "tracks") if frame_out is not None else None
    out = [(int(_get(t, "track_id")), str(_get(t, "class_name")),
            tuple(float(q) for q in _get(t, "xyxy"))) for t in (tracks or [])]
    return [t for t in out if t[0] >= 0]


def _updater(counter: Any):
    try:
        takes_wall = "wall_time" in inspect.signature(counter.update).parameters
    except (TypeError, ValueError):
        takes_wall = False
    if takes_wall:
        return lambda d, t, w: counter.update(d, stream_time=t, wall_time=w)
    return lambda d, t, w: counter.update(d, stream_time=t)


@dataclass
class CountingResult:
    rows: list[dict]  # line, direction, class_name, truth, counted, error, rel_error
    lines: list[dict]  # line, truth, counted, error, rel_error
    total: dict
    crossings: dict  # matched, missed, duplicates, ghosts, wrong_direction, wrong_class
    mot: dict  # MOTA, IDF1, IDSW, Frag, recall, precision
    speed: dict  # n, median_abs_error_kmh, bias_kmh
    frames: int
    update_ms: list[float] = field(default_factory=list, repr=False)
    details: dict = field(default_factory=dict, repr=False)  # ghosts / misses for a report

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("update_ms")
        ms = self.update_ms
        d["update_ms"] = {"median": statistics.median(ms) if ms else None,
                          "p95": float(np.percentile(ms, 95)) if ms else None}
        return d


def _rel(err: int, truth: int) -> float | None:
    return round(err / truth, 4) if truth else None


def evaluate_counter(
    counter: CounterLike,
    scene: Scene,
    detections: Iterable[list[Detection]],
    *,
    truth: Sequence[FrameTruth] | None = None,
    warmup_s: float = 1.0,
    tail_s: float = 1.0,
    min_visibility: float = 0.35,
    attr_iou: float = 0.3,
    wall_start: float = 1_764_241_200.0,
) -> CountingResult:
    """Feed ``detections`` (one list per frame of ``scene``) to ``counter`` and score it."""
    from trackers.eval import box_iou, compute_clear_metrics, compute_identity_metrics

    frames = list(truth) if truth is not None else list(scene.truth_frames())
    gt_ids, tr_ids, sims = [], [], []
    votes: dict[int, Counter] = defaultdict(Counter)
    update_ms: list[float] = []
    records: list[Any] = []
    update = _updater(counter)
    n = 0
    for ft, dets in zip(frames, detections):
        t0 = time.perf_counter()
        out = update(list(dets), ft.t, wall_start + ft.t)
        update_ms.append((time.perf_counter() - t0) * 1000)
        n += 1
        records.extend(_get(out, "crossings") or [])
        tracks = _tracks(out)
        tb = np.array([t[2] for t in tracks], float).reshape(-1, 4)
        all_gt = np.array([b.xyxy for b in ft.boxes], float).reshape(-1, 4)
        if len(tracks) and len(ft.boxes):  # attribution: all truth, one-to-one
            iou = box_iou(all_gt, tb)
            r, c = linear_sum_assignment(-iou)
            for i, j in zip(r, c):
                if iou[i, j] >= attr_iou:
                    votes[tracks[j][0]][ft.boxes[i].vehicle_id] += 1
        kept = [b for b in ft.boxes if b.visibility >= min_visibility]
        gb = np.array([b.xyxy for b in kept], float).reshape(-1, 4)
        gt_ids.append(np.array([b.vehicle_id for b in kept], int))
        tr_ids.append(np.array([t[0] for t in tracks], int))
        sims.append(box_iou(gb, tb) if len(gb) and len(tb) else np.zeros((len(gb), len(tb))))
    clear = compute_clear_metrics(gt_ids, tr_ids, sims)
    ident = compute_identity_metrics(gt_ids, tr_ids, sims)
    mot = {"MOTA": round(float(clear["MOTA"]), 4), "IDF1": round(float(ident["IDF1"]), 4),
           "IDSW": int(clear["IDSW"]), "Frag": int(clear["Frag"]),
           "recall": round(float(clear["CLR_Re"]), 4),
           "precision": round(float(clear["CLR_Pr"]), 4)}
    owner = {tid: v.most_common(1)[0][0] for tid, v in votes.items()}
    last_t = frames[n - 1].t if n else 0.0
    if not records:  # a counter that keeps its crossings itself
        kept = _get(counter, "crossings")
        records = list(kept() if callable(kept) else (kept or []))
    return _score(scene.crossings, counted_crossings(records), owner, warmup_s, last_t - tail_s,
                  mot, n, update_ms, line_names=list(scene.line_endpoints()))


def _score(truth: list[TruthCrossing], counted: list[CountedCrossing], owner: dict[int, int],
           t_from: float, t_to: float, mot: dict, n: int, update_ms: list[float],
           line_names: Sequence[str] = ()) -> CountingResult:
    scored = {(c.line, c.vehicle_id): c for c in truth if t_from <= c.t <= t_to}
    edge = {(c.line, c.vehicle_id) for c in truth if not t_from <= c.t <= t_to}
    kept: list[tuple[CountedCrossing, int | None]] = []
    for c in counted:
        vid = owner.get(c.track_id) if c.track_id is not None else None
        if vid is not None and (c.line, vid) in edge:
            continue
        kept.append((c, vid))
    t_rows: Counter = Counter((c.line, c.direction, c.class_name) for c in scored.values())
    c_rows: Counter = Counter((c.line, c.direction, c.class_name) for c, _ in kept)
    rows = [{"line": k[0], "direction": k[1], "class_name": k[2], "truth": t_rows[k],
             "counted": c_rows[k], "error": c_rows[k] - t_rows[k],
             "rel_error": _rel(c_rows[k] - t_rows[k], t_rows[k])}
            for k in sorted(set(t_rows) | set(c_rows))]
    all_lines = sorted(set(line_names) | {c.line for c in truth} | {c.line for c, _ in kept})
    lines = []
    for ln in all_lines:
        tt = sum(v for k, v in t_rows.items() if k[0] == ln)
        cc = sum(v for k, v in c_rows.items() if k[0] == ln)
        lines.append({"line": ln, "truth": tt, "counted": cc, "error": cc - tt,
                      "rel_error": _rel(cc - tt, tt)})
    tt, cc = sum(t_rows.values()), sum(c_rows.values())
    total = {"truth": tt, "counted": cc, "error": cc - tt, "rel_error": _rel(cc - tt, tt),
             "abs_error_sum": sum(abs(r["error"]) for r in rows)}
    matched: dict[tuple[str, int], CountedCrossing] = {}
    dup = ghost = wrong_dir = wrong_cls = 0
    errors: list[float] = []
    ghosts = []
    for c, vid in kept:
        key = (c.line, vid) if vid is not None else None
        if key is None or key not in scored:
            ghost += 1
            ghosts.append(asdict(c) | {"vehicle_id": vid})
        elif key in matched:
            dup += 1
        else:
            matched[key] = c
            tr = scored[key]
            wrong_dir += c.direction != tr.direction
            wrong_cls += c.class_name != tr.class_name
            if c.speed_kmh is not None:
                errors.append(c.speed_kmh - tr.speed_kmh)
    missed = [asdict(c) for k, c in scored.items() if k not in matched]
    speed = {"n": len(errors),
             "median_abs_error_kmh": round(statistics.median(map(abs, errors)), 2)
             if errors else None,
             "bias_kmh": round(statistics.median(errors), 2) if errors else None}
    return CountingResult(
        rows=rows, lines=lines, total=total,
        crossings={"matched": len(matched), "missed": len(missed), "duplicates": dup,
                   "ghosts": ghost, "wrong_direction": wrong_dir, "wrong_class": wrong_cls},
        mot=mot, speed=speed, frames=n, update_ms=update_ms,
        details={"ghosts": ghosts, "missed": missed})
