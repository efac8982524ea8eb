"""Benchmark protocol and promotion gates."""

from __future__ import annotations

import dagster as dg

from roadloop.evaluation.gates import (
    INT8_CLASS_MAX_DROP_PCT,
    INT8_CLASS_MAX_DROP_POINTS,
    INT8_CLASS_MIN_INSTANCES,
    INT8_MAX_DROP_PCT,
    GateConfig,
    QualityFloor,
)
from roadloop.evaluation.results import CountingConfig
from roadloop.settings import Settings


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
    max_int8_drop_pct: float = INT8_MAX_DROP_PCT
    int8_class_max_drop_points: float = INT8_CLASS_MAX_DROP_POINTS
    int8_class_max_drop_pct: float = INT8_CLASS_MAX_DROP_PCT
    int8_class_min_instances: int = INT8_CLASS_MIN_INSTANCES
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
            max_int8_drop_pct=self.max_int8_drop_pct,
            int8_class_max_drop_points=self.int8_class_max_drop_points,
            int8_class_max_drop_pct=self.int8_class_max_drop_pct,
            int8_class_min_instances=self.int8_class_min_instances,
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


def int8_gate_settings(settings: Settings) -> dict[str, float | int]:
    """``BenchmarkResource`` keyword arguments for the INT8 gate from ``ROADLOOP_INT8_*``."""
    gate = GateConfig.from_settings(settings)
    return {
        "max_int8_drop_points": gate.max_int8_drop_points,
        "max_int8_drop_pct": gate.max_int8_drop_pct,
        "int8_class_max_drop_points": gate.int8_class_max_drop_points,
        "int8_class_max_drop_pct": gate.int8_class_max_drop_pct,
        "int8_class_min_instances": gate.int8_class_min_instances,
    }
