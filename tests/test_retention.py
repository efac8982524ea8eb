"""Retention and erasure (roadloop.retention, fleet.privacy): what goes, what stays, a crash
halfway, bad requests (docs/retention.md)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import FrameStore
from roadloop.retention.erasure import (
    ErasureRequestError,
    erase,
    make_request,
    pending_journals,
)
from roadloop.retention.ledger import PrivacyLedger, without_erased
from roadloop.retention.policy import RetentionPolicy, expire_frames

from .helpers import synthetic_jpeg

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
JPEG = synthetic_jpeg(0, (32, 24))


def _put(store: FrameStore, camera: str, frame_id: str, at: datetime) -> Path:
    rec = FrameRecord(frame_id=frame_id, camera_id=camera, captured_at=at, source="test",
                      width=32, height=24)
    return store.write_frame(rec, JPEG).path


@pytest.fixture()
def store(tmp_path: Path) -> FrameStore:
    s = FrameStore(tmp_path / "frames")
    for cam in ("cam-a", "cam-b"):
        for d in (1, 10, 40, 45):  # days before NOW
            _put(s, cam, f"{cam}-d{d}", NOW - timedelta(days=d))
    return s


def _ids(store: FrameStore) -> set[str]:
    return {r.frame_id for c in store.cameras() for r, _ in store.iter_frames(c)}


def test_retention_deletes_exactly_the_expired_frames(store: FrameStore) -> None:
    cut = RetentionPolicy(raw_frames_days=30).cutoffs(NOW)
    sizes = {p.stem: p.stat().st_size + p.with_suffix(".json").stat().st_size
             for c in store.cameras() for _, p in store.iter_frames(c)}
    seen: list[str] = []
    report = expire_frames(store, cut.frames_before, protected={"cam-b/cam-b-d45"},
                           on_deleted=lambda fs: seen.extend(f.frame_key for f in fs))
    gone = {"cam-a-d40", "cam-a-d45", "cam-b-d40"}
    assert {f.frame_id for f in report.deleted} == gone
    assert _ids(store) == {f"{c}-d{d}" for c in ("cam-a", "cam-b") for d in (1, 10)} | {
        "cam-b-d45"}
    assert report.per_camera == {"cam-a": 2, "cam-b": 1}
    assert report.kept_protected == 1
    assert report.bytes_deleted == sum(sizes[i] for i in gone)
    assert sorted(seen) == sorted(f"{i[:5]}/{i}" for i in gone)
    assert store.fsck().clean


def _erase(store: FrameStore, ledger: PrivacyLedger, **kw):
    req = make_request("cam-a", NOW - timedelta(days=41), NOW - timedelta(days=5), "dpo@city")
    return erase(req, store=store, ledger=ledger, known_cameras=store.cameras(), **kw)


class FakeReview:
    def __init__(self, keys: set[str]) -> None:
        self.keys = set(keys)

    def delete_frames(self, frame_keys) -> int:
        hit = self.keys & set(frame_keys)
        self.keys -= hit
        return len(hit)


def test_erasure_removes_the_range_reports_versioned_frames_and_excludes_them(
    store: FrameStore, tmp_path: Path
) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy")
    ledger.record_version_frames("abc123", ["cam-a/cam-a-d40", "cam-b/cam-b-d10"])
    review = FakeReview({"cam-a/cam-a-d10", "cam-a/cam-a-d1", "cam-b/cam-b-d10"})
    result = _erase(store, ledger, review=review)
    assert result.frames_deleted == 2
    assert _ids(store) == {"cam-a-d1", "cam-a-d45"} | {f"cam-b-d{d}" for d in (1, 10, 40, 45)}
    assert store.fsck().clean
    assert review.keys == {"cam-a/cam-a-d1", "cam-b/cam-b-d10"}
    assert result.review_samples_deleted == 1
    assert [(n.frame_key, n.versions) for n in result.not_removable] == [
        ("cam-a/cam-a-d40", ["abc123"])]
    excluded = ledger.excluded_frame_keys()
    assert excluded == {"cam-a/cam-a-d10", "cam-a/cam-a-d40"}
    # The next curated version reads the review export through the exclusion list.
    frames, keys = without_erased(["x", "y", "z"],
                                  ["cam-a/cam-a-d40", "cam-a/cam-a-d1", "cam-b/cam-b-d10"],
                                  excluded)
    assert (frames, keys) == (["y", "z"], ["cam-a/cam-a-d1", "cam-b/cam-b-d10"])
    events = ledger.audit_events()
    assert [e["action"] for e in events] == ["erasure_planned", "erasure_completed"]
    assert events[-1]["actor"] == "dpo@city" and events[-1]["frames_deleted"] == 2


def _unreadable(store: FrameStore, camera: str, days_ago: int) -> list[Path]:
    """Three frames no reader sees, in the day folder of ``days_ago``: a sidecar that does
    not parse, one that describes another frame, an image without a sidecar."""
    day = store.root / camera / (NOW - timedelta(days=days_ago)).strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    (day / "bad1.jpg").write_bytes(JPEG)
    (day / "bad1.json").write_text("{not json")
    (day / "bad2.jpg").write_bytes(JPEG)
    (day / "bad2.json").write_text(
        FrameRecord(frame_id="zz", camera_id=camera, captured_at=NOW, source="test", width=32,
                    height=24).model_dump_json())
    (day / "orphan9.jpg").write_bytes(JPEG)
    return sorted(day.glob("bad*")) + [day / "orphan9.jpg"]


@pytest.mark.usefixtures("leftovers_settled")
def test_erasure_and_retention_take_unreadable_frames_too(store: FrameStore,
                                                          tmp_path: Path) -> None:
    """They are not frames to any reader (iter_frames skips them), so erasure and retention
    once reported success and left the camera's pixels on disk."""
    in_range = _unreadable(store, "cam-a", 20)  # inside the erasure's day range
    outside = _unreadable(store, "cam-a", 2)  # after it
    expired = _unreadable(store, "cam-b", 50)  # a whole day past retention
    young = _unreadable(store, "cam-b", 3)
    result = _erase(store, PrivacyLedger(tmp_path / "privacy"))
    assert result.frames_deleted == 2 + 3
    assert not any(p.exists() for p in in_range) and all(p.exists() for p in outside)
    cut = RetentionPolicy(raw_frames_days=30).cutoffs(NOW)
    report = expire_frames(store, cut.frames_before)
    assert not any(p.exists() for p in expired) and all(p.exists() for p in young)
    assert {f.frame_id for f in report.deleted} >= {"bad1", "bad2", "orphan9"}


def test_an_unreadable_frame_written_just_now_is_left_for_a_later_run(store: FrameStore,
                                                                     tmp_path: Path) -> None:
    """An image without its record that was written in the last minutes may be an upload in
    flight (its record comes next): erasure and retention leave it; once it is older than
    ``IN_FLIGHT_GRACE`` it is a leftover and goes."""
    import os

    from roadloop.data.frame_records import IN_FLIGHT_GRACE

    in_range = _unreadable(store, "cam-a", 20)
    expired = _unreadable(store, "cam-b", 50)
    assert _erase(store, PrivacyLedger(tmp_path / "p1")).frames_deleted == 2  # the readable
    report = expire_frames(store, RetentionPolicy(raw_frames_days=30).cutoffs(NOW).frames_before)
    assert all(p.exists() for p in in_range + expired)
    assert not {f.frame_id for f in report.deleted} & {"bad1", "bad2", "orphan9"}
    old = (datetime.now(UTC) - IN_FLIGHT_GRACE - timedelta(seconds=5)).timestamp()
    for path in in_range + expired:
        os.utime(path, (old, old))
    assert _erase(store, PrivacyLedger(tmp_path / "p2")).frames_deleted == 3
    expire_frames(store, RetentionPolicy(raw_frames_days=30).cutoffs(NOW).frames_before)
    assert not any(p.exists() for p in in_range + expired)


@pytest.mark.usefixtures("leftovers_settled")
def test_a_planted_symlink_or_empty_image_is_no_frame(store: FrameStore, tmp_path: Path) -> None:
    """The store writes no symlinks: one planted in it would hand a file from anywhere to
    every reader. Readers skip it, fsck names it, an erasure removes the link (never its
    target)."""
    secret = tmp_path / "outside_secret.jpg"
    secret.write_bytes(JPEG)
    linked = _put(store, "cam-a", "linked", NOW - timedelta(days=20))
    linked.unlink()
    linked.symlink_to(secret)
    empty = _put(store, "cam-a", "empty", NOW - timedelta(days=20))
    empty.write_bytes(b"")
    assert {r.frame_id for r, _ in store.iter_frames("cam-a")} == {
        "cam-a-d1", "cam-a-d10", "cam-a-d40", "cam-a-d45"}
    assert sorted(p.stem for p in store.fsck("cam-a").bad_images) == ["empty", "linked"]
    result = _erase(store, PrivacyLedger(tmp_path / "privacy"))
    assert result.frames_deleted == 2 + 2
    assert not linked.is_symlink() and not empty.exists() and secret.is_file()
    assert store.fsck().clean


def test_a_crash_halfway_then_a_rerun_finishes(
    store: FrameStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy")
    _put(store, "cam-a", "cam-a-d20", NOW - timedelta(days=20))
    real = FrameStore.remove_frame
    calls = {"n": 0}

    def crashing(self: FrameStore, image: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # dies between the sidecar and the image of the 2nd frame
            image.with_suffix(".json").unlink()
            raise OSError("power cut")
        real(self, image)

    monkeypatch.setattr(FrameStore, "remove_frame", crashing)
    with pytest.raises(OSError, match="power cut"):
        _erase(store, ledger)
    assert len(store.fsck().orphan_images) == 1  # the half-deleted frame
    assert [j.request_id for j in pending_journals(ledger)]
    monkeypatch.setattr(FrameStore, "remove_frame", real)
    result = _erase(store, ledger)
    assert result.resumed and result.frames_deleted == 3
    assert _ids(store) == {"cam-a-d1", "cam-a-d45"} | {f"cam-b-d{d}" for d in (1, 10, 40, 45)}
    assert store.fsck().clean and not pending_journals(ledger)
    assert ledger.excluded_frame_keys() == {"cam-a/cam-a-d10", "cam-a/cam-a-d20",
                                            "cam-a/cam-a-d40"}


@pytest.mark.parametrize(("camera", "since", "until", "words"), [
    ("cam-x", NOW - timedelta(days=2), NOW, "unknown camera"),
    ("cam-a", NOW, NOW - timedelta(days=2), "inverted"),
    ("cam-a", NOW, NOW, "empty"),
    ("cam-a", datetime(2026, 5, 1), NOW, "timezone"),
    ("../etc", NOW - timedelta(days=2), NOW, "camera_id"),
])
def test_bad_requests_delete_nothing(store: FrameStore, tmp_path: Path, camera: str,
                                     since: datetime, until: datetime, words: str) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy")
    before = _ids(store)
    with pytest.raises(ErasureRequestError, match=words):
        erase(make_request(camera, since, until, "dpo"), store=store, ledger=ledger,
              known_cameras=store.cameras())
    assert _ids(store) == before
    assert not ledger.root.exists()


# --------------------------------------------------------------------------- FiftyOne


def test_erasure_deletes_the_review_samples_in_range(
    store: FrameStore, tmp_path: Path, fiftyone_db: Path
) -> None:
    from roadloop.labeling.review_items import ReviewItem
    from roadloop.labeling.review_store import ReviewStore

    review = ReviewStore(f"test-erase-{uuid.uuid4().hex[:8]}", database_dir=fiftyone_db)
    try:
        items = [ReviewItem(camera_id=c, frame_id=r.frame_id, image=p, width=32, height=24)
                 for c in store.cameras() for r, p in store.iter_frames(c)]
        review.push_queue(items, "b1")
        result = _erase(store, PrivacyLedger(tmp_path / "privacy"), review=review)
        assert result.review_samples_deleted == 2
        left = set(review.dataset().values("frame_key"))
        assert left == {f"{i.camera_id}/{i.frame_id}" for i in items} - {
            "cam-a/cam-a-d10", "cam-a/cam-a-d40"}
    finally:
        review.delete()


# --------------------------------------------------------------------------- gateway

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import T0, Env, assert_clear_4xx, bearer, meta, post_frame

make_env = gateway_tests.make_env
env = gateway_tests.env
frame_jpeg = gateway_tests.frame_jpeg


def test_gateway_erase_and_expire(env: Env, frame_jpeg: bytes) -> None:
    from sqlalchemy import func, select

    from fleet.db import HeartbeatRow

    dev = env.enroll("cam-a")
    for i, hours in enumerate((1, 30, 50)):
        at = (T0 - timedelta(hours=hours)).isoformat()
        r = post_frame(env.client, dev["access_token"], meta(f"f{i}", captured_at=at), frame_jpeg)
        assert r.status_code in (200, 201), r.text
    paths = {row.frame_id: env.gw.store.root / row.path for row in env.rows()}
    url, admin = "/v1/privacy/erase", bearer(env.admin)
    body = {"camera_id": "cam-a", "since": (T0 - timedelta(hours=40)).isoformat(),
            "until": (T0 - timedelta(hours=10)).isoformat()}
    assert_clear_4xx(env.client.post(url, json={**body, "camera_id": "cam-x"}, headers=admin),
                     404, "unknown camera")
    assert_clear_4xx(env.client.post(url, json={**body, "until": body["since"]}, headers=admin),
                     422, "inverted")
    assert len(env.rows()) == 3
    r = env.client.post(url, json=body, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["frames_deleted"] == 1 and r.json()["bytes_deleted"] > 0
    assert sorted(row.frame_id for row in env.rows()) == ["f0", "f2"]
    assert not paths["f1"].exists() and not paths["f1"].with_suffix(".json").exists()
    assert paths["f0"].exists()

    with env.gw.db.write() as s:
        for h in (1, 100):
            s.add(HeartbeatRow(camera_id="cam-a", device_id=dev["device_id"],
                               sent_at=T0 - timedelta(hours=h), received_at=T0,
                               schema_version=1, payload={}))
        s.commit()
    r = env.client.post("/v1/privacy/expire", headers=admin, json={
        "frames": [{"camera_id": "cam-a", "frame_id": "f2"}],
        "heartbeats_before": (T0 - timedelta(hours=48)).isoformat(),
        "traffic_before": (T0 - timedelta(days=90)).isoformat()})
    assert r.status_code == 200, r.text
    assert r.json() == {"frames_deleted": 1, "bytes_deleted": r.json()["bytes_deleted"],
                        "heartbeats_deleted": 1, "traffic_records_deleted": 0}
    assert [row.frame_id for row in env.rows()] == ["f0"]
    with env.gw.db.read() as s:
        assert s.scalar(select(func.count()).select_from(HeartbeatRow)) == 1
    actions = [a for a, _ in env.audit_actions()]
    assert "frames_erased" in actions and "retention_applied" in actions
