"""``trained_model``: the ``candidate`` detector, logged to MLflow and registered there.

Two sources, one asset (so one export, one set of benchmark gates, one promotion and rollout
path follows either): ``central`` trains with Ultralytics on the curated dataset;
``federated`` runs a Flower federation across camera sites whose frames stay on site
(``assets/federated.py``), evaluated on the curated dataset's held-out split.
"""

import shutil
from pathlib import Path
from typing import Literal

import dagster as dg

from resources import (
    ArtifactStoreResource,
    FederationResource,
    FleetResource,
    MlflowResource,
    TrainerResource,
)
from roadloop.models.mlflow_model import candidate_description, start_checkpoint_params
from roadloop.models.tracking import CANDIDATE_ALIAS, Tracker
from roadloop.models.training import configure_ultralytics, read_data_yaml, train_detector
from roadloop.settings import get_settings

from . import groups
from .federated import federate_candidate, rounds_table
from .records import CuratedDatasetVersion, TrainedModelVersion


class TrainedModelConfig(dg.Config):
    source: Literal["central", "federated"] = "central"


@dg.asset(
    group_name=groups.MODELS,
    kinds={"pytorch", "mlflow"},
    description=(
        "The candidate detector: trained on the curated dataset (source central) or federated "
        "across camera sites with Flower (source federated); registered in MLflow as `candidate`."
    ),
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainedModelConfig,
    curated_dataset: CuratedDatasetVersion,
    trainer: TrainerResource,
    federation: FederationResource,
    fleet: FleetResource,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[TrainedModelVersion]:
    configure_ultralytics(get_settings().home / "ultralytics")
    if config.source == "federated":
        return _federated(context, curated_dataset, trainer, federation, fleet, mlflow, artifacts)
    cfg = trainer.train_config()
    tracker = mlflow.tracker()
    run_id = tracker.start_run(
        f"train-{curated_dataset.version.md5[:8]}",
        tags={"roadloop.stage": "train", "roadloop.dataset_md5": curated_dataset.version.md5},
    )
    # `model` is what was asked for; what training loaded is logged as start_checkpoint.
    tracker.log_params(run_id, {**cfg.model_dump(exclude={"extra", "model"}),
                                "model_requested": cfg.model,
                                "dataset_md5": curated_dataset.version.md5})
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
    start = start_checkpoint_params(result.start_weights.path_or_name, result.start_weights.kind)
    tracker.log_params(run_id, start)
    record = _register_candidate(
        tracker, mlflow, artifacts, run_id, result.best_weights,
        tags={"dataset_md5": curated_dataset.version.md5, "imgsz": str(cfg.imgsz),
              "dagster_run_id": context.run.run_id,
              "start_checkpoint_sha256": start["start_checkpoint_sha256"]},
        imgsz=cfg.imgsz, class_names=result.class_names,
        dataset_md5=curated_dataset.version.md5, metrics=result.final_metrics,
    )
    weights = record.weights
    return dg.Output(
        record,
        metadata={
            "model_version": record.model_version,
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


def _register_candidate(
    tracker: Tracker,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
    run_id: str,
    weights_file: Path,
    *,
    tags: dict[str, str],
    imgsz: int,
    class_names: list[str],
    dataset_md5: str,
    metrics: dict[str, float],
) -> TrainedModelVersion:
    """Log final metrics and weights, register the version as ``candidate``, end the run.

    Every registered version keeps its weights at ``weights/best.pt``: the registry's
    readers (active learning, drift, camera accuracy) fetch that path. The version itself is
    the pyfunc model logged from them (signature, description; the benchmark adds the
    report and the checks' outcome).
    """
    tracker.log_metrics(run_id, {f"final/{k}": v for k, v in metrics.items()})
    best = weights_file if weights_file.name == "best.pt" else weights_file.with_name("best.pt")
    if best != weights_file:
        shutil.copy2(weights_file, best)
    tracker.log_artifact(run_id, best, "weights")
    version = tracker.register_checkpoint_model(
        mlflow.registered_model_name, run_id, best, imgsz=imgsz, tags=tags,
        description=candidate_description(run_id, tags, metrics),
    )
    tracker.set_alias(mlflow.registered_model_name, CANDIDATE_ALIAS, version.version)
    tracker.end_run(run_id)
    weights = artifacts.path("models", version.version) / "best.pt"
    shutil.copy2(best, weights)
    return TrainedModelVersion(
        registered_name=mlflow.registered_model_name,
        model_version=version.version,
        run_id=run_id,
        weights=weights,
        imgsz=imgsz,
        class_names=class_names,
        dataset_md5=dataset_md5,
        metrics=metrics,
    )


def _federated(
    context: dg.AssetExecutionContext,
    curated_dataset: CuratedDatasetVersion,
    trainer: TrainerResource,
    federation: FederationResource,
    fleet: FleetResource,
    mlflow: MlflowResource,
    artifacts: ArtifactStoreResource,
) -> dg.Output[TrainedModelVersion]:
    tracker = mlflow.tracker()
    cfg = federation.federation_config()
    run_id = tracker.start_run(
        f"federate-{cfg.strategy}-{curated_dataset.version.md5[:8]}",
        tags={"roadloop.stage": "train", "roadloop.source": "federated",
              "roadloop.dataset_md5": curated_dataset.version.md5},
    )
    try:
        result, start_note = federate_candidate(
            context, curated_dataset, federation, trainer, fleet, mlflow, artifacts, run_id
        )
    except Exception:
        tracker.end_run(run_id, status="FAILED")
        raise
    last = result.rounds[-1].eval_metrics if result.rounds else {}
    final = {k: float(v) for k, v in last.items() if k != "num_examples"}
    record = _register_candidate(
        tracker, mlflow, artifacts, run_id, result.weights,
        tags={"dataset_md5": curated_dataset.version.md5, "imgsz": str(cfg.imgsz),
              "source": "federated", "strategy": cfg.strategy,
              "dagster_run_id": context.run.run_id},
        imgsz=cfg.imgsz, class_names=read_data_yaml(curated_dataset.data_yaml),
        dataset_md5=curated_dataset.version.md5, metrics=final,
    )
    weights = record.weights
    return dg.Output(
        record,
        metadata={
            "model_version": record.model_version,
            "alias": CANDIDATE_ALIAS,
            "source": "federated",
            "strategy": cfg.strategy,
            "sites": ", ".join(result.sites),
            "rounds": dg.MetadataValue.md(rounds_table(result)),
            "start_weights": start_note,
            "mlflow_run_id": run_id,
            "epsilon": result.epsilon if result.epsilon is not None else "no DP",
            **final,
            "weights": dg.MetadataValue.path(str(weights)),
        },
    )
