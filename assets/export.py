"""``onnx_model`` and ``quantized_model``: fp32 ONNX export and static INT8 quantization."""


import dagster as dg

from resources import ArtifactStoreResource, BenchmarkResource, MlflowResource, TrainerResource
from roadloop.models.export import export_onnx, shape_label
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


def _variants_json(variants: dict) -> dict[str, dict[str, str]]:
    return {label: {"path": str(v.path), "sha256": v.sha256} for label, v in variants.items()}


def _log_variants(mlflow: MlflowResource, run_id: str, variants: dict) -> None:
    tracker = mlflow.tracker()
    for v in variants.values():
        tracker.log_artifact(run_id, v.path, "onnx")


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
    description=(
        "The candidate exported to ONNX fp32 (dynamic batch) at every input shape of "
        "`export_shapes` (the square one is the primary file; rectangles such as 192x320 for "
        "16:9 cameras are its variants), logged to the same MLflow run."
    ),
)
def onnx_model(
    context: dg.AssetExecutionContext,
    trained_model: TrainedModelVersion,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
    trainer: TrainerResource,
) -> dg.Output[OnnxModelVersion]:
    folder = artifacts.path("models", trained_model.model_version)
    primary, *others = trainer.shapes(trained_model.imgsz)
    info = export_onnx(trained_model.weights, folder / "model.onnx", imgsz=primary,
                       dynamic_batch=True)
    variants = {
        shape_label(hw): export_onnx(trained_model.weights,
                                     folder / f"model.{shape_label(hw)}.onnx", imgsz=hw,
                                     dynamic_batch=True)
        for hw in others
    }
    onnx = OnnxModelVersion(
        model_version=trained_model.model_version, run_id=trained_model.run_id, info=info,
        variants=variants,
    )
    _log_onnx(mlflow, trained_model.registered_name, onnx, "onnx_fp32_sha256")
    _log_variants(mlflow, onnx.run_id, variants)
    context.log.info(f"exported {info.path} ({info.size_bytes / 1e6:.1f} MB) and "
                     f"{len(variants)} variant(s): {', '.join(variants) or 'none'}")
    return dg.Output(
        onnx,
        metadata={
            "model_version": trained_model.model_version,
            "sha256": info.sha256,
            "size_mb": info.size_bytes / 1e6,
            "input_shape": str(info.input_shape),
            "input_shapes": dg.MetadataValue.json(list(onnx.shapes())),
            "variants": dg.MetadataValue.json(_variants_json(variants)),
            "opset": info.opset,
            "path": dg.MetadataValue.path(str(info.path)),
        },
    )


@dg.asset(
    group_name=groups.MODELS,
    kinds={"onnx", "mlflow"},
    description=(
        "Static INT8 (ONNX Runtime, QDQ) of the fp32 export at each of its input shapes, "
        "calibrated on curated train frames; "
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
    folder = artifacts.path("models", onnx_model.model_version)
    info = quantize_int8(onnx_model.info.path, folder / "model.int8.onnx", images,
                         imgsz=onnx_model.info.input_hw, config=config)
    variants = {  # every shape calibrated on the same frames, letterboxed into its own input
        label: quantize_int8(v.path, folder / f"model.{label}.int8.onnx", images,
                             imgsz=v.input_hw, config=config)
        for label, v in onnx_model.variants.items()
    }
    quantized = QuantizedModelVersion(
        model_version=onnx_model.model_version, run_id=onnx_model.run_id, info=info,
        variants=variants,
    )
    _log_onnx(mlflow, mlflow.registered_model_name, quantized, "onnx_int8_sha256")
    _log_variants(mlflow, quantized.run_id, variants)
    context.log.info(f"quantized {len(images)} calibration frames -> {info.path} "
                     f"(+ {len(variants)} variant(s))")
    return dg.Output(
        quantized,
        metadata={
            "model_version": onnx_model.model_version,
            "sha256": info.sha256,
            "fp32_sha256": onnx_model.info.sha256,
            "calibration_frames": len(images),
            "nodes_kept_float": info.excluded_nodes,
            "variants": dg.MetadataValue.json(_variants_json(variants)),
            "config": dg.MetadataValue.json(config.model_dump(mode="json")),
            "path": dg.MetadataValue.path(str(info.path)),
        },
    )
