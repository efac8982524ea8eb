"""``trained_model``: Ultralytics training, logged to MLflow and registered as ``candidate``."""


import shutil

import dagster as dg

from resources import ArtifactStoreResource, MlflowResource, TrainerResource
from roadloop.models.tracking import CANDIDATE_ALIAS
from roadloop.models.training import configure_ultralytics, train_detector
from roadloop.settings import get_settings

from . import groups
from .records import CuratedDatasetVersion, TrainedModelVersion


@dg.asset(
    group_name=groups.MODELS,
    kinds={"pytorch", "mlflow"},
    description="A YOLO detector trained on the curated dataset; registered in MLflow as `candidate`.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    curated_dataset: CuratedDatasetVersion,
    trainer: TrainerResource,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[TrainedModelVersion]:
    configure_ultralytics(get_settings().home / "ultralytics")
    cfg = trainer.train_config()
    tracker = mlflow.tracker()
    run_id = tracker.start_run(
        f"train-{curated_dataset.version.md5[:8]}",
        tags={"roadloop.stage": "train", "roadloop.dataset_md5": curated_dataset.version.md5},
    )
    tracker.log_params(run_id, {**cfg.model_dump(exclude={"extra"}), "dataset_md5": curated_dataset.version.md5})
    work = artifacts.path("training", run_id)

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        context.log.info(f"epoch {epoch + 1}/{cfg.epochs}: {shown}")

    try:
        result = train_detector(cfg, curated_dataset.data_yaml, work, on_epoch_end=on_epoch_end)
    except Exception:
        tracker.end_run(run_id, status="FAILED")
        raise
    context.log.info(f"start weights: {result.start_weights.kind} ({result.start_weights.note})")
    tracker.log_metrics(run_id, {f"final/{k}": v for k, v in result.final_metrics.items()})
    tracker.log_artifact(run_id, result.best_weights, "weights")
    version = tracker.register_version(
        mlflow.registered_model_name,
        run_id,
        f"weights/{result.best_weights.name}",
        tags={"dataset_md5": curated_dataset.version.md5, "imgsz": str(cfg.imgsz)},
    )
    tracker.set_alias(mlflow.registered_model_name, CANDIDATE_ALIAS, version.version)
    tracker.end_run(run_id)

    weights = artifacts.path("models", version.version) / "best.pt"
    shutil.copy2(result.best_weights, weights)
    record = TrainedModelVersion(
        registered_name=mlflow.registered_model_name,
        model_version=version.version,
        run_id=run_id,
        weights=weights,
        imgsz=cfg.imgsz,
        class_names=result.class_names,
        dataset_md5=curated_dataset.version.md5,
        metrics=result.final_metrics,
    )
    return dg.Output(
        record,
        metadata={
            "model_version": version.version,
            "alias": CANDIDATE_ALIAS,
            "mlflow_run_id": run_id,
            "start_weights": f"{result.start_weights.kind}: {result.start_weights.path_or_name}",
            "epochs": result.epochs_run,
            "device": result.device,
            "dataset_md5": curated_dataset.version.md5,
            **{k: float(v) for k, v in result.final_metrics.items()},
            "weights": dg.MetadataValue.path(str(weights)),
        },
    )
