"""MLflow tracking and model registry, framework-free.

One MLflow run per trained model; its ONNX / INT8 exports and benchmark reports are logged
into the same run and tagged onto the same registered model version, so one version id
carries the whole lineage. Promotion uses registry *aliases* (``candidate``, ``production``),
not the deprecated stages.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
PRODUCTION_ALIAS = "production"
# MLflow 3's UI picks its layout from this experiment tag; unset, it may infer GenAI. The
# value the UI names CUSTOM_MODEL_DEVELOPMENT is the classical ML (training runs) layout.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSICAL_ML_KIND = "custom_model_development"
MODEL_NAME_IN_RUN = "model"  # the logged model's name (MLflow 3: a LoggedModel of the run)


class RegisteredVersion(BaseModel):
    """A registered model version and where its files live."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str] = {}


def mlflow_key(text: str) -> str:
    """``text`` as an MLflow tag/param/metric key: alphanumerics, ``_ - . : /`` and spaces."""
    return re.sub(r"[^\w\-. :/]", "_", text)


class Tracker:
    """Thin wrapper over an MLflow tracking + registry store."""

    def __init__(self, tracking_uri: str, experiment: str,
                 artifact_root: Path | str | None = None):
        """``artifact_root``: a local folder, or a URI such as ``s3://bucket/mlflow`` (MLflow
        writes there with boto3; a non-AWS endpoint comes from ``MLFLOW_S3_ENDPOINT_URL``)."""
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_id = self._ensure_experiment()

    def _ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag was set
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                               CLASSICAL_ML_KIND)
            return exp.experiment_id
        location = None
        if isinstance(self.artifact_root, str) and "://" in self.artifact_root:
            location = self.artifact_root
        elif self.artifact_root is not None:
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(self.artifact_root).absolute().as_uri()
        try:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: CLASSICAL_ML_KIND})
        except MlflowException:  # created concurrently
            exp = self.client.get_experiment_by_name(self.experiment_name)
            assert exp is not None
            return exp.experiment_id

    # -- runs -----------------------------------------------------------------------------
    def start_run(self, run_name: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(run_id, key, _param_str(value))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(run_id, _metric_key(key), float(value), step=step or 0)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def artifact_uri(self, run_id: str, artifact_path: str) -> str:
        run = self.client.get_run(run_id)
        return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"

    # -- registry -------------------------------------------------------------------------
    def register_version(
        self, name: str, run_id: str, artifact_path: str, tags: dict[str, str] | None = None
    ) -> RegisteredVersion:
        self._ensure_registered_model(name)
        source = self.artifact_uri(run_id, artifact_path)
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
        return _as_registered(mv)

    def register_checkpoint_model(
        self, name: str, run_id: str, weights: Path, *, imgsz: int,
        tags: dict[str, str] | None = None, description: str | None = None,
    ) -> RegisteredVersion:
        """Log ``weights`` to the run as a pyfunc model with a signature
        (``roadloop.models.mlflow_model``) and register it as a new version of ``name``."""
        from roadloop.models import mlflow_model

        self._ensure_registered_model(name)
        with self._fluent():  # the client resolves models:/<id> through the global URI too
            nested = mlflow.active_run() is not None
            with mlflow.start_run(run_id=run_id, nested=nested):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME_IN_RUN, python_model=mlflow_model.YoloCheckpointModel(),
                    artifacts={"weights": str(weights)}, model_config={"imgsz": imgsz},
                    signature=mlflow_model.detector_signature(),
                    pip_requirements=mlflow_model.pip_requirements(),
                    tags={"imgsz": str(imgsz)},
                )
            mv = self.client.create_model_version(
                name, source=f"models:/{info.model_id}", run_id=run_id, tags=tags or {},
                description=description, model_id=info.model_id)
        return _as_registered(mv)

    @contextmanager
    def _fluent(self) -> Iterator[None]:
        """MLflow's fluent API (``log_model``) against this tracker's store, then back."""
        tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(tracking)
            mlflow.set_registry_uri(registry)

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description="roadloop traffic detector (Ultralytics YOLO)"
            )

    def describe_version(self, name: str, version: str, description: str) -> None:
        self.client.update_model_version(name, version, description=description)

    def version_description(self, name: str, version: str) -> str:
        return self.client.get_model_version(name, version).description or ""

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Set version tags; characters MLflow refuses in a key (``int8_drop@192x320``'s
        ``@``) become ``_``."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, mlflow_key(key), value)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def version_by_alias(self, name: str, alias: str) -> RegisteredVersion | None:
        try:
            return _as_registered(self.client.get_model_version_by_alias(name, alias))
        except MlflowException:
            return None

    def get_version(self, name: str, version: str) -> RegisteredVersion:
        return _as_registered(self.client.get_model_version(name, version))

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=artifact_path,
            dst_path=str(dst),
            tracking_uri=self.tracking_uri,
        )
        return Path(local)


def _as_registered(mv: ModelVersion) -> RegisteredVersion:
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id or "",
        source=mv.source or "",
        tags=dict(mv.tags or {}),
    )


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics, _ - . space / ; Ultralytics uses e.g. "metrics/mAP50(B)".
    return "".join(c if (c.isalnum() or c in "_-./ ") else "_" for c in key).strip("_")
