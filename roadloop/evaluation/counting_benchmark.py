"""Counting on tracks: how well each ONNX model file counts vehicles crossing lines.

Box metrics (mAP, per-frame count MAE) say little about what the edge agent reports: counts
of tracks crossing lines. Here one seeded synthetic scene (:mod:`traffic_scenes`) with known
crossings is rendered from vehicle crops of the benchmark's split of the curated dataset (the
held-out frames, so no model saw those vehicles), and every ONNX file is run on it the way the
agent runs: :class:`~edge_agent.inference.OnnxDetector` (confidence 0.25, the model's own
input size) feeding :class:`~edge_agent.traffic.counter.TrafficCounter` configured with the
scene's ``traffic`` section. :func:`~roadloop.evaluation.counting_accuracy.evaluate_counter`
scores the counts, crossings and tracks.

The PyTorch weights are not run here: the agent only runs ONNX, and the fp32 ONNX file is
their export, so its row stands for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from edge_agent.inference import Detection, OnnxDetector
from edge_agent.traffic import parse_traffic_section
from edge_agent.traffic.counter import TrafficCounter
from roadloop.data.datasets import Taxonomy, load_taxonomy
from roadloop.evaluation.counting_accuracy import CountingResult, evaluate_counter
from roadloop.evaluation.results import CountingConfig, CountingRow
from roadloop.evaluation.traffic_scenes import (
    CLASS_NAMES,
    FrameTruth,
    Scene,
    TrafficScene,
    build_scene,
    render_frames,
)

#: Formats that are counted (what an edge agent can run).
COUNTED_FORMATS: tuple[str, ...] = ("onnx_fp32", "onnx_int8")
_KEEP_FRAMES_BYTES = 256 * 2**20  # rendered frames are kept in memory up to this size


def scene_config(cfg: CountingConfig, crop_dataset: Path | None, split: str) -> TrafficScene:
    """The benchmark's scene: ``cfg``'s size, rate, length and seed, crops from ``split``."""
    return TrafficScene(
        seed=cfg.seed, width=cfg.width, height=cfg.height, fps=cfg.fps,
        duration_s=cfg.duration_s, background_video=cfg.background_video,
        crop_datasets=(Path(crop_dataset),) if crop_dataset is not None else (),
        crop_split=split if crop_dataset is not None else None,
    )


def taxonomy_names(names: Sequence[str], taxonomy: Taxonomy | None = None) -> list[str]:
    """A detector's class names on the taxonomy: a taxonomy name stays, a source's name maps
    through the first source that maps it (``bike`` → ``two_wheeler``), any other stays."""
    tax = taxonomy or load_taxonomy()
    out = []
    for n in names:
        if n in tax.classes:
            out.append(n)
        else:
            out.append(next((m[n] for m in tax.sources.values() if n in m), n))
    return out


def detect_scene(
    detector: OnnxDetector, frames: Iterable[np.ndarray], names: Sequence[str],
    classes: Sequence[str],
) -> list[list[Detection]]:
    """The detector's detections per frame, renamed to ``names`` (one per detector class) and
    renumbered into ``classes`` (the counter's class list)."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for frame in frames:
        dets = []
        for d in detector.detect(frame):
            name = names[d.class_id] if 0 <= d.class_id < len(names) else d.class_name
            dets.append(Detection(index.get(name, -1), d.confidence, d.x1, d.y1, d.x2, d.y2,
                                  name, d.model_sha256))
        out.append(dets)
    return out


def count_with_model(
    model_path: Path, scene: Scene, frames: Iterable[np.ndarray], *,
    truth: Sequence[FrameTruth] | None = None, conf: float = 0.25, threads: int | None = None,
) -> tuple[CountingResult, list[list[Detection]]]:
    """Run one ONNX file + the agent's counter over the scene's frames and score the counts."""
    detector = OnnxDetector(model_path, conf_threshold=conf, intra_op_threads=threads)
    names = taxonomy_names(detector.class_names)
    classes = list(CLASS_NAMES) + sorted(set(names) - set(CLASS_NAMES))
    dets = detect_scene(detector, frames, names, classes)
    counter = TrafficCounter(parse_traffic_section(scene.traffic_section()), classes)
    return evaluate_counter(counter, scene, dets, truth=truth), dets


def counting_row(model: str, version: str, fmt: str, result: CountingResult,
                 dets: Sequence[Sequence[Detection]], seconds: float) -> CountingRow:
    t, c, mot = result.total, result.crossings, result.mot
    return CountingRow(
        model=model, version=version, format=fmt, truth=t["truth"], counted=t["counted"],
        error=t["error"], rel_error=t["rel_error"], abs_error_sum=t["abs_error_sum"],
        matched=c["matched"], missed=c["missed"], duplicates=c["duplicates"], ghosts=c["ghosts"],
        wrong_direction=c["wrong_direction"], wrong_class=c["wrong_class"],
        mota=mot["MOTA"], idf1=mot["IDF1"], idsw=mot["IDSW"], frames=result.frames,
        detections_per_frame=round(sum(map(len, dets)) / max(1, len(dets)), 3),
        lines=result.lines, rows=result.rows, seconds=round(seconds, 3),
    )


def _frame_source(scene: Scene) -> Callable[[], Iterable[np.ndarray]]:
    """Frames for each pass: rendered once and kept when small, else rendered again."""
    c = scene.config
    n = round(c.duration_s * c.fps)
    if n * c.width * c.height * 3 > _KEEP_FRAMES_BYTES:
        return lambda: render_frames(scene)
    kept: list[np.ndarray] = []

    def frames() -> list[np.ndarray]:
        if not kept:
            kept.extend(render_frames(scene))
        return kept

    return frames


def count_models(
    jobs: Sequence[tuple[str, str, str, Path]], cfg: CountingConfig, *,
    crop_dataset: Path | None, split: str,
    progress: Callable[[str], None] | None = None,
) -> tuple[TrafficScene, list[CountingRow]]:
    """One :class:`CountingRow` per ``(model, version, format, ONNX path)`` job, all on the
    same scene; the scene's config is returned for the record. ``progress`` is called after
    each job."""
    scene_cfg = scene_config(cfg, crop_dataset, split)
    scene = build_scene(scene_cfg)
    truth = list(scene.truth_frames())
    frames = _frame_source(scene)
    rows = []
    for model, version, fmt, path in jobs:
        t0 = time.perf_counter()
        result, dets = count_with_model(path, scene, frames(), truth=truth, conf=cfg.conf,
                                        threads=cfg.threads)
        rows.append(counting_row(model, version, fmt, result, dets, time.perf_counter() - t0))
        if progress is not None:
            progress(f"{model} {fmt} counted")
    return scene_cfg, rows
