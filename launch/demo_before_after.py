"""The demo's before/after table (``roadloop.evaluation.before_after``) from this home's state.

Production's and the candidate's figures come from their benchmark reports (the JSON under
``artifacts/benchmarks/<version>/report``, else the copy logged to the version's MLflow run);
the start checkpoint is the one training resolves (``resolve_start_weights``), scored once on
the production report's own test-set files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from roadloop.evaluation.before_after import (
    BeforeAfterTable,
    build_before_after,
    evaluate_start_checkpoint,
    table_test_sets,
    write_before_after,
)
from roadloop.evaluation.inputs import read_class_names
from roadloop.evaluation.report import JSON_NAME
from roadloop.evaluation.results import BenchmarkResults
from roadloop.models.training import TrainConfig, resolve_start_weights
from roadloop.settings import Settings

log = logging.getLogger(__name__)


def reports_dir(settings: Settings) -> Path:
    return settings.home / "reports"


def _report(settings: Settings, version: str) -> BenchmarkResults | None:
    local = Path(settings.artifacts_dir) / "benchmarks" / version / "report" / JSON_NAME
    if not local.is_file():
        from roadloop.models.tracking import Tracker  # mlflow: imported only when needed

        try:
            tracker = Tracker(str(settings.mlflow_tracking_uri), settings.mlflow_experiment,
                              settings.mlflow_artifact_root)
            run_id = tracker.get_version(settings.registered_model_name, version).run_id
            local = tracker.download(run_id, f"reports/{JSON_NAME}",
                                     reports_dir(settings) / ".cache" / version)
        except Exception as exc:  # noqa: BLE001 - a version without a report has no rows
            log.warning("no benchmark report for v%s (%s)", version, str(exc)[:200])
            return None
    return BenchmarkResults.model_validate_json(local.read_text())


def demo_before_after(
    settings: Settings, train_config: TrainConfig, *, production: str | None,
    candidate: str | None,
) -> tuple[BeforeAfterTable, Path, Path] | None:
    """Build and write the table; None when no version has a benchmark report."""
    reports = {v: r for v in {production, candidate} - {None}
               if (r := _report(settings, v)) is not None}
    ref_version = production if production in reports else candidate
    if ref_version not in reports:
        return None
    reference = reports[ref_version]
    notes: list[str] = []
    start, seconds = None, None
    resolved = resolve_start_weights(train_config)
    test_dir = Path(settings.artifacts_dir) / "benchmarks" / ref_version / "test_sets"
    yamls = {t: test_dir / t / "data.yaml" for t in table_test_sets(reference)}
    missing = [t for t, y in yamls.items() if not y.is_file()]
    if resolved.kind == "scratch":
        notes.append(f"training starts from random init ({resolved.path_or_name}): no start row")
    elif missing or not yamls:
        notes.append(f"start checkpoint not scored: test-set files of v{ref_version} missing "
                     f"({', '.join(missing)})")
    else:
        checkpoint = Path(resolved.path_or_name)
        scores = evaluate_start_checkpoint(
            checkpoint, yamls, class_names=read_class_names(next(iter(yamls.values()))),
            imgsz=reference.imgsz, split=reference.split, conf=reference.conf,
        )
        start, seconds = (checkpoint.name, scores.metrics), scores.seconds
        if scores.new_classes:
            notes.append(f"{checkpoint.name} never had {', '.join(scores.new_classes)}: its class "
                         "head is re-mapped onto the taxonomy as training does, so those score "
                         "about 0 in the start rows")
    table = build_before_after(
        reference,
        production=(production, reports[production]) if production in reports else None,
        candidate=(candidate, reports[candidate]) if candidate in reports else None,
        start=start, start_eval_seconds=seconds, notes=notes,
    )
    json_path, md_path = write_before_after(table, reports_dir(settings))
    return table, json_path, md_path
