"""Detector benchmark: every model, in every format, on every test set.

``benchmark`` runs accuracy (:mod:`roadloop.evaluation.accuracy`) and latency
(:mod:`roadloop.evaluation.latency`) for the candidate and the production model in every
format on the test sets of :mod:`roadloop.evaluation.testsets`, optionally counting on tracks
(:mod:`roadloop.evaluation.counting_benchmark`) with every ONNX file, and returns a
JSON-serialisable :class:`~roadloop.evaluation.results.BenchmarkResults`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from roadloop.errors import MissingDataError
from roadloop.evaluation.accuracy import evaluate_detector_on_sets
from roadloop.evaluation.counting_benchmark import COUNTED_FORMATS, count_models
from roadloop.evaluation.inputs import check_model_file, check_onnx_imgsz, require_file
from roadloop.evaluation.latency import measure_latency
from roadloop.evaluation.results import (
    FORMAT_LABELS,
    BenchmarkResults,
    CountingConfig,
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
    counting: CountingConfig | None = None,
    crop_dataset: Path | None = None,
) -> BenchmarkResults:
    """Evaluate every (model, format) on every test set and time every (model, format).

    ``models`` keys are ``"candidate"`` and, once one exists, ``"production"``.
    ``test_sets`` maps names to data YAMLs (e.g. ``split_by_source`` + ``make_robustness_slices``
    output); kinds default to ``all`` for ``"all"``, ``slice`` for :data:`SLICE_NAMES`, else
    ``source``. Every file is checked before any work starts, so a missing model fails fast
    with its path.

    With ``counting`` enabled, every ONNX file also counts one synthetic scene whose vehicle
    crops come from ``split`` of ``crop_dataset`` (the curated dataset; ``None``: plain boxes).
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
    if counting is not None and counting.enabled and crop_dataset is not None:
        require_file(Path(crop_dataset) / "data.yaml", "data YAML of the counting scene's crops")

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
    counted = [(m, models[m].version, f, p) for m, f, p in jobs if f in COUNTED_FORMATS]
    counting_on = counting is not None and counting.enabled and bool(counted)
    total = (len(jobs) * len(test_sets) + (len(jobs) if latency.enabled else 0)
             + (len(counted) if counting_on else 0))
    with tqdm(total=total, desc="benchmark", disable=not progress) as bar:
        for m, fmt, path in jobs:
            version = models[m].version
            bar.set_postfix_str(f"{m} {fmt} on {len(test_sets)} test sets")
            scored = evaluate_detector_on_sets(
                path, {ts: Path(yml) for ts, yml in test_sets.items()},
                imgsz=imgsz, split=split, conf=conf, device=device,
            )
            for ts, metrics in scored.items():
                results.rows.append(
                    MetricsRow(model=m, version=version, format=fmt, test_set=ts, metrics=metrics)
                )
            bar.update(len(test_sets))
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
        if counting_on:

            def step(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update(1)

            scene, rows = count_models(counted, counting, crop_dataset=crop_dataset, split=split,
                                       progress=step)
            results.counting_config = counting
            results.counting_scene = scene.model_dump(mode="json")
            results.counting_rows = rows
    return results
