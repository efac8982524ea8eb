"""The gateway's privacy routes (``fleet/privacy.py``) on an S3 frame store (moto's server),
and a bucket folder named like a date that is none (docs/retention.md, docs/storage.md).

- ``POST /v1/privacy/expire`` reports the bytes the store held for the frames it deleted
  (image + record, from the store's listing): it used to test the gateway's *cache* path, so
  on S3 a frame never previewed counted 0 and one previewed counted its row's size even when
  its objects were gone;
- ``POST /v1/privacy/erase`` works from the store's listing (``stored_frames``): no image is
  downloaded into the gateway's cache (it walked ``iter_frames``, which downloads each one),
  the bytes are what the bucket held, and leftovers in the range's days (an image without its
  record, a record without its image) go too;
- ``S3FrameStore`` skips a folder named like a date that is none (``2026-13-45``), as it skips
  any other name that is no date folder: listing, the platform's retention and erasure, and
  the gateway's erasure used to fail on it (``date.fromisoformat``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from roadloop.data.frame_records import FrameRecord
from roadloop.data.object_frames import S3FrameStore, open_frame_store

from . import test_fleet_gateway as gateway_tests
from .helpers import CountingS3Client as _CountingClient
from .helpers import StoredSizes, bucket_sizes, synthetic_jpeg
from .test_fleet_gateway import T0, Env, H, W, bearer, meta, post_frame

make_env = gateway_tests.make_env  # fixture: an in-process gateway
frame_jpeg = gateway_tests.frame_jpeg
DAY = f"{T0:%Y-%m-%d}"
WINDOW = {"since": (T0 - timedelta(hours=1)).isoformat(),
          "until": (T0 + timedelta(hours=1)).isoformat()}


class _Store(StoredSizes):
    """What the gateway's frame store holds, seen without it: the bucket through the raw
    client, or the folder on disk."""

    def __init__(self, env: Env, raw: Any = None, bucket: str = "") -> None:
        self.env, self.raw, self.bucket = env, raw, bucket

    def sizes(self) -> dict[str, int]:
        """Key (``<camera>/<day>/<name>``) -> size of every object or file."""
        if self.raw is None:
            root = self.env.gw.store.root
            return {p.relative_to(root).as_posix(): p.stat().st_size
                    for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
        return bucket_sizes(self.raw, self.bucket, "frames/")

    def put_raw(self, key: str, body: bytes) -> None:
        """A file or object no store writer made whole (a crash's image without its record)."""
        if self.raw is None:
            path = self.env.gw.store.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        else:
            self.raw.put_object(Bucket=self.bucket, Key=f"frames/{key}", Body=body)

    def delete_behind_the_gateway(self, frame_id: str, camera: str = "cam-a") -> None:
        """The platform's retention deleted the frame from the shared store first."""
        for ext in ("json", "jpg"):
            key = f"{camera}/{DAY}/{frame_id}.{ext}"
            if self.raw is None:
                (self.env.gw.store.root / key).unlink()
            else:
                self.raw.delete_object(Bucket=self.bucket, Key=f"frames/{key}")


def _gateway(where: str, make_env: Any, request: pytest.FixtureRequest,
             monkeypatch: pytest.MonkeyPatch) -> tuple[Env, _Store]:
    if where == "folder":
        env = make_env("home")
        return env, _Store(env)
    s3 = request.getfixturevalue("s3_server")
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3.new_bucket("gw-privacy")
    env = make_env("home", frame_store_url=f"s3://{bucket}/frames",
                   s3_endpoint_url=s3.endpoint_url)
    assert isinstance(env.gw.store, S3FrameStore)
    return env, _Store(env, s3.client(), bucket)


def _cached_jpgs(env: Env) -> list[str]:
    root = env.gw.store.root
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def _upload(env: Env, token: str, frame_id: str, jpeg: bytes, at: datetime = T0) -> None:
    r = post_frame(env.client, token, meta(frame_id, captured_at=at.isoformat()), jpeg)
    assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- expire
@pytest.mark.parametrize("where", ["folder", "object_store"])
def test_expire_reports_the_bytes_the_store_held(
        where: str, make_env: Any, frame_jpeg: bytes, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows: one never read since its upload (on S3: not in the gateway's cache), one
    previewed (cached), one whose files the platform deleted first. The bytes are the first
    two's image + record as stored; the third freed nothing here. It used to be the rows'
    image sizes when the *cache path* existed: 0 for the first on S3, the third's size when
    it was cached."""
    env, store = _gateway(where, make_env, request, monkeypatch)
    tok = env.enroll("cam-a")["access_token"]
    for fid in ("never-read", "previewed", "gone-first"):
        _upload(env, tok, fid, frame_jpeg)
    rows = {r.frame_id: r for r in env.rows()}
    for fid in ("previewed", "gone-first"):  # the gateway's preview reads them
        env.gw.store.image_path(rows[fid].path, sha256=rows[fid].sha256)
    if where == "object_store":
        assert _cached_jpgs(env) == [f"cam-a/{DAY}/gone-first.jpg", f"cam-a/{DAY}/previewed.jpg"]
    held = store.bytes_of("never-read", "previewed")
    assert held > 2 * len(frame_jpeg)  # the records count too
    store.delete_behind_the_gateway("gone-first")

    r = env.client.post("/v1/privacy/expire", headers=bearer(env.admin), json={
        "frames": [{"camera_id": "cam-a", "frame_id": f}
                   for f in ("never-read", "previewed", "gone-first")]})
    assert r.status_code == 200, r.text
    assert r.json()["frames_deleted"] == 3
    assert r.json()["bytes_deleted"] == held
    assert env.rows() == [] and store.frame_ids() == set()
    assert _cached_jpgs(env) == []  # the gateway's own copies went with the frames


# --------------------------------------------------------------------------- erase
@pytest.mark.usefixtures("leftovers_settled")
def test_erase_on_s3_downloads_nothing_and_takes_the_leftovers_of_the_range(
        make_env: Any, frame_jpeg: bytes, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The range holds an acknowledged frame, a crash's frame without a row, an image
    without its record, a record without its image, and a frame whose objects the platform
    deleted first but whose copy the gateway's cache still has. It walked ``iter_frames``:
    every image of the range downloaded into the gateway's cache just to be deleted, the
    image bytes only, and the two leftovers left in the bucket."""
    env, store = _gateway("object_store", make_env, request, monkeypatch)
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    _upload(env, tok, "acked", frame_jpeg)
    _upload(env, tok, "gone-first", frame_jpeg)
    _upload(env, tok, "same-day-later", frame_jpeg, T0 + timedelta(hours=5))
    _upload(env, tok, "next-day", frame_jpeg, T0 + timedelta(days=1))
    crash = FrameRecord(frame_id="crash", camera_id="cam-a", captured_at=T0, width=W,
                        height=H, source=f"agent:{dev['device_id']}")
    env.gw.store.write_frame(crash, frame_jpeg)  # files written, row never committed
    store.put_raw(f"cam-a/{DAY}/orphan.jpg", synthetic_jpeg(3, (W, H)))
    store.put_raw(f"cam-a/{DAY}/lost.json", b'{"not": "a record"}')
    rows = {r.frame_id: r for r in env.rows()}
    env.gw.store.image_path(rows["gone-first"].path)  # previewed, then deleted elsewhere
    store.delete_behind_the_gateway("gone-first")
    held = store.bytes_of("acked", "crash", "orphan", "lost")
    gets: list[str] = []
    env.gw.store.client = _CountingClient(env.gw.store.client, gets)

    r = env.client.post("/v1/privacy/erase", headers=bearer(env.admin),
                        json={"camera_id": "cam-a", **WINDOW})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [k for k in gets if k.endswith(".jpg")] == []  # no image downloaded
    assert _cached_jpgs(env) == []  # and the cached copy of the erased frame went
    assert store.frame_ids() == {"same-day-later", "next-day"}
    assert {r.frame_id for r in env.rows()} == {"same-day-later", "next-day"}
    assert out["bytes_deleted"] == held
    # Rows: acked, gone-first; without a row: crash, orphan, lost.
    assert (out["frames_deleted"], out["files_without_row"]) == (5, 3)


@pytest.mark.usefixtures("leftovers_settled")
def test_erase_on_the_folder_store_keeps_its_counts(
        make_env: Any, frame_jpeg: bytes, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same contract on the folder store: the bytes it held, leftovers of the range's
    day included, frames outside the range kept."""
    env, store = _gateway("folder", make_env, request, monkeypatch)
    tok = env.enroll("cam-a")["access_token"]
    _upload(env, tok, "acked", frame_jpeg)
    _upload(env, tok, "same-day-later", frame_jpeg, T0 + timedelta(hours=5))
    store.put_raw(f"cam-a/{DAY}/orphan.jpg", synthetic_jpeg(3, (W, H)))
    held = store.bytes_of("acked", "orphan")
    r = env.client.post("/v1/privacy/erase", headers=bearer(env.admin),
                        json={"camera_id": "cam-a", **WINDOW})
    assert r.status_code == 200, r.text
    assert r.json()["bytes_deleted"] == held
    assert (r.json()["frames_deleted"], r.json()["files_without_row"]) == (2, 1)
    assert store.frame_ids() == {"same-day-later"}


# --------------------------------------------------------------------------- invalid day
BAD_DAY = "2026-13-45"  # matches the date folder pattern, is no date


@pytest.fixture()
def bucket_with_a_bad_day(s3_server: Any, tmp_path: Path) -> tuple[S3FrameStore, Any, str]:
    bucket = s3_server.new_bucket("bad-day")
    raw = s3_server.client()
    store = open_frame_store(f"s3://{bucket}/frames", cache_dir=tmp_path / "cache",
                             client=s3_server.client())
    assert isinstance(store, S3FrameStore)
    jpeg = synthetic_jpeg(0, (W, H))
    rec = FrameRecord(frame_id="good", camera_id="cam-a", width=W, height=H, source="test",
                      captured_at=datetime(2026, 3, 1, 10, tzinfo=UTC))
    store.write_frame(rec, jpeg)
    for name, body in (("odd.jpg", jpeg), ("odd.json", rec.model_copy(update={
            "frame_id": "odd"}).model_dump_json().encode()), ("stray.jpg", jpeg)):
        raw.put_object(Bucket=bucket, Key=f"frames/cam-a/{BAD_DAY}/{name}", Body=body)
    return store, raw, bucket


def _keys(raw: Any, bucket: str) -> set[str]:
    return {o["Key"] for page in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])}


def test_a_bad_date_folder_is_skipped_by_listing_retention_and_erasure(
        bucket_with_a_bad_day: tuple[S3FrameStore, Any, str], tmp_path: Path) -> None:
    from roadloop.retention.erasure import erase, make_request
    from roadloop.retention.ledger import PrivacyLedger
    from roadloop.retention.policy import expire_frames, expired_frames

    store, raw, bucket = bucket_with_a_bad_day
    bad = {f"frames/cam-a/{BAD_DAY}/{n}" for n in ("odd.jpg", "odd.json", "stray.jpg")}
    day = datetime(2026, 3, 1, tzinfo=UTC)
    assert [f.frame_id for f in store.stored_frames("cam-a")] == ["good"]
    assert [f.frame_id for f in store.stored_frames("cam-a", start=day,
                                                    end=day + timedelta(days=1))] == ["good"]
    assert [r.frame_id for r, _ in store.iter_frames("cam-a")] == ["good"]
    assert store.count("cam-a") == 1 and store.read_record("cam-a", "odd") is None
    assert store.fsck("cam-a").frames_ok == 1
    # The platform's retention and erasure (both from stored_frames).
    before = datetime(2027, 1, 1, tzinfo=UTC)
    assert [f.frame_id for f in expired_frames(store, before)[0]] == ["good"]
    result = erase(make_request("cam-a", day, day + timedelta(days=1), "dpo", "test"),
                   store=store, ledger=PrivacyLedger(tmp_path / "privacy"),
                   known_cameras={"cam-a"}, artifacts_dir=tmp_path / "artifacts")
    assert result.frames_deleted == 1
    assert _keys(raw, bucket) == bad
    assert expire_frames(store, before, artifacts_dir=tmp_path / "artifacts").deleted == []
    assert _keys(raw, bucket) == bad  # not the store's: left alone


def test_the_gateways_erasure_skips_a_bad_date_folder(
        make_env: Any, frame_jpeg: bytes, s3_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.new_bucket("gw-bad-day")
    env = make_env("home", frame_store_url=f"s3://{bucket}/frames",
                   s3_endpoint_url=s3_server.endpoint_url)
    tok = env.enroll("cam-a")["access_token"]
    _upload(env, tok, "acked", frame_jpeg)
    raw = s3_server.client()
    raw.put_object(Bucket=bucket, Key=f"frames/cam-a/{BAD_DAY}/stray.jpg", Body=frame_jpeg)
    r = env.client.post("/v1/privacy/erase", headers=bearer(env.admin),
                        json={"camera_id": "cam-a", "since": "2000-01-01T00:00:00Z",
                              "until": "2099-01-01T00:00:00Z"})
    assert r.status_code == 200, r.text
    assert r.json()["frames_deleted"] == 1 and env.rows() == []
    assert _keys(raw, bucket) == {f"frames/cam-a/{BAD_DAY}/stray.jpg"}
