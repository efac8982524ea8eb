"""``onnx_model`` and ``quantized_model``: fp32 ONNX export and static INT8 quantization."""


import dagster as dg

from resources import ArtifactStoreResource, BenchmarkResource, MlflowResource
from roadloop.models.export import export_onnx
from roadloop.models.quantize import (
    QuantConfig,
    list_images,
    pick_calibration_frames,
    quantize_int8,
)

from . import groups
from .records import (
    CuratedDatasetVersion,
    OnnxModelVersion,
    QuantizedModelVersion,
    TrainedModelVersion,
)


def _log_onnx(
    mlflow: MlflowResource,
    registered_name: str,
    model: OnnxModelVersion | QuantizedModelVersion,
    sha_tag: str,
) -> None:
    """Log ``model``'s ONNX file to its MLflow run; tag the registered version with its SHA-256."""
    tracker = mlflow.tracker()
    tracker.log_artifact(model.run_id, model.info.path, "onnx")
    tracker.tag_version(registered_name, model.model_version, {sha_tag: model.info.sha256})


@dg.asset(
    group_name=groups.MODELS,
    kinds={"onnx", "mlflow"},
    description="The candidate exported to ONNX fp32 (dynamic batch), logged to the same MLflow run.",
)
def onnx_model(
    context: dg.AssetExecutionContext,
    trained_model: TrainedModelVersion,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[OnnxModelVersion]:
    out = artifacts.path("models", trained_model.model_version) / "model.onnx"
    info = export_onnx(trained_model.weights, out, imgsz=trained_model.imgsz, dynamic_batch=True)
    onnx = OnnxModelVersion(
        model_version=trained_model.model_version, run_id=trained_model.run_id, info=info
    )
    _log_onnx(mlflow, trained_model.registered_name, onnx, "onnx_fp32_sha256")
    context.log.info(f"exported {info.path} ({info.size_bytes / 1e6:.1f} MB)")
    return dg.Output(
        onnx,
        metadata={
            "model_version": trained_model.model_version,
            "sha256": info.sha256,
            "size_mb": info.size_bytes / 1e6,
            "input_shape": str(info.input_shape),
            "opset": info.opset,
            "path": dg.MetadataValue.path(str(info.path)),
        },
    )


@dg.asset(
    group_name=groups.MODELS,
    kinds={"onnx", "mlflow"},
    description=(
        "Static INT8 (ONNX Runtime, QDQ) of the fp32 export, calibrated on curated train frames; "
        "which nodes stay in float was chosen by measurement (benchmarks/results/quantization_sweep.md)."
    ),
)
def quantized_model(
    context: dg.AssetExecutionContext,
    onnx_model: OnnxModelVersion,
    curated_dataset: CuratedDatasetVersion,
    benchmark: BenchmarkResource,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[QuantizedModelVersion]:
    config = QuantConfig(num_calibration_frames=benchmark.calibration_frames)
    # Calibrate on curated *train* frames only: never on the frames the report evaluates.
    train_images = list_images(curated_dataset.dataset.path / "images" / "train")
    images = pick_calibration_frames(train_images, config.num_calibration_frames)
    out = artifacts.path("models", onnx_model.model_version) / "model.int8.onnx"
    info = quantize_int8(onnx_model.info.path, out, images, imgsz=onnx_model.info.imgsz, config=config)
    quantized = QuantizedModelVersion(
        model_version=onnx_model.model_version, run_id=onnx_model.run_id, info=info
    )
    _log_onnx(mlflow, mlflow.registered_model_name, quantized, "onnx_int8_sha256")
    context.log.info(f"quantized {len(images)} calibration frames -> {info.path}")
    return dg.Output(
        quantized,
        metadata={
            "model_version": onnx_model.model_version,
            "sha256": info.sha256,
            "fp32_sha256": onnx_model.info.sha256,
            "calibration_frames": len(images),
            "nodes_kept_float": info.excluded_nodes,
            "config": dg.MetadataValue.json(config.model_dump(mode="json")),
            "path": dg.MetadataValue.path(str(info.path)),
        },
    )
