"""new_camera_sensor on a real (ephemeral) Dagster instance: a first tick without a cursor does
not re-request partitions that are already materialized from the same frames; new cameras and
cameras with new frames are requested."""

from pathlib import Path

import dagster as dg

from tests.test_active_learning_assets import _ingest, _textured, _write_frame


def _tick(instance: dg.DagsterInstance, frames: Path, cursor: str | None) -> dg.SensorResult:
    from resources import FrameStoreResource
    from sensors.new_camera import new_camera_sensor

    ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                  resources={"frame_store": FrameStoreResource(root=str(frames))})
    result = new_camera_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


def _requested(result: dg.SensorResult) -> list[str]:
    return sorted(str(r.partition_key) for r in result.run_requests or [])


def _added(result: dg.SensorResult) -> list[str]:
    return sorted(p for req in result.dynamic_partitions_requests or [] for p in req.partition_keys)


def test_first_tick_skips_materialized_partitions(tmp_path: Path) -> None:
    from resources import ArtifactStoreResource, FrameStoreResource
    from roadloop.data.frames import FrameStore

    store = FrameStore(tmp_path / "frames")
    for cam, seed in (("cam_a", 0), ("cam_b", 10), ("cam_d", 30)):
        _write_frame(store, cam, f"{cam}_0", 0, _textured(seed))
        _write_frame(store, cam, f"{cam}_1", 60, _textured(seed + 1))
    resources = {
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
        "frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
        "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
    }
    instance = dg.DagsterInstance.ephemeral()
    _ingest(instance, resources, ["cam_a"])  # what `roadloop demo` leaves behind
    instance.add_dynamic_partitions("cameras", ["cam_b", "cam_d"])
    key = dg.AssetKey("sampled_edge_frames")
    built = instance.get_latest_materialization_event(key)
    assert built is not None and built.asset_materialization is not None
    assert built.asset_materialization.metadata["store_frames"].value == 2
    instance.report_runless_asset_event(dg.AssetMaterialization(  # built from its 2 frames
        key, partition="cam_b", metadata={"store_frames": 2}))
    # A materialization from before `store_frames` was recorded counts as current.
    instance.report_runless_asset_event(dg.AssetMaterialization(key, partition="cam_d"))
    _write_frame(store, "cam_b", "cam_b_2", 120, _textured(12))  # arrived after its run
    _write_frame(store, "cam_c", "cam_c_0", 0, _textured(20))  # a camera never seen

    first = _tick(instance, tmp_path / "frames", cursor=None)
    # cam_a: built from these very frames; cam_d: built, frame count unknown
    assert _requested(first) == ["cam_b", "cam_c"]
    assert _added(first) == ["cam_c"]

    instance.add_dynamic_partitions("cameras", ["cam_c"])
    again = _tick(instance, tmp_path / "frames", cursor=first.cursor)
    assert _requested(again) == [] and _added(again) == []
    _write_frame(store, "cam_a", "cam_a_2", 120, _textured(3))
    later = _tick(instance, tmp_path / "frames", cursor=again.cursor)
    assert _requested(later) == ["cam_a"]
    # camera:count:storage id of the materialization it refreshes (sensors/new_camera.py)
    built_a = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=["cam_a"]), limit=1).records
    assert [r.run_key for r in later.run_requests or []] == [f"cam_a:3:{built_a[0].storage_id}"]


def test_first_tick_on_an_empty_instance_requests_every_camera(tmp_path: Path) -> None:
    from roadloop.data.frames import FrameStore

    store = FrameStore(tmp_path / "frames")
    _write_frame(store, "cam_a", "a0", 0, _textured(0))
    first = _tick(dg.DagsterInstance.ephemeral(), tmp_path / "frames", cursor=None)
    assert _requested(first) == ["cam_a"] and _added(first) == ["cam_a"]
