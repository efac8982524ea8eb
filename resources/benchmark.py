"""Benchmark protocol and promotion gates."""

from __future__ import annotations

import dagster as dg

from roadloop.evaluation.gates import GateConfig, QualityFloor
from roadloop.evaluation.results import CountingConfig


class BenchmarkResource(dg.ConfigurableResource):
    """How models are measured (latency protocol, robustness slices) and judged (gates)."""

    warmup: int = 10
    runs: int = 100
    batch_sizes: list[int] = [1, 4, 8]  # noqa: RUF012 (a pydantic field: defaults are copied)
    slices: list[str] = ["low_light", "fog", "blur", "noise"]  # noqa: RUF012
    per_source: bool = True
    threads: int | None = None
    calibration_frames: int = 100
    # Counting on tracks (see roadloop.evaluation.counting_benchmark): one synthetic scene.
    counting: bool = True
    counting_duration_s: float = 60.0
    counting_fps: float = 10.0
    counting_width: int = 640
    counting_height: int = 384
    counting_seed: int = 0
    counting_background_video: str | None = None  # a video of the road; None: a plain road
    # Gates (see roadloop.evaluation.gates.GateConfig).
    max_regression_map50_95: float = 0.01
    max_int8_drop_points: float = 1.5
    p95_latency_budget_ms: float = 50.0
    # Minimum quality (QualityFloor); build_resources fills them from the settings.
    min_map50: float = 0.10
    min_class_ap50: float = 0.01
    min_class_support: int = 10
    # A relaxed floor (the demo's) names itself and the standard floor it stands in for.
    relaxed_floor_reason: str | None = None
    standard_min_map50: float = 0.10
    standard_min_class_ap50: float = 0.01

    def gate_config(self) -> GateConfig:
        floor = QualityFloor(min_map50=self.min_map50, min_class_ap50=self.min_class_ap50,
                             min_class_support=self.min_class_support)
        standard = QualityFloor(min_map50=self.standard_min_map50,
                                min_class_ap50=self.standard_min_class_ap50,
                                min_class_support=self.min_class_support)
        return GateConfig(
            max_regression_map50_95=self.max_regression_map50_95,
            max_int8_drop_points=self.max_int8_drop_points,
            p95_latency_budget_ms=self.p95_latency_budget_ms,
            quality_floor=floor,
            relaxed_from=standard if self.relaxed_floor_reason else None,
            relaxed_reason=self.relaxed_floor_reason or "",
        )

    def counting_config(self) -> CountingConfig:
        return CountingConfig(
            enabled=self.counting,
            duration_s=self.counting_duration_s,
            fps=self.counting_fps,
            width=self.counting_width,
            height=self.counting_height,
            seed=self.counting_seed,
            background_video=self.counting_background_video,
        )
