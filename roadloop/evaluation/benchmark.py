"""Detector benchmark: every model, in every format, on every test set.

``benchmark`` runs accuracy (:mod:`roadloop.evaluation.accuracy`) and latency
(:mod:`roadloop.evaluation.latency`) for the candidate and the production model in every
format on the test sets of :mod:`roadloop.evaluation.testsets`, and returns a
JSON-serialisable :class:`~roadloop.evaluation.results.BenchmarkResults`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from roadloop.errors import MissingDataError
from roadloop.evaluation.accuracy import evaluate_detector
from roadloop.evaluation.inputs import check_model_file, check_onnx_imgsz, require_file
from roadloop.evaluation.latency import measure_latency
from roadloop.evaluation.results import (
    FORMAT_LABELS,
    BenchmarkResults,
    LatencyConfig,
    LatencyRow,
    MetricsRow,
    ModelSet,
)
from roadloop.evaluation.testsets import default_test_set_kind


def benchmark(
    models: dict[str, ModelSet],
    test_sets: dict[str, Path],
    *,
    imgsz: int,
    latency: LatencyConfig | None = None,
    split: str = "test",
    conf: float = 0.25,
    device: str = "cpu",
    test_set_kinds: dict[str, str] | None = None,
    progress: bool = True,
) -> BenchmarkResults:
    """Evaluate every (model, format) on every test set and time every (model, format).

    ``models`` keys are ``"candidate"`` and, once one exists, ``"production"``.
    ``test_sets`` maps names to data YAMLs (e.g. ``split_by_source`` + ``make_robustness_slices``
    output); kinds default to ``all`` for ``"all"``, ``slice`` for :data:`SLICE_NAMES`, else
    ``source``. Every file is checked before any work starts, so a missing model fails fast
    with its path.
    """
    if not models:
        raise ValueError("benchmark needs at least one model")
    if not test_sets:
        raise ValueError("benchmark needs at least one test set")
    latency = latency or LatencyConfig()
    for name, ms in models.items():
        if not ms.files():
            raise MissingDataError(
                f"model '{name}' (version {ms.version}) has no model file in any format"
            )
        for fmt, path in ms.files().items():
            check_model_file(path, f"{name} {FORMAT_LABELS[fmt]} model file")
            check_onnx_imgsz(path, imgsz)
    for ts, yml in test_sets.items():
        require_file(Path(yml), f"data YAML of test set '{ts}'")

    kinds = {t: (test_set_kinds or {}).get(t) or default_test_set_kind(t) for t in test_sets}
    results = BenchmarkResults(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        imgsz=imgsz,
        split=split,
        conf=conf,
        models=dict(models),
        test_sets=list(test_sets),
        test_set_kinds=kinds,
        latency_config=latency,
    )
    jobs = [(m, f, p) for m, ms in models.items() for f, p in ms.files().items()]
    total = len(jobs) * len(test_sets) + (len(jobs) if latency.enabled else 0)
    with tqdm(total=total, desc="benchmark", disable=not progress) as bar:
        for m, fmt, path in jobs:
            version = models[m].version
            for ts, yml in test_sets.items():
                bar.set_postfix_str(f"{m} {fmt} {ts}")
                metrics = evaluate_detector(
                    path, Path(yml), imgsz=imgsz, split=split, conf=conf, device=device
                )
                results.rows.append(
                    MetricsRow(model=m, version=version, format=fmt, test_set=ts, metrics=metrics)
                )
                bar.update(1)
            if latency.enabled:
                bar.set_postfix_str(f"{m} {fmt} latency")
                for stats in measure_latency(
                    path,
                    imgsz=imgsz,
                    batch_sizes=latency.batch_sizes,
                    warmup=latency.warmup,
                    runs=latency.runs,
                    threads=latency.threads,
                    device=latency.device,
                ):
                    results.latency_rows.append(
                        LatencyRow(model=m, version=version, format=fmt, stats=stats)
                    )
                bar.update(1)
    return results
