"""Benchmark results: the JSON-serialisable schema of what the benchmark measured.

:class:`BenchmarkResults` holds one :class:`MetricsRow` per (model, format, test set), one
:class:`LatencyRow` per (model, format, batch size) and one :class:`CountingRow` per (model, ONNX
format); :class:`ModelSet` names the files of one model version in its formats
(:data:`FORMATS`). The report and the promotion gates read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Model formats a :class:`ModelSet` may hold, in report order.
FORMATS: tuple[str, ...] = ("pytorch", "onnx_fp32", "onnx_int8")
FORMAT_LABELS: dict[str, str] = {
    "pytorch": "PyTorch",
    "onnx_fp32": "ONNX fp32",
    "onnx_int8": "ONNX INT8",
}


class DetectionMetrics(BaseModel):
    """Accuracy of one model file on one test set.

    ``map50``/``map50_95``/``precision``/``recall`` are Ultralytics' ``val`` figures (mAP is
    the mean over the classes that have ground truth in the split; P and R are at the
    confidence that maximises mean F1). ``f1 = 2PR / (P + R)``.

    Classes with no ground-truth box in the split have no AP: they are left out of
    ``per_class_ap50``/``per_class_ap50_95`` and listed in ``absent_classes`` (an AP of 0
    would wrongly read as "the model fails on buses"). ``per_class_count_mae`` covers every
    class, since false positives of an absent class are still counting errors.

    ``count_mae`` is the mean over frames of ``|predicted boxes - labelled boxes|`` with all
    classes together (the per-frame traffic count); ``per_class_count_mae[c]`` is the same
    for class ``c`` alone. Predictions are taken at the evaluation's ``conf``.

    ``per_class_instances[c]`` is the number of labelled boxes of class ``c`` in the split (the
    support of its AP; the minimum-quality gate judges a class only with enough of them).
    Empty in results written before it was recorded.

    Every figure is a finite number: a NaN (or infinity) is refused here, since the gates
    cannot judge it and JSON would carry it as ``null``, which does not load back.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    map50: float
    map50_95: float
    precision: float
    recall: float
    f1: float
    per_class_ap50: dict[str, float]
    per_class_ap50_95: dict[str, float]
    per_class_count_mae: dict[str, float]
    count_mae: float
    n_images: int
    n_instances: int = 0
    # Ground-truth boxes per class (Ultralytics' ``nt_per_class``): the support behind each AP.
    # Empty in results written before it was recorded.
    per_class_instances: dict[str, int] = Field(default_factory=dict)
    absent_classes: list[str] = Field(default_factory=list)
    conf: float = 0.25


class LatencyStats(BaseModel):
    """Forward-pass latency of one model file at one batch size (milliseconds per batch)."""

    batch: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    frames_per_s: float  # batch / mean seconds per batch
    runs: int
    warmup: int
    threads: int | None = None
    device: str = "cpu"


class ModelSet(BaseModel):
    """One model version in its formats; a format that was not produced is ``None``."""

    version: str
    pytorch: Path | None = None
    onnx_fp32: Path | None = None
    onnx_int8: Path | None = None

    def files(self) -> dict[str, Path]:
        """The formats present, in :data:`FORMATS` order."""
        return {f: Path(p) for f in FORMATS if (p := getattr(self, f)) is not None}


class LatencyConfig(BaseModel):
    """Latency protocol. The default (10 warm-up + 100 timed runs) is the reported one;
    tests and demos shrink it (e.g. ``warmup=2, runs=5``)."""

    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    warmup: int = Field(default=10, ge=0)
    runs: int = Field(default=100, ge=1)
    threads: int | None = Field(default=None, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"


class CountingConfig(BaseModel):
    """Counting on tracks: one seeded synthetic scene (``roadloop.evaluation.traffic_scenes``)
    per benchmark, vehicle crops from the benchmark's split of the curated dataset, rendered
    and run through every ONNX file with the edge agent's detector and traffic counter.
    Tests and demos shrink it (e.g. 10 s at 10 fps, 320x192)."""

    enabled: bool = True
    duration_s: float = Field(default=60.0, gt=0, le=3600)
    fps: float = Field(default=10.0, gt=0, le=60)
    width: int = Field(default=640, ge=64, le=4096)
    height: int = Field(default=384, ge=64, le=4096)
    seed: int = 0
    background_video: Path | None = None  # a real empty road (median frame); None: plain road
    conf: float = Field(default=0.25, ge=0.0, le=1.0)  # the edge agent's default
    # One frame at a time, like an agent: one ONNX Runtime thread is the cheapest (several
    # threads spin against each other on a busy CPU); None: ONNX Runtime's default.
    threads: int | None = Field(default=1, ge=1)


class CountingRow(BaseModel):
    """How one ONNX file counts the scene: a tracker + line counter on its detections, scored
    against the scene's true line crossings (``counting_accuracy.evaluate_counter``)."""

    model: str
    version: str
    format: str
    truth: int  # true crossings in the scored window, all lines
    counted: int
    error: int  # counted - truth
    rel_error: float | None  # error / truth (None without true crossings)
    abs_error_sum: int  # sum of |error| over (line, direction, class) rows
    matched: int
    missed: int
    duplicates: int
    ghosts: int
    wrong_direction: int
    wrong_class: int
    mota: float
    idf1: float
    idsw: int
    frames: int
    detections_per_frame: float
    lines: list[dict] = Field(default_factory=list)  # per line: truth, counted, error, ...
    rows: list[dict] = Field(default_factory=list)  # per line, direction and class
    seconds: float = 0.0  # wall time of detection + counting, for the record


class MetricsRow(BaseModel):
    model: str  # "candidate" | "production"
    version: str
    format: str  # one of FORMATS
    test_set: str
    metrics: DetectionMetrics


class LatencyRow(BaseModel):
    model: str
    version: str
    format: str
    stats: LatencyStats


class ShapeRow(BaseModel):
    """One exported input shape of the candidate (``roadloop.evaluation.shape_accuracy``):
    fp32 and INT8 ONNX scored at that shape on the primary test set, their forward latency,
    and the verdict of the INT8 gate for the shape."""

    shape: str  # "192x320" (h x w)
    version: str
    test_set: str
    fp32: DetectionMetrics
    int8: DetectionMetrics
    fp32_latency: LatencyStats | None = None
    int8_latency: LatencyStats | None = None
    gate: str = ""  # the gate's name, e.g. int8_drop@192x320
    gate_passed: bool = True
    gate_description: str = ""


class BenchmarkResults(BaseModel):
    """Everything the benchmark measured; ``model_dump_json()`` is the report's JSON."""

    created_at: str
    imgsz: int
    split: str
    conf: float
    models: dict[str, ModelSet]
    test_sets: list[str]
    test_set_kinds: dict[str, str]
    latency_config: LatencyConfig
    rows: list[MetricsRow] = Field(default_factory=list)
    latency_rows: list[LatencyRow] = Field(default_factory=list)
    counting_config: CountingConfig | None = None  # None: counting was not run
    counting_scene: dict = Field(default_factory=dict)  # the TrafficScene as run, as JSON
    counting_rows: list[CountingRow] = Field(default_factory=list)
    shape_rows: list[ShapeRow] = Field(default_factory=list)  # one per exported shape

    def get(self, model: str, format: str, test_set: str) -> DetectionMetrics | None:
        for r in self.rows:
            if r.model == model and r.format == format and r.test_set == test_set:
                return r.metrics
        return None

    def latency(self, model: str, format: str, batch: int) -> LatencyStats | None:
        for r in self.latency_rows:
            if r.model == model and r.format == format and r.stats.batch == batch:
                return r.stats
        return None

    def model_names(self) -> list[str]:
        """Models in report order: candidate first, then production, then any other."""
        order = {"candidate": 0, "production": 1}
        return sorted(self.models, key=lambda m: (order.get(m, 2), m))

    def formats(self, model: str) -> list[str]:
        """Formats with at least one metrics or latency row for ``model``, in FORMATS order."""
        seen = {r.format for r in self.rows if r.model == model}
        seen |= {r.format for r in self.latency_rows if r.model == model}
        return [f for f in FORMATS if f in seen]

    def test_sets_of_kind(self, kind: str) -> list[str]:
        return [t for t in self.test_sets if self.test_set_kinds.get(t) == kind]

    def counting(self, model: str, format: str) -> CountingRow | None:
        for r in self.counting_rows:
            if r.model == model and r.format == format:
                return r
        return None

    def batch_sizes(self) -> list[int]:
        return sorted({r.stats.batch for r in self.latency_rows})
