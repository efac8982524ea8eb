"""Camera replay: which frames may be replayed, and that replays are idempotent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from roadloop.data.frames import FrameStore
from roadloop.data.replay import (
    NIGHT_MAX_BRIGHTNESS,
    ReplayCamera,
    dataset_replay_candidates,
    default_replay_cameras,
    replay_camera,
)
from roadloop.data.splits import is_replay_frame, is_seed_frame
from roadloop.errors import InvalidInputError, MissingDataError
from roadloop.settings import Settings

from .helpers import require_shared

START = datetime(2026, 4, 1, 8, 0, tzinfo=UTC)
FRACTION = 0.3


@pytest.fixture(scope="module")
def shared_settings(shared_dir: Path, tmp_path_factory) -> Settings:
    require_shared(shared_dir / "datasets" / "atl_v2" / "images" / "train")
    return Settings(home=tmp_path_factory.mktemp("home"), shared_dir=shared_dir)


def cams_by_id(settings: Settings) -> dict[str, ReplayCamera]:
    return {c.camera_id: c for c in default_replay_cameras(settings)}


# ------------------------------------------------------------------ without shared data


def test_no_shared_data_means_no_cameras(tmp_path: Path) -> None:
    assert default_replay_cameras(Settings(home=tmp_path, shared_dir=tmp_path / "nope")) == []


def _fake_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{split}{i}.jpg"), img)
            (root / "labels" / split / f"{split}{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    cv2.imwrite(str(root / "images" / "train" / "as_png.png"), np.full((48, 64, 3), 90, np.uint8))
    (root / "images" / "train" / "corrupt.jpg").write_bytes(b"\xff\xd8\xffnot really")
    return root


def test_dataset_replay_handles_png_and_corrupt_frames(tmp_path: Path) -> None:
    cam = ReplayCamera(
        camera_id="fake_cam", kind="dataset", path=_fake_dataset(tmp_path / "ds"), source="fake"
    )
    store = FrameStore(tmp_path / "frames")
    stats = replay_camera(cam, store, start_time=START, max_frames=None, replay_fraction=1.0)
    assert (stats.written, stats.skipped_invalid, stats.already_present) == (5, 1, 0)
    frames = list(store.iter_frames("fake_cam"))
    refs = sorted(r.source_ref for r, _ in frames)
    assert refs == ["fake/train/as_png.png"] + [f"fake/train/train{i}.jpg" for i in range(4)]
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for _, p in frames)  # PNG re-encoded
    assert [r.captured_at for r, _ in frames] == [
        START + timedelta(seconds=10 * i) for i in range(5)
    ]
    by_ref = {r.source_ref: r for r, _ in frames}
    assert by_ref["fake/train/as_png.png"].labels_ref is None
    assert Path(by_ref["fake/train/train0.jpg"].labels_ref).read_text().startswith("0 ")
    again = replay_camera(cam, store, start_time=START, max_frames=None, replay_fraction=1.0)
    assert (again.written, again.already_present) == (0, 5)
    # replay_fraction 0: nothing is replayable.
    none = replay_camera(cam, FrameStore(tmp_path / "f0"), start_time=START, replay_fraction=0.0)
    assert none.written == 0


def test_missing_and_broken_inputs(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames")
    ds = ReplayCamera(camera_id="gone", kind="dataset", path=tmp_path / "nothing", source="x")
    with pytest.raises(MissingDataError):
        replay_camera(ds, store, start_time=START, replay_fraction=0.5)
    bad_video = tmp_path / "broken.mp4"
    bad_video.write_text("not a video")
    cam = ReplayCamera(camera_id="broken", kind="video", path=bad_video)
    with pytest.raises(InvalidInputError, match="broken.mp4"):
        replay_camera(cam, store, start_time=START, max_frames=3, replay_fraction=0.3)
    with pytest.raises(ValueError):
        replay_camera(cam, store, start_time=datetime(2026, 1, 1), replay_fraction=0.3)
    with pytest.raises(ValueError):
        ReplayCamera(camera_id="x", kind="dataset", path=tmp_path)  # no source
    with pytest.raises(InvalidInputError):
        ReplayCamera(camera_id="../x", kind="video", path=bad_video)


# ------------------------------------------------------------------ with shared data


def test_default_cameras(shared_settings: Settings) -> None:
    cams = cams_by_id(shared_settings)
    assert {"atl_day", "atl_night", "manaus_intersections"} <= cams.keys()
    assert {"highway_overpass", "cctv_street", "window_street"} <= cams.keys()
    assert cams["atl_night"].condition == "night" and cams["atl_day"].condition == "day"
    assert cams["atl_day"].night_max_brightness == NIGHT_MAX_BRIGHTNESS
    assert cams["cctv_street"].kind == "video" and cams["cctv_street"].path.is_file()


@pytest.mark.parametrize("source", ["atl_v2", "manaus_v4"])
def test_replay_candidates_are_disjoint_from_seed_val_test(
    shared_settings: Settings, source: str
) -> None:
    root = shared_settings.datasets_dir / source
    require_shared(root)
    cams = [c for c in default_replay_cameras(shared_settings) if c.source == source]
    assert cams
    stems = {
        split: {p.stem for p in (root / "images" / split).iterdir()}
        for split in ("train", "val", "test")
        if (root / "images" / split).is_dir()
    }
    for cam in cams:
        candidates = dataset_replay_candidates(cam, FRACTION)
        assert all(p.parent == root / "images" / "train" for p in candidates)
        replay_stems = {p.stem for p in candidates}
        seed_train = {s for s in stems["train"] if is_seed_frame(source, "train", s, FRACTION)}
        assert replay_stems and seed_train
        assert replay_stems | seed_train == stems["train"]
        assert not replay_stems & seed_train
        for split in ("val", "test"):
            assert not replay_stems & stems.get(split, set())
        # Roughly the configured share of train (deterministic, so this cannot flake).
        assert 0.15 < len(replay_stems) / len(stems["train"]) < 0.45


def test_replaying_few_dataset_frames(shared_settings: Settings, tmp_path: Path) -> None:
    cams = cams_by_id(shared_settings)
    store = FrameStore(tmp_path)
    night = replay_camera(
        cams["atl_night"], store, start_time=START, max_frames=2, replay_fraction=FRACTION
    )
    day = replay_camera(
        cams["atl_day"], store, start_time=START, max_frames=2, replay_fraction=FRACTION
    )
    manaus = replay_camera(
        cams["manaus_intersections"],
        store,
        start_time=START,
        max_frames=2,
        replay_fraction=FRACTION,
    )
    assert night.written == day.written == manaus.written == 2
    for cam_id, src in [
        ("atl_night", "atl_v2"),
        ("atl_day", "atl_v2"),
        ("manaus_intersections", "manaus_v4"),
    ]:
        frames = list(store.iter_frames(cam_id))
        assert len(frames) == 2
        for i, (rec, path) in enumerate(frames):
            assert rec.reasons == ["replay"] and rec.source == f"replay:{src}"
            split_source, split, name = rec.source_ref.split("/")
            assert (split_source, split) == (src, "train")
            assert is_replay_frame(src, "train", Path(name).stem, FRACTION)
            assert Path(rec.labels_ref).is_file()
            assert (
                Path(rec.labels_ref).parent
                == shared_settings.datasets_dir / src / "labels" / "train"
            )
            assert rec.quality is not None
            assert rec.captured_at == START + timedelta(seconds=10 * i)
            assert cv2.imread(str(path)).shape[:2] == (rec.height, rec.width)
            if cam_id == "atl_night":
                assert rec.quality.brightness < NIGHT_MAX_BRIGHTNESS
            if cam_id == "atl_day":
                assert rec.quality.brightness >= NIGHT_MAX_BRIGHTNESS
    again = replay_camera(
        cams["atl_night"], store, start_time=START, max_frames=2, replay_fraction=FRACTION
    )
    assert (again.written, again.already_present) == (0, 2)


def test_short_video_replay_is_idempotent(shared_settings: Settings, tmp_path: Path) -> None:
    require_shared(shared_settings.videos_dir / "cctv_street.mp4")
    cams = cams_by_id(shared_settings)
    assert "cctv_street" in cams, sorted(cams)  # the video is there: its camera must be too
    cam = cams["cctv_street"]
    store = FrameStore(tmp_path)
    stats = replay_camera(cam, store, start_time=START, max_frames=3, replay_fraction=FRACTION)
    assert (stats.written, stats.already_present, stats.skipped_invalid) == (3, 0, 0)
    frames = list(store.iter_frames("cctv_street"))
    assert [r.frame_id for r, _ in frames] == [
        "cctv_street-f0000000",
        "cctv_street-f0000025",
        "cctv_street-f0000050",
    ]
    for i, (rec, path) in enumerate(frames):
        assert rec.reasons == ["base_rate"] and rec.source == "video:cctv_street"
        assert (rec.width, rec.height) == (640, 360)
        assert rec.quality is not None and rec.quality.sharpness > 0
        assert rec.captured_at == START + timedelta(seconds=i)
        assert rec.labels_ref is None
        assert cv2.imread(str(path)) is not None
    # Three different moments of a moving street are not near-duplicates of each other.
    hashes = {r.quality.dhash for r, _ in frames}
    assert len(hashes) == 3
    again = replay_camera(cam, store, start_time=START, max_frames=3, replay_fraction=FRACTION)
    assert (again.written, again.already_present) == (0, 3)
    assert store.count("cctv_street") == 3
    assert store.fsck().clean
