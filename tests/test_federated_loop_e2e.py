"""End to end: trained_model's federated source over a real Flower deployment, then the gates.

Three camera sites (a few frames each, cut from the shared datasets) run as SuperNodes
with node authentication beside a SuperLink, all on loopback; one plays a red-team site
sending NaN weights, and the gateway has not heard from the third's cameras for days (it is
not drawn). The federation's model becomes the MLflow ``candidate`` and goes
through export, quantization and the benchmark gates like a centrally trained one.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

pytestmark = pytest.mark.e2e

SITES = ("atl_day", "atl_night", "manaus_frame")


def _tiny_sites(plan_dir: Path, out: Path, train: int = 6, val: int = 2) -> Path:
    """The first frames of three sites of a site layout, as a layout of their own."""
    for site in SITES:
        for split, n in (("train", train), ("val", val)):
            images = sorted((plan_dir / site / "images" / split).iterdir())[:n]
            for sub in ("images", "labels"):
                (out / site / sub / split).mkdir(parents=True)
            for img in images:
                shutil.copy(img, out / site / "images" / split / img.name)
                label = plan_dir / site / "labels" / split / f"{img.stem}.txt"
                shutil.copy(label, out / site / "labels" / split / label.name)
        doc = yaml.safe_load((plan_dir / site / "data.yaml").read_text())
        doc["path"] = str(out / site)
        (out / site / "data.yaml").write_text(yaml.safe_dump(doc))
    return out


def test_federated_candidate_goes_through_the_same_gates(
    roadloop_home: Path, shared_dir: Path, tmp_path: Path
) -> None:
    from assets import ALL_CHECKS, LOOP_ASSETS, seed_datasets
    from resources import BenchmarkResource, FederationResource, FleetResource, build_resources
    from roadloop.federation.sites import build_site_datasets
    from roadloop.models.tracking import Tracker
    from roadloop.settings import get_settings

    settings = get_settings()
    build_site_datasets(shared_dir / "datasets", tmp_path / "plan")
    sites_dir = _tiny_sites(tmp_path / "plan", tmp_path / "sites")
    resources = build_resources(settings, profile="test")
    now = datetime.now(UTC)

    class GatewayRecords(FleetResource):  # the gateway's camera records, without a gateway
        def live_cameras(self) -> dict[str, datetime | None]:
            return {"cam-day": now, "cam-night": now, "cam-manaus": now - timedelta(days=3)}

    resources["fleet"] = GatewayRecords(gateway_url="http://127.0.0.1:9")
    resources["federation"] = FederationResource(
        rounds=1, imgsz=64, batch=4, min_train_sites=2, sites_dir=str(sites_dir),
        drills={"atl_night": "nan"},
        site_cameras={"atl_day": ["cam-day"], "atl_night": ["cam-night"],
                      "manaus_frame": ["cam-manaus"]},
        # A few frames per site keep the test short; with the red-team site refused one sound
        # update is left, which a round may aggregate only if min_train_sites allows it.
        config_overrides={"min_site_frames": 2, "min_train_sites": 1},
    )
    # The gates, not the report's breadth, are under test here (tests/test_loop_e2e.py covers
    # the per-source rows, the slices and the counting scene): one test set keeps it short.
    resources["benchmark"] = BenchmarkResource(**{**resources["benchmark"].model_dump(),
                                                  "per_source": False, "slices": [],
                                                  "counting": False})
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [seed_datasets, *LOOP_ASSETS, *ALL_CHECKS],
        selection=dg.AssetSelection.assets(*LOOP_ASSETS),
        resources=resources,
        instance=instance,
        run_config={"ops": {"trained_model": {"config": {"source": "federated"}}}},
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"trained_model", "onnx_model", "quantized_model", "benchmark_report"} <= materialized
    assert "candidate_not_worse_than_production" in {
        e.check_name for e in result.get_asset_check_evaluations()
    }

    trained = next(
        e for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "trained_model"
    ).materialization.metadata
    assert trained["source"].value == "federated"
    assert trained["sites"].value == ", ".join(SITES)
    table = trained["rounds"].value
    # manaus_frame is not drawn (its cameras are silent); atl_night's NaN update is refused.
    assert "| 1 | atl_day, atl_night | atl_day |" in table
    assert "atl_night: weights: non-finite values (first in model.0.conv.weight)" in table

    tracker = Tracker(str(settings.mlflow_tracking_uri), settings.mlflow_experiment,
                      settings.mlflow_artifact_root)
    candidate = tracker.version_by_alias(settings.registered_model_name, "candidate")
    assert candidate is not None and candidate.tags["source"] == "federated"
    from mlflow import MlflowClient

    client = MlflowClient(str(settings.mlflow_tracking_uri))
    history = client.get_metric_history(candidate.run_id, "heldout/mAP50")
    assert sorted(m.step for m in history) == [0, 1]  # the start model, then round 1
    assert [m.value for m in client.get_metric_history(candidate.run_id, "sites/rejected")] == [1]
    # The registry's readers (active learning, drift) fetch the candidate like any other.
    from assets.active_learning import current_model

    fetched = current_model(tracker, settings.registered_model_name, tmp_path / "cache")
    assert fetched.version == candidate.version and fetched.weights.is_file()
