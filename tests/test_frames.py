"""Frame store: layout, atomicity, id validation, idempotency, quality and dedupe."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from roadloop.data.curation import dedupe_near_duplicates, summarize_partition
from roadloop.data.frame_quality import FrameQuality, compute_quality, dhash_hamming
from roadloop.data.frame_records import (
    Detection,
    FrameRecord,
    checked_sidecar,
    date_folder,
    frame_sidecar,
    in_window,
    is_date_folder,
    safe_id,
    validate_id,
)
from roadloop.data.frames import FrameStore
from roadloop.errors import InvalidInputError

from .helpers import encode_jpeg, synthetic_image

T0 = datetime(2026, 3, 1, 23, 59, 50, tzinfo=UTC)


def as_stored(rec: FrameRecord, jpeg: bytes) -> FrameRecord:
    """``rec`` as a store reads it back: its sidecar states the image's SHA-256."""
    return rec.model_copy(update={"image_sha256": hashlib.sha256(jpeg).hexdigest()})


def record(
    frame_id: str,
    *,
    camera_id: str = "cam_a",
    at: datetime = T0,
    image: np.ndarray | None = None,
    reasons: list[str] | None = None,
) -> FrameRecord:
    image = synthetic_image(0) if image is None else image
    h, w = image.shape[:2]
    return FrameRecord(
        frame_id=frame_id,
        camera_id=camera_id,
        captured_at=at,
        reasons=reasons or ["base_rate"],
        source="agent",
        width=w,
        height=h,
        quality=compute_quality(image),
    )


def test_in_window_includes_start_and_excludes_end() -> None:
    rec = record("f1", at=T0)
    assert in_window(rec, None, None)
    assert in_window(rec, T0, T0 + timedelta(seconds=1))
    assert not in_window(rec, T0 + timedelta(seconds=1), None)
    assert not in_window(rec, None, T0)


def test_layout_and_roundtrip(tmp_path: Path) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(1)
    rec = record("f1", image=img).model_copy(
        update={
            "detections": [
                Detection(class_id=0, class_name="car", confidence=0.8, xyxy=(1, 2, 30, 40))
            ],
            "model_version": "sha256:abc",
        }
    )
    path, existed = store.write_frame(rec, encode_jpeg(img))
    rec = as_stored(rec, encode_jpeg(img))  # the sidecar states the image's hash
    assert not existed
    assert path == tmp_path / "cam_a" / "2026-03-01" / "f1.jpg"
    sidecar = path.with_suffix(".json")
    assert sidecar.is_file()
    assert FrameRecord.model_validate_json(sidecar.read_text()) == rec
    assert store.cameras() == ["cam_a"]
    [(back, back_path)] = list(store.iter_frames("cam_a"))
    assert back == rec and back_path == path
    # No temp files are left behind by a successful write.
    assert sorted(p.name for p in path.parent.iterdir()) == ["f1.jpg", "f1.json"]


def test_captured_at_is_utc_and_tz_aware() -> None:
    local = datetime(2026, 3, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    rec = record("f1", at=local)
    assert rec.captured_at == datetime(2026, 3, 1, 23, 0, tzinfo=UTC)
    assert rec.captured_at.utcoffset() == timedelta(0)
    with pytest.raises(ValidationError):
        record("f2", at=datetime(2026, 3, 1, 12, 0))


def test_iter_frames_time_order_across_days_and_window(tmp_path: Path) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(2)
    times = [T0 + timedelta(seconds=30), T0, T0 + timedelta(seconds=5)]  # spans two dates
    for i, t in enumerate(times):
        store.write_frame(record(f"f{i}", at=t, image=img), encode_jpeg(img))
    assert {p.name for p in (tmp_path / "cam_a").iterdir()} == {"2026-03-01", "2026-03-02"}
    got = [r.frame_id for r, _ in store.iter_frames("cam_a")]
    assert got == ["f1", "f2", "f0"]
    window = [
        r.frame_id
        for r, _ in store.iter_frames(
            "cam_a", start=T0 + timedelta(seconds=1), end=T0 + timedelta(seconds=30)
        )
    ]
    assert window == ["f2"]
    assert store.count("cam_a") == 3
    assert store.count("no_such_camera") == 0


def test_crash_leftovers_are_not_frames(tmp_path: Path) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(3)
    store.write_frame(record("good", image=img), encode_jpeg(img))
    day = tmp_path / "cam_a" / "2026-03-01"
    # What a crash can leave: temp files, and an image whose sidecar never landed.
    (day / ".half.jpg.tmp-1234abcd").write_bytes(encode_jpeg(img)[:100])
    (day / ".half.json.tmp-1234abcd").write_text(record("half", image=img).model_dump_json())
    (day / "orphan.jpg").write_bytes(encode_jpeg(img))
    assert [r.frame_id for r, _ in store.iter_frames("cam_a")] == ["good"]
    report = store.fsck()
    assert report.frames_ok == 1
    assert report.orphan_images == [day / "orphan.jpg"]
    assert sorted(p.name for p in report.temp_files) == [
        ".half.jpg.tmp-1234abcd",
        ".half.json.tmp-1234abcd",
    ]
    assert not report.clean


def test_crash_before_sidecar_leaves_no_frame(tmp_path: Path, monkeypatch) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(4)
    rec = record("f1", image=img)
    real_replace, real_link = os.replace, os.link

    # The sidecar's file never gets its name: the step that gives it one (a rename of a
    # temporary file, or on Linux a link of an unnamed one) fails.
    def failing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    def failing_link(src, dst, **kwargs):
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(OSError):
        store.write_frame(rec, encode_jpeg(img))
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "link", real_link)
    assert store.count("cam_a") == 0
    report = store.fsck()
    assert len(report.orphan_images) == 1 and report.temp_files == []
    # A retry completes the frame (the orphan is not mistaken for a stored frame).
    _path, existed = store.write_frame(rec, encode_jpeg(img))
    assert not existed and store.count("cam_a") == 1
    assert store.fsck().clean


@pytest.mark.parametrize("bad", ["..", ".", "../etc", "a/b", "a\\b", "", "x" * 65, ".hidden", "é"])
def test_id_validation_rejects_traversal(tmp_path: Path, bad: str) -> None:
    store = FrameStore(tmp_path)
    with pytest.raises(InvalidInputError):
        validate_id("camera_id", bad)
    with pytest.raises(InvalidInputError):
        list(store.iter_frames(bad))
    with pytest.raises(ValidationError):
        record(bad)
    with pytest.raises(ValidationError):
        record("ok", camera_id=bad)
    # A record that bypassed validation is still refused by the store.
    img = synthetic_image(0)
    sneaky = record("ok").model_copy(update={"frame_id": bad})
    with pytest.raises(InvalidInputError):
        store.write_frame(sneaky, encode_jpeg(img))
    assert not any(tmp_path.parent.glob("etc*"))
    assert list(tmp_path.rglob("*")) == []


def test_valid_ids_and_safe_id() -> None:
    for ok in ["cam_1", "a", "A.b-c_9", "x" * 64, "-dash"]:
        assert validate_id("frame_id", ok) == ok
    for text in ["../../etc/passwd", "a b/c", "...", "ü" * 100]:
        validate_id("frame_id", safe_id(text))
    assert safe_id("highway_overpass") == "highway_overpass"


def test_corrupt_jpeg_rejected_naming_the_id(tmp_path: Path) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(5)
    rec = record("broken_frame", image=img)
    good = encode_jpeg(img)
    for payload in [good[:3] + b"\x00" * 50, b"not an image", b""]:
        with pytest.raises(InvalidInputError) as err:
            store.write_frame(rec, payload)
        assert "broken_frame" in str(err.value)
    _ok, png = cv2.imencode(".png", img)
    with pytest.raises(InvalidInputError, match="broken_frame.*not a JPEG"):
        store.write_frame(rec, png.tobytes())
    with pytest.raises(InvalidInputError, match="96x64 but the record says 50x64"):
        store.write_frame(rec.model_copy(update={"width": 50}), good)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_idempotent_writes(tmp_path: Path) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(6)
    rec = record("f1", image=img)
    first = store.write_frame(rec, encode_jpeg(img))
    sidecar_before = first.path.with_suffix(".json").read_bytes()
    again = store.write_frame(rec, encode_jpeg(img))
    assert again.already_existed and again.path == first.path
    # Same id at another time (another date folder) or with other bytes: still a no-op.
    other = synthetic_image(7)
    later = record("f1", image=other, at=T0 + timedelta(days=3))
    third = store.write_frame(later, encode_jpeg(other))
    assert third.already_existed and third.path == first.path
    assert first.path.with_suffix(".json").read_bytes() == sidecar_before
    assert store.count("cam_a") == 1
    # Same frame id on another camera is a different frame.
    assert not store.write_frame(record("f1", camera_id="cam_b", image=img), encode_jpeg(img))[1]


def test_find_frame_looks_in_every_date_folder_and_only_at_complete_frames(
        tmp_path: Path) -> None:
    store = FrameStore(tmp_path)
    assert store.find_frame("cam_a", "f1") is None  # no camera folder yet
    img = synthetic_image(3)
    days = [T0 - timedelta(days=d) for d in range(30)]  # a store under 30-day retention
    for i, at in enumerate(days):
        store.write_frame(record(f"other{i}", image=img, at=at), encode_jpeg(img))
    oldest = store.write_frame(record("f1", image=img, at=days[-1]), encode_jpeg(img)).path
    assert store.find_frame("cam_a", "f1") == oldest
    # Written again with today's time, the frame is found where it is, not written twice.
    again = store.write_frame(record("f1", image=img, at=T0), encode_jpeg(img))
    assert again.already_existed and again.path == oldest
    # An image whose sidecar is missing (torn write) is not a stored frame; neither is a
    # file where a date folder would be, nor a hidden folder.
    torn = store.write_frame(record("f2", image=img, at=days[5]), encode_jpeg(img)).path
    torn.with_suffix(".json").unlink()
    assert store.find_frame("cam_a", "f2") is None
    (tmp_path / "cam_a" / "2026-01-01").write_bytes(b"not a folder")
    hidden = tmp_path / "cam_a" / ".staging"
    hidden.mkdir()
    (hidden / "f3.json").write_bytes(b"{}")
    (hidden / "f3.jpg").write_bytes(b"\xff\xd8")
    assert store.find_frame("cam_a", "f3") is None
    assert store.find_frame("cam_a", "f1") == oldest


def test_write_frame_can_look_in_the_records_own_date_folder_only(tmp_path: Path) -> None:
    """``look_in_other_days=False`` (the gateway, whose database decides on frame ids): a
    retry of the same record is a no-op, a torn frame is written again, and the same id
    under another day is written there (the caller removes it after its 409)."""
    store = FrameStore(tmp_path)
    img = synthetic_image(4)
    data = encode_jpeg(img)
    first = store.write_frame(record("f1", image=img), data, look_in_other_days=False)
    again = store.write_frame(record("f1", image=img), data, look_in_other_days=False)
    assert not first.already_existed and again == (first.path, True)
    other_day = store.write_frame(record("f1", image=img, at=T0 + timedelta(days=1)), data,
                                  look_in_other_days=False)
    assert not other_day.already_existed and other_day.path != first.path
    assert other_day.path.with_suffix(".json").is_file()
    # Read back from one date folder, as the gateway does.
    assert store.read_record("cam_a", "f1", captured_at=T0) == as_stored(record("f1", image=img),
                                                                         data)
    assert store.read_record("cam_a", "f1", captured_at=T0 + timedelta(days=1)) is not None
    assert store.read_record("cam_a", "f1", captured_at=T0 - timedelta(days=3)) is None
    first.path.with_suffix(".json").unlink()  # torn: the image without its sidecar
    healed = store.write_frame(record("f1", image=img), data, look_in_other_days=False)
    assert healed == (first.path, False) and first.path.with_suffix(".json").is_file()


def test_a_sidecar_made_by_the_caller_is_written_as_given(tmp_path: Path) -> None:
    """The gateway makes each sidecar once (``frame_sidecar``, checked to read back) and hands
    the bytes to ``write_frame``: those bytes are the file, the payload is still checked, and
    a record without its image's hash cannot come with caller-made bytes."""
    store = FrameStore(tmp_path)
    img = synthetic_image(5)
    data = encode_jpeg(img)
    rec = as_stored(record("f1", image=img), data)
    made = frame_sidecar(rec)
    assert made is not None and FrameRecord.model_validate_json(made) == rec
    written = store.write_frame(rec, data, sidecar=made, look_in_other_days=False)
    assert written.path.with_suffix(".json").read_bytes() == made
    assert store.read_record("cam_a", "f1") == rec
    with pytest.raises(InvalidInputError, match="payload is not a JPEG"):
        store.write_frame(record("f2", image=img), b"not a jpeg", sidecar=made)
    with pytest.raises(ValueError, match="hash"):
        checked_sidecar(record("f3", image=img), data, None, where="x", sidecar=made)
    assert store.find_frame("cam_a", "f2") is None and store.find_frame("cam_a", "f3") is None


def test_frame_sidecar_is_none_when_the_record_would_not_read_back() -> None:
    good = record("f1")
    assert frame_sidecar(good) == good.model_dump_json(indent=2).encode()
    # built without validation, as a bug could: its id fails the readers' own check
    bad = FrameRecord.model_construct(**{**dict(good), "frame_id": "../f1"})
    assert frame_sidecar(bad) is None


def test_date_folder_is_the_utc_day_in_the_form_the_readers_take() -> None:
    assert date_folder(datetime(2026, 3, 2, 1, 0, tzinfo=timezone(timedelta(hours=2)))) \
        == "2026-03-01"
    assert date_folder(datetime(999, 1, 2, tzinfo=UTC)) == "0999-01-02"  # strftime: "999-"
    assert is_date_folder(date_folder(datetime(999, 1, 2, tzinfo=UTC)))


def test_corrupt_sidecar_is_skipped_and_reported(tmp_path: Path, caplog) -> None:
    store = FrameStore(tmp_path)
    img = synthetic_image(8)
    data = encode_jpeg(img)
    p1, _ = store.write_frame(record("f1", image=img), data)
    p2, _ = store.write_frame(record("f2", image=img, at=T0 + timedelta(seconds=1)), data)
    p3, _ = store.write_frame(record("f3", image=img, at=T0 + timedelta(seconds=2)), data)
    p1.with_suffix(".json").write_text('{"frame_id": "f1", "camera_')  # truncated JSON
    bad = json.loads(p3.with_suffix(".json").read_text())
    bad["frame_id"] = "someone_else"  # valid JSON, wrong frame
    p3.with_suffix(".json").write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING, logger="roadloop.data.frame_records"):
        frames = list(store.iter_frames("cam_a"))
    assert [r.frame_id for r, _ in frames] == ["f2"]
    assert "f1.json" in caplog.text
    assert store.count("cam_a") == 1
    report = store.fsck("cam_a")
    assert sorted(report.corrupt_sidecars) == [p1.with_suffix(".json"), p3.with_suffix(".json")]
    assert report.frames_ok == 1
    # A sidecar whose image vanished is skipped too.
    p2.unlink()
    assert store.count("cam_a") == 0
    assert store.fsck().sidecars_without_image == [p2.with_suffix(".json")]


def test_quality_numbers_are_sensible() -> None:
    bright = synthetic_image(9)
    dark = (bright * 0.25).astype(np.uint8)
    blurred = cv2.GaussianBlur(bright, (0, 0), sigmaX=3)
    qb, qd, qs = compute_quality(bright), compute_quality(dark), compute_quality(blurred)
    assert 0 <= qd.brightness < qb.brightness <= 255
    assert abs(qb.brightness - cv2.cvtColor(bright, cv2.COLOR_BGR2GRAY).mean()) < 1e-6
    assert qs.sharpness < qb.sharpness
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert compute_quality(flat).sharpness == 0.0
    assert compute_quality(flat).brightness == pytest.approx(128.0)
    # One bit per horizontally adjacent pair, set where the right one is brighter.
    ramp = np.tile(np.linspace(0, 255, 90).astype(np.uint8), (64, 1))  # brighter to the right
    assert compute_quality(ramp).dhash == "f" * 16
    assert compute_quality(np.ascontiguousarray(ramp[:, ::-1])).dhash == "0" * 16
    # Grey input works and gives the same hash as its BGR version.
    grey = cv2.cvtColor(bright, cv2.COLOR_BGR2GRAY)
    assert compute_quality(grey).dhash == qb.dhash
    # dhash ignores global brightness scaling (same structure).
    assert dhash_hamming(qb.dhash, qd.dhash) <= 4
    assert dhash_hamming(qb.dhash, qb.dhash) == 0
    assert dhash_hamming("0" * 16, "f" * 16) == 64
    with pytest.raises(ValueError):
        dhash_hamming("abc", "0" * 16)
    with pytest.raises(ValidationError):
        FrameQuality(brightness=300, sharpness=1, dhash="0" * 16)


def test_dedupe_drops_exact_and_near_duplicates() -> None:
    a = synthetic_image(10)
    rng = np.random.default_rng(0)
    noisy = np.clip(a.astype(np.int16) + 8 + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    b, c = synthetic_image(11), synthetic_image(12)
    assert 1 <= dhash_hamming(compute_quality(a).dhash, compute_quality(noisy).dhash) <= 4
    assert dhash_hamming(compute_quality(a).dhash, compute_quality(b).dhash) > 4
    recs = [
        record("a", image=a, at=T0),
        record("a_copy", image=a, at=T0 + timedelta(seconds=1)),
        record("b", image=b, at=T0 + timedelta(seconds=2)),
        record("a_near", image=noisy, at=T0 + timedelta(seconds=3)),
        record("c", image=c, at=T0 + timedelta(seconds=4)),
        record("a_other_cam", camera_id="cam_b", image=a, at=T0 + timedelta(seconds=5)),
    ]
    no_quality = record("nq", at=T0 + timedelta(seconds=6)).model_copy(update={"quality": None})
    # Input order does not matter: first seen in time wins.
    kept, dropped = dedupe_near_duplicates(list(reversed(recs)) + [no_quality])
    assert [r.frame_id for r in kept] == ["a", "b", "c", "a_other_cam", "nq"]
    assert [r.frame_id for r in dropped] == ["a_copy", "a_near"]
    # max_hamming=0 keeps the near duplicate but still drops the exact copy.
    _kept0, dropped0 = dedupe_near_duplicates(recs, max_hamming=0)
    assert [r.frame_id for r in dropped0] == ["a_copy"]
    assert dedupe_near_duplicates([]) == ([], [])


def test_summarize_partition() -> None:
    a, b = synthetic_image(13), synthetic_image(14)
    kept = [
        record("a", image=a, at=T0, reasons=["base_rate"]),
        record(
            "b", image=b, at=T0 + timedelta(minutes=5), reasons=["low_confidence", "rare_class"]
        ),
    ]
    dropped = [record("a2", image=a, at=T0 + timedelta(seconds=1))]
    s = summarize_partition(kept, dropped)
    assert s.frames == 2 and s.duplicates_dropped == 1
    assert s.per_reason == {"base_rate": 1, "low_confidence": 1, "rare_class": 1}
    assert s.first_captured_at == T0 and s.last_captured_at == T0 + timedelta(minutes=5)
    expected = np.mean([kept[0].quality.brightness, kept[1].quality.brightness])
    assert s.mean_brightness == pytest.approx(expected)
    assert s.cameras == ["cam_a"]
    assert "| frames | 2 |" in s.to_markdown()
    empty = summarize_partition([], [])
    assert empty.frames == 0 and empty.mean_brightness is None and empty.first_captured_at is None
