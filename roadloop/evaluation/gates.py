"""Promotion gates: plain functions over :class:`BenchmarkResults` that the blocking Dagster
asset checks call. Each returns a :class:`GateOutcome` whose ``measured`` dict says what was
compared (values, thresholds, deltas), so a failed check explains itself in the UI.

Gates (all on ``GateConfig.primary_test_set``, mAP50-95 from Ultralytics val):

* ``candidate_vs_production`` - the candidate may not be worse than the production model
  by more than ``max_regression_map50_95`` (absolute). Compared in the deployed format
  (``comparison_format``, INT8 ONNX by default), falling back to the first format both
  models have. Passes when there is no production model yet.
* ``int8_drop`` - the candidate's INT8 ONNX may lose at most ``max_int8_drop_points``
  mAP50-95 points (1 point = 0.01) against its fp32 ONNX (PyTorch when fp32 is missing).
* ``latency_budget`` - the candidate's INT8 ONNX P95 forward latency at batch 1 must be
  within ``p95_latency_budget_ms``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from roadloop.evaluation.results import FORMAT_LABELS, BenchmarkResults

CANDIDATE = "candidate"
PRODUCTION = "production"
DEPLOYED_FORMAT = "onnx_int8"
_EPS = 1e-9  # a value exactly at the threshold passes


class GateConfig(BaseModel):
    """Thresholds of the promotion gates.

    ``p95_latency_budget_ms`` defaults to 50 ms: the INT8 ONNX YOLO11n at imgsz 320 runs its
    forward pass in roughly 13-19 ms on the 2-core CPUs here (``../shared/INSTALL-NOTES.md``),
    so 50 ms leaves room for a shared, busy edge box while still rejecting a model that is
    several times slower (e.g. a larger architecture or a broken quantization that falls
    back to float). Set it per deployment target.
    """

    max_regression_map50_95: float = Field(default=0.01, ge=0.0)
    max_int8_drop_points: float = Field(default=1.5, ge=0.0)
    p95_latency_budget_ms: float = Field(default=50.0, gt=0.0)
    latency_batch: int = Field(default=1, ge=1)
    primary_test_set: str = "all"
    comparison_format: str = DEPLOYED_FORMAT


class GateOutcome(BaseModel):
    name: str
    passed: bool
    description: str
    measured: dict[str, float | str] = Field(default_factory=dict)


def _has_model(results: BenchmarkResults, model: str) -> bool:
    return model in results.models or any(r.model == model for r in results.rows)


def check_candidate_vs_production(results: BenchmarkResults, cfg: GateConfig) -> GateOutcome:
    name = "candidate_vs_production"
    ts = cfg.primary_test_set
    tol = cfg.max_regression_map50_95
    if not _has_model(results, PRODUCTION):
        return GateOutcome(
            name=name,
            passed=True,
            description="No production model yet: the first candidate passes this gate.",
            measured={"production": "none", "tolerance_map50_95": tol, "test_set": ts},
        )
    order = [cfg.comparison_format] + [
        f for f in (DEPLOYED_FORMAT, "onnx_fp32", "pytorch") if f != cfg.comparison_format
    ]
    fmt = next(
        (f for f in order if results.get(CANDIDATE, f, ts) and results.get(PRODUCTION, f, ts)), None
    )
    if fmt is None:
        return GateOutcome(
            name=name,
            passed=False,
            description=f"Cannot compare: candidate and production have no format evaluated on "
            f"test set '{ts}' in common.",
            measured={"test_set": ts, "tolerance_map50_95": tol},
        )
    cand, prod = results.get(CANDIDATE, fmt, ts), results.get(PRODUCTION, fmt, ts)
    assert cand is not None and prod is not None
    delta = cand.map50_95 - prod.map50_95
    passed = delta >= -tol - _EPS
    label = FORMAT_LABELS.get(fmt, fmt)
    desc = (
        f"Candidate mAP50-95 {cand.map50_95:.4f} vs production {prod.map50_95:.4f} ({label}, "
        f"'{ts}'): delta {delta:+.4f}, tolerance -{tol:.4f}: "
        + ("no regression beyond tolerance." if passed else "regression beyond tolerance.")
    )
    measured: dict[str, float | str] = {
        "format": fmt,
        "test_set": ts,
        "candidate_map50_95": cand.map50_95,
        "production_map50_95": prod.map50_95,
        "delta_map50_95": delta,
        "tolerance_map50_95": tol,
        "candidate_map50": cand.map50,
        "production_map50": prod.map50,
    }
    if CANDIDATE in results.models:
        measured["candidate_version"] = results.models[CANDIDATE].version
    if PRODUCTION in results.models:
        measured["production_version"] = results.models[PRODUCTION].version
    if fmt != cfg.comparison_format:
        measured["note"] = (
            f"{FORMAT_LABELS.get(cfg.comparison_format, cfg.comparison_format)} missing; compared {label}"
        )
    return GateOutcome(name=name, passed=passed, description=desc, measured=measured)


def check_int8_drop(results: BenchmarkResults, cfg: GateConfig) -> GateOutcome:
    name = "int8_drop"
    ts = cfg.primary_test_set
    max_pts = cfg.max_int8_drop_points
    int8 = results.get(CANDIDATE, "onnx_int8", ts)
    ref_fmt = next((f for f in ("onnx_fp32", "pytorch") if results.get(CANDIDATE, f, ts)), None)
    if int8 is None or ref_fmt is None:
        missing = "INT8 ONNX" if int8 is None else "fp32 ONNX and PyTorch"
        return GateOutcome(
            name=name,
            passed=False,
            description=f"Cannot judge quantization: the candidate's {missing} was not evaluated on '{ts}'.",
            measured={"test_set": ts, "max_drop_points": max_pts},
        )
    ref = results.get(CANDIDATE, ref_fmt, ts)
    assert ref is not None
    drop_points = (ref.map50_95 - int8.map50_95) * 100.0
    rel: float | str = (
        (ref.map50_95 - int8.map50_95) / ref.map50_95 * 100.0 if ref.map50_95 > 0 else "n/a"
    )
    passed = drop_points <= max_pts + _EPS
    rel_txt = f"{rel:.1f}%" if isinstance(rel, float) else "n/a"
    desc = (
        f"INT8 ONNX mAP50-95 {int8.map50_95:.4f} vs {FORMAT_LABELS[ref_fmt]} {ref.map50_95:.4f} "
        f"('{ts}'): drop {drop_points:.2f} points ({rel_txt} relative), limit {max_pts:.2f} points: "
        + ("within limit." if passed else "too large.")
    )
    return GateOutcome(
        name=name,
        passed=passed,
        description=desc,
        measured={
            "test_set": ts,
            "reference_format": ref_fmt,
            "reference_map50_95": ref.map50_95,
            "int8_map50_95": int8.map50_95,
            "drop_points": drop_points,
            "relative_drop_pct": rel,
            "max_drop_points": max_pts,
            "reference_map50": ref.map50,
            "int8_map50": int8.map50,
        },
    )


def check_latency_budget(results: BenchmarkResults, cfg: GateConfig) -> GateOutcome:
    name = "latency_budget"
    b = cfg.latency_batch
    budget = cfg.p95_latency_budget_ms
    lat = results.latency(CANDIDATE, DEPLOYED_FORMAT, b)
    if lat is None:
        return GateOutcome(
            name=name,
            passed=False,
            description=f"Cannot judge latency: no INT8 ONNX latency at batch {b} for the candidate.",
            measured={"batch": float(b), "budget_p95_ms": budget},
        )
    passed = lat.p95_ms <= budget + _EPS
    desc = f"INT8 ONNX P95 latency at batch {b}: {lat.p95_ms:.1f} ms, budget {budget:.1f} ms: " + (
        "within budget." if passed else "over budget."
    )
    return GateOutcome(
        name=name,
        passed=passed,
        description=desc,
        measured={
            "batch": float(b),
            "p95_ms": lat.p95_ms,
            "budget_p95_ms": budget,
            "headroom_ms": budget - lat.p95_ms,
            "p50_ms": lat.p50_ms,
            "p99_ms": lat.p99_ms,
            "frames_per_s": lat.frames_per_s,
            "runs": float(lat.runs),
            "threads": str(lat.threads or "default"),
            "device": lat.device,
        },
    )


def evaluate_all_gates(results: BenchmarkResults, cfg: GateConfig) -> list[GateOutcome]:
    return [
        check_candidate_vs_production(results, cfg),
        check_int8_drop(results, cfg),
        check_latency_budget(results, cfg),
    ]


def all_passed(outcomes: list[GateOutcome]) -> bool:
    return all(o.passed for o in outcomes)


__all__ = [
    "GateConfig",
    "GateOutcome",
    "all_passed",
    "check_candidate_vs_production",
    "check_int8_drop",
    "check_latency_budget",
    "evaluate_all_gates",
]
