"""The frame store on S3-compatible object storage (moto's server, started by the tests):
same contract as the folder store, a record only once its JPEG is in, create-only records,
the Dagster resource and the settings that choose it, MLflow artifacts and a DVC push and
restore on the same storage."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from roadloop.data.frames import FrameStore
from roadloop.data.object_frames import S3FrameStore, open_frame_store
from roadloop.errors import InvalidInputError

from .helpers import encode_jpeg, synthetic_image
from .test_frames import T0, as_stored, record


@pytest.fixture()
def store(s3_server: Any, tmp_path: Path) -> S3FrameStore:
    bucket = s3_server.new_bucket("frames")
    s = open_frame_store(f"s3://{bucket}/fleet", cache_dir=tmp_path / "cache",
                         client=s3_server.client())
    assert isinstance(s, S3FrameStore)
    return s


def _keys(store: S3FrameStore) -> list[str]:
    out = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return sorted(o["Key"] for o in out)


def test_roundtrip_uses_the_folder_layout_as_keys(store: S3FrameStore) -> None:
    img = synthetic_image(1)
    jpeg = encode_jpeg(img)
    rec = record("f1", image=img)
    written = store.write_frame(rec, jpeg)
    rec = as_stored(rec, jpeg)
    assert not written.already_existed
    assert written.path.relative_to(store.root).as_posix() == "cam_a/2026-03-01/f1.jpg"
    assert _keys(store) == ["fleet/cam_a/2026-03-01/f1.jpg", "fleet/cam_a/2026-03-01/f1.json"]
    assert store.cameras() == ["cam_a"] and store.count("cam_a") == 1
    (back, image), = list(store.iter_frames("cam_a"))
    assert back == rec and image.read_bytes() == jpeg  # downloaded into the cache
    assert store.read_record("cam_a", "f1") == rec
    assert store.read_record("cam_a", "f1", captured_at=rec.captured_at) == rec
    assert store.read_record("cam_a", "f1", captured_at=T0 + timedelta(days=1)) is None
    assert store.find_frame("cam_a", "f1") == image
    assert store.write_frame(rec, jpeg).already_existed  # a replay is a no-op
    assert store.fsck().frames_ok == 1 and store.fsck().clean
    store.remove_frame(image)
    assert _keys(store) == [] and store.find_frame("cam_a", "f1") is None


def test_a_jpeg_without_its_record_is_invisible(store: S3FrameStore) -> None:
    """A crash between the two PUTs: the JPEG is in, the record is not."""
    img = synthetic_image(2)
    rec = record("f2", image=img)
    store.client.put_object(Bucket=store.bucket, Key="fleet/cam_a/2026-03-01/f2.jpg",
                            Body=encode_jpeg(img))
    assert store.count("cam_a") == 0 and store.find_frame("cam_a", "f2") is None
    assert [p.name for p in store.fsck().orphan_images] == ["f2.jpg"]
    assert not store.write_frame(rec, encode_jpeg(img)).already_existed  # the retry lands
    assert store.count("cam_a") == 1 and store.fsck().clean


def test_the_record_is_created_once(store: S3FrameStore) -> None:
    """Two replicas racing on one frame: the record PUT is create-only, so the second writer
    is told the frame already exists and the first record stays."""
    img = synthetic_image(3)
    first = record("f3", image=img)
    store.write_frame(first, encode_jpeg(img))
    other = first.model_copy(update={"reasons": ["replay"]})
    key = "fleet/cam_a/2026-03-01/f3.json"
    real_exists = store._exists
    store._exists = lambda k: False if k == key else real_exists(k)  # the HEAD ran first
    assert store.write_frame(other, encode_jpeg(img)).already_existed
    del store._exists
    assert store.read_record("cam_a", "f3") == as_stored(first, encode_jpeg(img))


def test_bad_frames_are_refused_before_any_put(store: S3FrameStore) -> None:
    img = synthetic_image(4)
    with pytest.raises(InvalidInputError, match="not a JPEG"):
        store.write_frame(record("f4", image=img), b"not a jpeg")
    with pytest.raises(InvalidInputError, match="record says"):
        store.write_frame(record("f4", image=img), encode_jpeg(img[:50, :50]))
    assert _keys(store) == []


def test_time_window_and_store_errors(store: S3FrameStore, s3_server: Any) -> None:
    for i in range(3):
        img = synthetic_image(10 + i)
        store.write_frame(record(f"t{i}", image=img, at=T0 + timedelta(days=i)),
                          encode_jpeg(img))
    got = [r.frame_id for r, _ in store.iter_frames("cam_a", start=T0 + timedelta(days=1))]
    assert got == ["t1", "t2"]
    missing = S3FrameStore("no-such-bucket-here", cache_dir=store.root,
                           client=s3_server.client())
    with pytest.raises(OSError, match="object store"):  # the gateway's 503
        missing.write_frame(record("t9"), encode_jpeg(synthetic_image(0)))


def test_settings_choose_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.config import GatewaySettings
    from resources.storage import FrameStoreResource
    from roadloop.settings import Settings, get_settings

    assert isinstance(open_frame_store(tmp_path), FrameStore)  # the embedded default
    assert isinstance(FrameStoreResource(root=str(tmp_path)).store(), FrameStore)
    with pytest.raises(ValueError, match="bucket"):
        open_frame_store("s3:///x", cache_dir=tmp_path)
    monkeypatch.setenv("ROADLOOP_FRAME_STORE_URL", "s3://roadloop-frames/prod")
    monkeypatch.setenv("ROADLOOP_S3_ENDPOINT_URL", "http://minio:9000")
    assert Settings(home=tmp_path).frame_store_url == "s3://roadloop-frames/prod"
    get_settings.cache_clear()  # the gateway reads the platform's settings
    try:
        gw = GatewaySettings(home=tmp_path)
    finally:
        get_settings.cache_clear()
    assert (gw.frame_store_url, gw.s3_endpoint_url) == ("s3://roadloop-frames/prod",
                                                         "http://minio:9000")
    monkeypatch.setenv("ROADLOOP_FRAME_STORE_URL", "s3://Bad_Bucket")
    with pytest.raises(ValueError, match="frame_store_url"):
        Settings(home=tmp_path)


def test_mlflow_artifacts_go_to_the_object_store(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resources.mlflow_tracking import MlflowResource

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    bucket = s3_server.new_bucket("mlflow")
    tracker = MlflowResource(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="s3",
        artifact_root=f"s3://{bucket}/mlflow", s3_endpoint_url=s3_server.endpoint_url,
    ).tracker()
    run = tracker.client.create_run(tracker.experiment_id)
    report = tmp_path / "report.md"
    report.write_text("# eval\n")
    tracker.client.log_artifact(run.info.run_id, str(report))
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    uri = tracker.client.get_run(run.info.run_id).info.artifact_uri
    assert uri.startswith(f"s3://{bucket}/mlflow/")
    assert keys == [f"{uri.removeprefix(f's3://{bucket}/')}/report.md"]


def test_dvc_push_to_the_object_store_and_restore(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset version pushed to an s3:// DVC remote (dvc-s3) on moto, the local cache and
    the folder deleted, then ``roadloop dataset restore`` brings it back byte for byte, with
    the credentials DVC keeps in ``.dvc/config.local`` (none left in the environment)."""
    pytest.importorskip("dvc_s3", reason="dvc-s3 not installed")
    from launch.cli import dataset_restore
    from roadloop.data.versioning import DvcStore
    from roadloop.settings import get_settings

    bucket = s3_server.new_bucket("dvc")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ROADLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROADLOOP_DVC_REMOTE_URL", f"s3://{bucket}/datasets")
    monkeypatch.setenv("ROADLOOP_S3_ENDPOINT_URL", s3_server.endpoint_url)
    get_settings.cache_clear()
    settings = get_settings()
    store = DvcStore(Path(str(settings.dvc_repo)), str(settings.dvc_remote_url),
                     settings.s3_endpoint_url)
    store.ensure()
    data = store.repo_dir / "data" / "curated"
    files = {"images/train/a.jpg": encode_jpeg(synthetic_image(5)),
             "labels/train/a.txt": b"0 0.5 0.5 0.2 0.2\n", "data.yaml": b"names: [car]\n"}
    for rel, body in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(body)
    version = store.add_and_push(data)

    dvc_dir = store.repo_dir / ".dvc"
    assert f"endpointurl = {s3_server.endpoint_url}" in (dvc_dir / "config").read_text()
    assert "roadloop-test" not in (dvc_dir / "config").read_text()  # secrets stay local
    assert "secret_access_key = roadloop-test" in (dvc_dir / "config.local").read_text()
    pushed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="datasets/")
    keys = [o["Key"] for o in pushed.get("Contents", [])]
    assert len(keys) == len(files) + 1  # each file plus the version's .dir listing
    assert f"datasets/files/md5/{version.md5[:2]}/{version.md5[2:]}.dir" in keys

    shutil.rmtree(dvc_dir / "cache")
    shutil.rmtree(data)
    for k in s3_server.env:
        monkeypatch.delenv(k)
    try:
        dataset_restore(version.md5, tmp_path / "restored")
    finally:
        get_settings.cache_clear()
    back = tmp_path / "restored"
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) \
        == sorted(files)
    assert all((back / rel).read_bytes() == body for rel, body in files.items())
