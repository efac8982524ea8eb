"""``model_rollout``: the promoted model's INT8 ONNX, signed and rolled out to the fleet."""

import dagster as dg

from resources import MlflowResource
from resources.fleet_resource import FleetError, FleetResource, FleetUnavailable, stages_markdown
from roadloop.errors import InvalidInputError
from roadloop.fsutil import sha256_file
from roadloop.models.tracking import PRODUCTION_ALIAS

from . import groups
from .evaluation import production_model
from .records import QuantizedModelVersion, TrainedModelVersion, parse_label


@dg.asset(
    group_name=groups.DEPLOYMENT,
    kinds={"onnx"},
    deps=[production_model],
    description=(
        "Publishes the new production version to the fleet gateway as an Ed25519-signed manifest "
        "(INT8 ONNX, SHA-256, size, input size, classes; the model at its other input shapes as "
        "signed variants, each camera served the shape that fits its frames) and starts a staged rollout "
        "(shadow → canary 5 % → 10 → 25 → 50 → 100). The rollout-health sensor drives it."
    ),
)
def model_rollout(
    context: dg.AssetExecutionContext,
    quantized_model: QuantizedModelVersion,
    trained_model: TrainedModelVersion,
    fleet: FleetResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    version = trained_model.model_version
    production = mlflow.tracker().version_by_alias(trained_model.registered_name, PRODUCTION_ALIAS)
    if production is None or production.version != version:
        raise dg.Failure(
            f"v{version} is not the production model (production is "
            f"v{production.version if production else 'none'}): only a promoted model is rolled out"
        )
    if quantized_model.model_version != version:
        raise dg.Failure(f"INT8 model is v{quantized_model.model_version}, expected v{version}")
    # The bytes signed must be the ones quantized, gated and benchmarked: quantized_model
    # recorded each file's SHA-256 when it wrote it.
    square = (trained_model.imgsz, trained_model.imgsz)
    recorded = {square: quantized_model.info,
                **{parse_label(label): info for label, info in quantized_model.variants.items()}}
    for info in recorded.values():
        try:
            actual = sha256_file(info.path)
        except OSError as exc:
            raise dg.Failure(f"cannot roll out v{version}: cannot read {info.path} ({exc})") from exc
        if actual != info.sha256:
            raise dg.Failure(
                f"cannot roll out v{version}: {info.path} has SHA-256 {actual}, not the "
                f"{info.sha256} quantized_model recorded (the file changed since it was gated)"
            )
    try:
        published = fleet.publish(
            model_version=version,
            onnx_path=quantized_model.info.path,
            input_size=trained_model.imgsz,
            class_names=trained_model.class_names,
            fmt="onnx-int8",
            input_shape=(trained_model.imgsz, trained_model.imgsz),
            variants=quantized_model.variant_files() or None,
            # hashed once, into the manifest, and refused there if a file changed since the
            # check above: what is signed is what was gated
            expected_sha256=quantized_model.info.sha256,
            expected_variant_sha256={shape: info.sha256 for shape, info in recorded.items()
                                     if shape != square} or None,
        )
        rollout = fleet.create_rollout(published["manifest_sha256"])
    except InvalidInputError as exc:
        raise dg.Failure(f"cannot roll out v{version}: {exc}; nothing was published") from exc
    except FleetUnavailable as exc:
        raise dg.Failure(f"cannot roll out v{version}: {exc}") from exc
    except FleetError as exc:
        raise dg.Failure(f"the fleet gateway refused the rollout of v{version}: {exc}") from exc
    manifest = published["manifest"]
    context.log.info(
        f"rollout {rollout['rollout_id']} of v{version} started at stage {rollout['stage']} "
        f"({rollout['cohort_size']}/{rollout['devices']} devices)"
    )
    return dg.MaterializeResult(
        metadata={
            "rollout_id": rollout["rollout_id"],
            "model_version": version,
            # The state when this run published it; the rollout moves on at the gateway and
            # rollout_health_sensor records each later state (and the final one) as an
            # observation of this asset (Events tab), so these keys say "at start".
            "status_at_start": rollout["status"],
            "stage_at_start": rollout["stage"],
            "percent_at_start": float(rollout["percent"]),
            "current_state": "see this asset's latest observation (rollout_health_sensor)",
            "cohort_size": int(rollout["cohort_size"]),
            "devices": int(rollout["devices"]),
            "stages": dg.MetadataValue.md(stages_markdown(rollout)),
            "hold_seconds": float(rollout["hold_seconds"]),
            "manifest_sha256": published["manifest_sha256"],
            "model_sha256": manifest["sha256"],
            "input_shapes": dg.MetadataValue.json(
                [manifest.get("input_shape")] + [v["input_shape"] for v in manifest.get("variants", [])]
            ),
            "key_id": published["key_id"],
            "gateway": dg.MetadataValue.url(fleet.gateway_url),
            "previous_model_version": rollout.get("previous_model_version") or "none",
        }
    )

