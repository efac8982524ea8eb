"""``camera_drift``: one camera's drift window against its reference (camera × window grid).

Each partition reads the window's heartbeats from the gateway and the frames the camera
sampled in it, scores them with ``roadloop.monitoring`` (evidently reports saved as HTML
beside the verdict), stores the verdict and its drift events, reports the verdict to the
gateway for its ``/metrics`` (best effort: ``gateway_reported`` in the metadata says whether
it got there), and reports two checks: drift
(yellow for minor, red for significant) and operational health (silent camera, fps drop,
P95 latency, error rate). ``drift_sensor`` acts on the verdicts.
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import numpy as np
from mlflow.exceptions import MlflowException

from resources import (
    ArtifactStoreResource,
    DvcResource,
    FleetResource,
    FrameStoreResource,
    MlflowResource,
)
from resources.fleet_resource import FleetError
from roadloop.errors import RoadloopError
from roadloop.fsutil import write_text_atomic
from roadloop.labeling.embeddings import compute_embeddings
from roadloop.models.training import configure_ultralytics
from roadloop.monitoring.events import DriftEventStore
from roadloop.monitoring.models import DriftConfig, gateway_report
from roadloop.monitoring.monitor import CameraDriftMonitor, WindowReport
from roadloop.monitoring.windows import parse_window_key
from roadloop.settings import Settings, get_settings

from . import groups
from .active_learning import CurrentModel, current_model
from .evaluation import production_model
from .partitions import camera_window_partitions

DRIFT_CHECK = "drift_within_thresholds"
OPERATIONS_CHECK = "operational_health"
MAX_TRAINING_FRAMES = 300  # curated train frames embedded as a new camera's reference


def drift_config(settings: Settings) -> DriftConfig:
    return DriftConfig(minor=settings.drift_minor, significant=settings.drift_significant)


def drift_events_path(artifacts: ArtifactStoreResource) -> Path:
    return artifacts.path("drift") / "events.db"


class PlatformDriftSources:
    """``DriftSources`` over the platform's services (see ``roadloop.monitoring.monitor``)."""

    def __init__(self, fleet: FleetResource, frame_store: FrameStoreResource,
                 artifacts: ArtifactStoreResource, model: CurrentModel | None,
                 curated_train_dir: Path | None, log: Any) -> None:
        self.fleet, self.frame_store, self.artifacts = fleet, frame_store, artifacts
        self.model, self.curated_train_dir, self.log = model, curated_train_dir, log
        self.embedding_model = f"mlflow-v{model.version}" if model is not None else None

    def heartbeats(self, camera_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return self.fleet.heartbeats(camera_id, start, end)

    def frames(self, camera_id: str, start: datetime, end: datetime) -> list[Path]:
        return [img for _, img in self.frame_store.store().iter_frames(camera_id, start=start,
                                                                        end=end)]

    def embed(self, images: Sequence[Path]) -> np.ndarray:
        assert self.model is not None
        table = compute_embeddings(self.model.weights, list(images), imgsz=self.model.imgsz,
                                   cache_dir=self.artifacts.path("embedding_cache"),
                                   model_version=self.model.version)
        return table.vectors

    def training_embeddings(self) -> tuple[np.ndarray, str] | None:
        if self.model is None or self.curated_train_dir is None:
            return None
        images = sorted(p for p in self.curated_train_dir.glob("*") if p.is_file())
        if not images:
            return None
        step = max(1, len(images) // MAX_TRAINING_FRAMES)
        chosen = images[::step][:MAX_TRAINING_FRAMES]
        return self.embed(chosen), f"curated train split ({len(chosen)} frames)"


def _check_results(report: WindowReport) -> list[dg.AssetCheckResult]:
    v = report.verdict
    drift_meta: dict[str, Any] = {
        "verdict": v.verdict,
        "reason": v.reason or "",
        "metric": v.metric or "",
        "score": float(v.score) if v.score is not None else float("nan"),
        "threshold": float(v.threshold) if v.threshold is not None else float("nan"),
    }
    severity = (dg.AssetCheckSeverity.ERROR if v.verdict == "significant"
                else dg.AssetCheckSeverity.WARN)
    worst_ops = max(report.operations, key=lambda c: ("ok", "not_enough_data", "warn",
                                                      "critical").index(c.severity))
    ops_failed = [c for c in report.operations if c.severity in ("warn", "critical")]
    return [
        dg.AssetCheckResult(
            check_name=DRIFT_CHECK, passed=not v.alarm, severity=severity,
            description=(f"{v.verdict}: {v.metric} = {v.score:.3f} (line {v.threshold:.3f})"
                         if v.alarm else f"{v.verdict}" + (f": {v.reason}" if v.reason else "")),
            metadata=drift_meta,
        ),
        dg.AssetCheckResult(
            check_name=OPERATIONS_CHECK, passed=not ops_failed,
            severity=(dg.AssetCheckSeverity.ERROR if worst_ops.severity == "critical"
                      else dg.AssetCheckSeverity.WARN),
            description="; ".join(f"{c.name} {c.severity}: {c.detail}" for c in ops_failed)
            or "camera healthy",
            metadata={c.name: c.severity for c in report.operations},
        ),
    ]


def metrics_markdown(report: WindowReport) -> str:
    header = ("| metric | kind | test | value | minor line | significant line | noise floor | "
              "n (window / reference) | verdict |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]

    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    for m in report.verdict.metrics:
        verdict = m.verdict + (f" ({m.reason})" if m.reason else "")
        lines.append(f"| {m.name} | {m.kind} | {m.test} | {f(m.value)} | {f(m.threshold)} | "
                     f"{f(m.threshold_significant)} | {f(m.noise_floor)} | "
                     f"{m.n_current} / {m.n_reference} | {verdict} |")
    return "\n".join(lines)


def _report_to_gateway(context: dg.AssetExecutionContext, fleet: FleetResource,
                       report: WindowReport) -> dict[str, Any]:
    """Best effort: the verdict goes to the gateway (exported on its /metrics); a gateway that
    is down or refuses it is logged and recorded, and the materialization goes on."""
    v = report.verdict
    try:
        fleet.report_drift(v.camera_id, gateway_report(v))
    except (FleetError, httpx.HTTPError, ValueError) as exc:  # ValueError: a non-JSON answer
        context.log.warning(f"drift of camera {v.camera_id} not reported to the gateway: {exc}")
        return {"gateway_reported": False, "gateway_report_error": str(exc)[:500]}
    return {"gateway_reported": True}


@dg.asset(
    partitions_def=camera_window_partitions,
    group_name=groups.MONITORING,
    kinds={"evidently"},
    deps=[production_model],
    check_specs=[
        dg.AssetCheckSpec(DRIFT_CHECK, asset="camera_drift",
                          description="Window within its reference's drift lines (WARN minor, "
                          "ERROR significant)."),
        dg.AssetCheckSpec(OPERATIONS_CHECK, asset="camera_drift",
                          description="Camera not silent; fps, P95 latency and error rate "
                          "within the design notes' lines."),
    ],
    description=(
        "Drift of one camera's window (camera × window): evidently data drift over the "
        "heartbeat features and embedding drift over the window's sampled frames, against the "
        "camera's versioned reference; verdict, per-metric scores, HTML reports and drift "
        "events. drift_sensor raises sampling / starts the loop on it."
    ),
)
def camera_drift(
    context: dg.AssetExecutionContext,
    fleet: FleetResource,
    frame_store: FrameStoreResource,
    artifacts: ArtifactStoreResource,
    mlflow: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    keys = context.partition_key.keys_by_dimension  # type: ignore[attr-defined]
    camera, window_key = keys["camera"], keys["window"]
    start = parse_window_key(window_key)
    settings = get_settings()
    model: CurrentModel | None = None
    try:
        configure_ultralytics(settings.home / "ultralytics")
        model = current_model(mlflow.tracker(), mlflow.registered_model_name,
                              artifacts.path("al_model_cache"))
    # no model yet, or MLflow unreachable: the heartbeat metrics still judge the window
    except (dg.Failure, RoadloopError, OSError, MlflowException) as exc:
        context.log.warning(f"frame embeddings skipped: {getattr(exc, 'description', exc)}")
    train_dir = dvc.curated_dir / "images" / "train"
    sources = PlatformDriftSources(fleet, frame_store, artifacts, model,
                                   train_dir if train_dir.is_dir() else None, context.log)
    monitor = CameraDriftMonitor(
        sources=sources, reference_dir=artifacts.path("drift", "references"),
        events=DriftEventStore(drift_events_path(artifacts)),
        window_minutes=settings.drift_window_minutes, config=drift_config(settings),
        reference_windows=settings.drift_reference_windows,
    )
    html_dir = artifacts.path("drift", "reports", camera) / window_key.replace(":", "")
    try:
        report = monitor.evaluate(camera, start, now=datetime.now(UTC), html_dir=html_dir)
    except FleetError as exc:
        raise dg.Failure(f"camera {camera}, window {window_key}: heartbeats unavailable: {exc}",
                         allow_retries=True) from exc
    v = report.verdict
    context.log.info(
        f"camera {camera} window {window_key}: {v.verdict}"
        + (f" ({v.metric} {v.score:.3f} ≥ {v.threshold:.3f})" if v.alarm else "")
        + f"; reference: {report.reference_status}"
    )
    verdict_path = artifacts.path("drift", "verdicts", camera) / f"{html_dir.name}.json"
    write_text_atomic(verdict_path, report.model_dump_json(indent=1))
    metadata: dict[str, Any] = {
        "camera_id": camera,
        "window_start": v.window_start.isoformat(),
        "verdict": v.verdict,
        "alarm": v.alarm,
        "score": float(v.score) if v.score is not None else 0.0,
        "metric": v.metric or "",
        "threshold": float(v.threshold) if v.threshold is not None else 0.0,
        "drift_share": float(v.drift_share) if v.drift_share is not None else 0.0,
        "reason": v.reason or "",
        "model_version": v.model_version or "",
        "reference_id": (v.reference or {}).get("reference_id", ""),
        "reference": dg.MetadataValue.json(v.reference or {}),
        "reference_status": report.reference_status,
        "heartbeats": report.heartbeats,
        "frames_embedded": report.frames_embedded,
        "events": len(report.events),
        "metrics": dg.MetadataValue.md(metrics_markdown(report)),
        "verdict_json": dg.MetadataValue.path(str(verdict_path)),
        "cpu_s": round(v.cpu_s, 3),
    }
    for m in v.metrics:
        if m.value is not None:
            metadata[f"score/{m.name}"] = float(m.value)
    metadata.update(_report_to_gateway(context, fleet, report))
    for path in report.html:
        metadata[f"report/{path.stem}"] = dg.MetadataValue.url(path.resolve().as_uri())
    return dg.MaterializeResult(metadata=metadata, check_results=_check_results(report))


DRIFT_ASSETS = [camera_drift]
