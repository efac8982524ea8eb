"""What of a benchmark goes to the candidate's MLflow run: accuracy on the whole test set
and latency, for every format measured (PyTorch, ONNX fp32, ONNX INT8), so the run compares
the formats and not INT8 alone."""

from __future__ import annotations

from roadloop.evaluation.results import BenchmarkResults

# MLflow key prefix per format ("bench/int8/..." was the only one logged before).
SHORT = {"pytorch": "pytorch", "onnx_fp32": "fp32", "onnx_int8": "int8"}


def benchmark_metrics(results: BenchmarkResults, model: str = "candidate",
                      test_set: str = "all") -> dict[str, float]:
    """``bench/<format>/<metric>`` for ``model``: mAP50, mAP50-95, precision, recall on
    ``test_set``; p50/p95 latency (ms) and frames/s per batch size; count error and IDF1 of
    the line-counting scene where it ran."""
    out: dict[str, float] = {}
    for fmt in results.formats(model):
        key = f"bench/{SHORT.get(fmt, fmt)}"
        metrics = results.get(model, fmt, test_set)
        if metrics is not None:
            out |= {f"{key}/map50": metrics.map50, f"{key}/map50_95": metrics.map50_95,
                    f"{key}/precision": metrics.precision, f"{key}/recall": metrics.recall}
        for batch in results.batch_sizes():
            stats = results.latency(model, fmt, batch)
            if stats is not None:
                out |= {f"{key}/latency_b{batch}_p50_ms": stats.p50_ms,
                        f"{key}/latency_b{batch}_p95_ms": stats.p95_ms,
                        f"{key}/latency_b{batch}_fps": stats.frames_per_s}
        counting = results.counting(model, fmt)
        if counting is not None and counting.rel_error is not None:
            out |= {f"{key}/count_rel_error": counting.rel_error, f"{key}/idf1": counting.idf1}
    return out
