"""Benchmark protocol and promotion gates."""

from __future__ import annotations

import dagster as dg

from roadloop.evaluation.gates import GateConfig


class BenchmarkResource(dg.ConfigurableResource):
    """How models are measured (latency protocol, robustness slices) and judged (gates)."""

    warmup: int = 10
    runs: int = 100
    batch_sizes: list[int] = [1, 4, 8]  # noqa: RUF012 (a pydantic field: defaults are copied)
    slices: list[str] = ["low_light", "fog", "blur", "noise"]  # noqa: RUF012
    per_source: bool = True
    threads: int | None = None
    calibration_frames: int = 100
    # Gates (see roadloop.evaluation.gates.GateConfig).
    max_regression_map50_95: float = 0.01
    max_int8_drop_points: float = 1.5
    p95_latency_budget_ms: float = 50.0

    def gate_config(self) -> GateConfig:
        return GateConfig(
            max_regression_map50_95=self.max_regression_map50_95,
            max_int8_drop_points=self.max_int8_drop_points,
            p95_latency_budget_ms=self.p95_latency_budget_ms,
        )
