"""The trained checkpoint as an MLflow model: a pyfunc with a signature, so the registry
version is a real model (loadable with ``mlflow.pyfunc.load_model``) rather than a raw
``best.pt`` file; and the parameters that name the checkpoint training started from."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from roadloop.fsutil import sha256_file

DETECTION_COLUMNS = ("image", "class_id", "class_name", "confidence", "x1", "y1", "x2", "y2")
DEFAULT_CONF = 0.25


def detector_signature() -> ModelSignature:
    """Images (N, H, W, 3) uint8 in OpenCV's BGR order in; one row per detection out, boxes
    in input pixels; ``conf`` (the confidence floor) as a parameter."""
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")])
    outputs = Schema([
        ColSpec("long", "image"), ColSpec("long", "class_id"), ColSpec("string", "class_name"),
        ColSpec("double", "confidence"), ColSpec("double", "x1"), ColSpec("double", "y1"),
        ColSpec("double", "x2"), ColSpec("double", "y2"),
    ])
    params = ParamSchema([ParamSpec("conf", "double", DEFAULT_CONF)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class YoloCheckpointModel(mlflow.pyfunc.PythonModel):
    """``predict(images)`` with the logged Ultralytics checkpoint (artifact ``weights``)."""

    def load_context(self, context: Any) -> None:
        from ultralytics import YOLO

        self.model = YOLO(context.artifacts["weights"], task="detect")
        self.imgsz = int((context.model_config or {}).get("imgsz", 640))

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None
                ) -> Any:
        import pandas as pd

        conf = float((params or {}).get("conf", DEFAULT_CONF))
        images = list(np.asarray(model_input, dtype=np.uint8))
        rows: list[tuple[Any, ...]] = []
        results = self.model.predict(images, imgsz=self.imgsz, conf=conf, verbose=False)
        for i, result in enumerate(results):
            boxes = result.boxes
            for cls, score, xyxy in zip(boxes.cls.tolist(), boxes.conf.tolist(),
                                        boxes.xyxy.tolist(), strict=True):
                rows.append((i, int(cls), result.names[int(cls)], float(score), *xyxy))
        return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def pip_requirements() -> list[str]:
    """What loading the model needs, pinned to what is installed (no inference: MLflow's
    would load the model in a subprocess)."""
    out = []
    for name in ("ultralytics", "torch", "numpy", "pandas"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def start_checkpoint_params(path_or_name: str, kind: str) -> dict[str, str]:
    """MLflow parameters naming the weights training actually loaded: the resolved file and
    its SHA-256 (a model YAML starts from random init: no file to hash)."""
    path = Path(path_or_name)
    digest = sha256_file(path) if path.is_file() else f"none ({kind}: no weights file)"
    return {"start_checkpoint": str(path_or_name), "start_checkpoint_sha256": digest,
            "start_checkpoint_kind": kind}


def candidate_description(run_id: str, tags: dict[str, str], metrics: dict[str, float]) -> str:
    """The registry version's description (Markdown) when it is registered; the benchmark
    appends its report and checks (``checks_description``)."""
    dagster_run = tags.get("dagster_run_id", "n/a")
    lines = [(f"roadloop candidate detector from MLflow run `{run_id}` "
             f"(Dagster run `{dagster_run}`)."), ""]
    lines += [f"- {k}: {v}" for k, v in sorted(tags.items()) if k != "dagster_run_id"]
    lines += [f"- final {k}: {v:.4f}" for k, v in sorted(metrics.items())]
    lines += ["", PENDING]
    return "\n".join(lines)


PENDING = "Benchmark report and promotion checks: pending (set by benchmark_report)."


def checks_description(description: str, report_uri: str, dagster_run_id: str,
                       gates: list[tuple[str, bool, str]]) -> str:
    """``description`` with the benchmark's report and each check's outcome in place of the
    pending line; ``gates``: (name, passed, what it measured)."""
    verdict = "all passed" if all(p for _, p, _ in gates) else "FAILED"
    lines = [(f"Benchmark (Dagster run `{dagster_run_id}`): report `{report_uri}`; "
             f"promotion checks {verdict}:")]
    lines += [f"- {name}: {'pass' if passed else 'FAIL'} ({what})" for name, passed, what in gates]
    body = description.replace(PENDING, "").rstrip()
    return (body + "\n\n" if body else "") + "\n".join(lines)
