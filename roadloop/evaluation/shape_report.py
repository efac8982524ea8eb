"""The benchmark report's "Input shapes" table: one row per shape the candidate is exported at
(``roadloop.evaluation.shape_accuracy.benchmark_shapes``) with its fp32 and INT8 accuracy at
that shape, their forward latency and the shape's INT8 gate."""

from __future__ import annotations

from roadloop.evaluation.results import BenchmarkResults, LatencyStats

_DASH = "–"


def _ms(stats: LatencyStats | None) -> str:
    return _DASH if stats is None else f"{stats.p50_ms:.1f} / {stats.p95_ms:.1f}"


def shape_protocol_line(results: BenchmarkResults) -> str:
    ts = results.shape_rows[0].test_set if results.shape_rows else ""
    return (f"Each exported input shape (h×w) scored at its own shape on test set `{ts}` "
            "(the edge agent's letterbox, Ultralytics val's decoding and mAP); latency: forward "
            "pass at batch 1, p50 / p95 ms. The gateway serves each camera the shape that "
            "fits its frames; every shape must pass its INT8 gate.")


def shape_rows(results: BenchmarkResults) -> tuple[list[str], list[list[str]]]:
    header = ["Shape", "fp32 mAP50", "fp32 mAP50-95", "INT8 mAP50", "INT8 mAP50-95",
              "fp32 ms (p50 / p95)", "INT8 ms (p50 / p95)", "INT8 gate"]
    rows = [
        [r.shape, f"{r.fp32.map50:.3f}", f"{r.fp32.map50_95:.3f}", f"{r.int8.map50:.3f}",
         f"{r.int8.map50_95:.3f}", _ms(r.fp32_latency), _ms(r.int8_latency),
         "pass" if r.gate_passed else "FAIL"]
        for r in results.shape_rows
    ]
    return header, rows


__all__ = ["shape_protocol_line", "shape_rows"]
