"""The production Dagster configuration (``deploy/dagster/dagster.yaml``), checked without a
cluster: its Postgres storage on a real PostgreSQL, its K8s run launcher against the
launcher's own config schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from .helpers import encode_jpeg, synthetic_image

REPO = Path(__file__).resolve().parents[1]
DAGSTER_YAML = REPO / "deploy" / "dagster" / "dagster.yaml"


def _production_config() -> dict[str, Any]:
    return yaml.safe_load(DAGSTER_YAML.read_text())


def test_k8s_run_launcher_section_matches_its_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    monkeypatch.setenv("ROADLOOP_IMAGE", "registry.example/roadloop:1")
    section = _production_config()["run_launcher"]
    assert (section["module"], section["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(K8sRunLauncher.config_type(), section["config"])
    assert result.success, [e.message for e in result.errors]
    assert result.value["job_image"] == "registry.example/roadloop:1"


def test_postgres_storage_materializes_a_partitioned_asset(
    postgres_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    from assets.ingestion import sampled_edge_frames
    from resources import ArtifactStoreResource, FrameStoreResource
    from roadloop.data.frame_quality import compute_quality
    from roadloop.data.frame_records import FrameRecord
    from roadloop.data.frames import FrameStore

    url = urlparse(postgres_server.new_database("dagster"))
    for key, value in {"DAGSTER_PG_HOST": url.hostname, "DAGSTER_PG_PORT": str(url.port),
                       "DAGSTER_PG_USER": "postgres", "DAGSTER_PG_PASSWORD": "trust-auth",
                       "DAGSTER_PG_DB": url.path.lstrip("/")}.items():
        monkeypatch.setenv(key, value)
    # The production file minus its run launcher (it needs a cluster to start; its section
    # is checked against the schema above).
    config = _production_config()
    config.pop("run_launcher")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    store = FrameStore(tmp_path / "frames")
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    for i in range(3):
        img = synthetic_image(i, (160, 120), pattern="blocks", cells=(16, 12))
        store.write_frame(FrameRecord(
            frame_id=f"f{i}", camera_id="cam-pg", captured_at=t0 + timedelta(minutes=i),
            reasons=["base_rate"], source="agent", width=160, height=120,
            quality=compute_quality(img)), encode_jpeg(img, quality=95))

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        instance.add_dynamic_partitions("cameras", ["cam-pg"])
        result = dg.materialize(
            [sampled_edge_frames],
            partition_key="cam-pg",
            instance=instance,
            resources={
                "frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
                "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
            },
        )
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("sampled_edge_frames"))
        assert event is not None and event.run_id == result.run_id
        assert event.asset_materialization.partition == "cam-pg"
        assert event.asset_materialization.metadata["frames"].value == 3
        assert instance.get_dynamic_partitions("cameras") == ["cam-pg"]
        assert instance.get_run_by_id(result.run_id).is_success
