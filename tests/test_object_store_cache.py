"""The object store's local image cache (``roadloop.data.object_frames``): a cached copy is
served only while it is the object in the store (an erased or replaced frame never comes back
from another replica's cache), and images unused for the TTL leave the disk
(``S3FrameStore.sweep_cache``, run by the gateway on a timer). Two stores on one bucket with
their own cache folders stand for two gateway replicas."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from roadloop.data import image_cache
from roadloop.data.object_frames import S3FrameStore, open_frame_store

from . import test_fleet_gateway as gateway_tests
from .helpers import encode_jpeg, synthetic_image, synthetic_jpeg
from .test_fleet_gateway import H, W, bearer, meta, post_frame
from .test_frames import record

make_env = gateway_tests.make_env  # fixture: an in-process gateway
REL = "cam_a/2026-03-01/f1.jpg"  # record("f1")'s image


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _age(path: Path, seconds: float) -> None:
    """Make ``path`` look unused for ``seconds`` (its mtime: what the sweep ages)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _sweep_due(store: S3FrameStore) -> None:
    """Make the next (unforced) sweep of ``store``'s cache due."""
    marker = store.root / image_cache.SWEEP_MARKER
    marker.touch()
    _age(marker, store.sweep_interval_s + 1)


def _replicas(s3_server: Any, tmp_path: Path, **kw: Any) -> tuple[S3FrameStore, S3FrameStore]:
    bucket = s3_server.new_bucket("cache")
    stores = []
    for name in ("a", "b"):
        s = open_frame_store(f"s3://{bucket}/fleet", cache_dir=tmp_path / name,
                             client=s3_server.client(), **kw)
        assert isinstance(s, S3FrameStore)
        stores.append(s)
    return stores[0], stores[1]


@pytest.fixture()
def replicas(s3_server: Any, tmp_path: Path) -> tuple[S3FrameStore, S3FrameStore]:
    """Replica A and replica B: one bucket, a cache folder each."""
    return _replicas(s3_server, tmp_path)


@pytest.fixture()
def swept(s3_server: Any, tmp_path: Path) -> tuple[S3FrameStore, S3FrameStore]:
    """The same with a one-hour TTL (the gateway's default)."""
    return _replicas(s3_server, tmp_path, cache_ttl_s=3600)


@pytest.fixture()
def jpegs() -> tuple[bytes, bytes]:
    """Two different frames of the same size (the second: a re-upload under the same id)."""
    one, two = encode_jpeg(synthetic_image(1)), encode_jpeg(synthetic_image(2))
    assert one != two
    return one, two


def test_an_erased_frame_is_not_served_from_another_replicas_cache(
        replicas: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    a, b = replicas
    old, _ = jpegs
    written = a.write_frame(record("f1", image=synthetic_image(1)), old)
    assert b.image_path(REL).read_bytes() == old  # B downloads it into its cache
    assert (b.root / REL).is_file()
    a.remove_frame(written.path)  # erased through A: B's cache is out of A's reach
    with pytest.raises(FileNotFoundError):  # the store is asked, not the cache
        b.image_path(REL)
    assert not (b.root / REL).exists()  # and the stale copy is gone with the answer
    assert b.find_frame("cam_a", "f1") is None
    assert list(b.iter_frames("cam_a")) == []


def test_a_replaced_frame_is_downloaded_again(
        replicas: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    """Erased, then stored again under the same id with other pixels: every way B reads the
    frame gives the new bytes, the ones in the store."""
    a, b = replicas
    old, new = jpegs
    rec = record("f1", image=synthetic_image(1))
    written = a.write_frame(rec, old)
    assert b.image_path(REL, sha256=_sha(old)).read_bytes() == old
    a.remove_frame(written.path)
    a.write_frame(rec, new)
    # With the row's hash (the gateway's preview): the cached bytes are not those.
    assert b.image_path(REL, sha256=_sha(new)).read_bytes() == new
    (b.root / REL).write_bytes(old)  # B's cache holds the old bytes again
    # Without a hash: a conditional GET on the cached bytes' ETag; the store has others.
    assert b.image_path(REL).read_bytes() == new
    (b.root / REL).write_bytes(old)
    assert b.find_frame("cam_a", "f1") is not None
    assert (b.root / REL).read_bytes() == new
    (b.root / REL).write_bytes(old)
    assert [p.read_bytes() for _, p in b.iter_frames("cam_a")] == [new]


def test_a_current_copy_is_reused_without_downloading(
        replicas: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    """A hit keeps the same file (no rewrite): with the hash no request at all, without it
    a 304 (no body)."""
    a, b = replicas
    old, _ = jpegs
    a.write_frame(record("f1", image=synthetic_image(1)), old)
    first = b.image_path(REL).stat().st_ino
    assert b.image_path(REL).stat().st_ino == first  # 304: not downloaded again
    calls: list[str] = []
    real = b.client.get_object
    b.client.get_object = lambda **kw: calls.append(kw["Key"]) or real(**kw)  # type: ignore
    try:
        assert b.image_path(REL, sha256=_sha(old)).stat().st_ino == first
        assert calls == []  # the hash matched: the store was not asked
        assert b.image_path(REL, sha256=_sha(b"other")).read_bytes() == old
        assert calls == ["fleet/" + REL]  # a stale hash is a miss, never a wrong answer
    finally:
        del b.client.get_object


def test_the_sweep_deletes_images_unused_for_the_ttl(
        swept: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    a, b = swept
    old, new = jpegs
    a.write_frame(record("f1", image=synthetic_image(1)), old)
    a.write_frame(record("f2", image=synthetic_image(2)), new)
    stale, used = b.root / REL, b.root / "cam_a/2026-03-01/f2.jpg"
    b.image_path(REL)
    b.image_path("cam_a/2026-03-01/f2.jpg")
    _age(stale, 3601)
    _age(used, 3601)
    assert b.image_path("cam_a/2026-03-01/f2.jpg", sha256=_sha(new)) == used  # used again now
    # Not the cache's: a folder store's frame (record beside it), another file, a link.
    day = stale.parent
    (day / "g1.jpg").write_bytes(old)
    (day / "g1.json").write_text("{}")
    (day / "notes.txt").write_text("x")
    outside = b.root.parent / "outside.jpg"
    outside.write_bytes(old)
    (day / "l1.jpg").symlink_to(outside)
    # An interrupted download (roadloop.fsutil.write_bytes_atomic's temp name).
    temp = day / ".f3.jpg.tmp-0123456789ab"
    temp.write_bytes(b"partial")
    for p in (day / "g1.jpg", day / "g1.json", day / "notes.txt", temp):
        _age(p, 7200)
    os.utime(day / "l1.jpg", (time.time() - 7200,) * 2, follow_symlinks=False)
    assert b.sweep_cache(force=True) == 3  # f1, the temp file and the link
    assert not stale.exists() and not temp.exists() and not (day / "l1.jpg").is_symlink()
    assert used.read_bytes() == new and outside.read_bytes() == old
    assert all((day / n).exists() for n in ("g1.jpg", "g1.json", "notes.txt"))
    # A sweep is due once per interval per folder (the marker's age), whoever asks.
    _age(used, 3601)
    assert b.sweep_cache() == 0 and used.exists()
    _sweep_due(b)
    assert b.sweep_cache() == 1 and not used.exists()


def test_a_read_sweeps_when_due_and_empty_folders_go_after_the_ttl(
        swept: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    a, b = swept
    old, new = jpegs
    a.write_frame(record("f1", image=synthetic_image(1)), old)
    a.write_frame(record("f9", camera_id="cam_b", image=synthetic_image(2)), new)
    b.image_path("cam_b/2026-03-01/f9.jpg")
    day = b.root / "cam_b/2026-03-01"
    _age(day / "f9.jpg", 3601)
    _sweep_due(b)
    b.image_path(REL)  # any read runs a sweep that is due
    assert not (day / "f9.jpg").exists() and day.is_dir()  # just emptied: kept this time
    _age(day, 3601)
    _sweep_due(b)
    b.image_path(REL)
    assert not day.exists()  # empty and idle for the TTL
    _age(day.parent, 3601)
    b.sweep_cache(force=True)
    assert not day.parent.exists() and (b.root / REL).is_file()
    assert b.image_path("cam_b/2026-03-01/f9.jpg").read_bytes() == new  # folders come back


def test_without_a_ttl_nothing_is_swept(s3_server: Any, tmp_path: Path,
                                        jpegs: tuple[bytes, bytes]) -> None:
    """The platform's store (no TTL): Dagster's frame index names images in its cache."""
    s = open_frame_store(f"s3://{s3_server.new_bucket('nottl')}/fleet",
                         cache_dir=tmp_path / "c", client=s3_server.client())
    assert isinstance(s, S3FrameStore) and s.cache_ttl_s is None
    s.write_frame(record("f1", image=synthetic_image(1)), jpegs[0])
    _age(s.image_path(REL), 10 * 86400)
    assert s.sweep_cache(force=True) == 0 and (s.root / REL).is_file()
    with pytest.raises(ValueError, match="cache_ttl_s"):
        S3FrameStore("b", cache_dir=tmp_path, client=s3_server.client(), cache_ttl_s=0)


def test_gateway_replicas_preview_what_the_store_holds(
        s3_server: Any, tmp_path: Path, make_env: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit's case on two in-process gateways (one database, one bucket): B previews a
    frame; A expires it and takes a new upload under the same id: B's preview shows the new
    pixels. A erases it: B's preview has no frame, and the erased pixels leave B's disk at its
    sweep once unused for the TTL; the gateway sweeps on its own timer."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.db'}",
              "frame_store_url": f"s3://{s3_server.new_bucket('gw')}/frames",
              "s3_endpoint_url": s3_server.endpoint_url}
    a, b = make_env("a", **shared), make_env("b", **shared)
    old = synthetic_jpeg(1, (W, H), cells=(12, 9), quality=85)
    new = synthetic_jpeg(2, (W, H), cells=(12, 9), quality=85)
    dev = a.enroll("cam-c")
    preview = "/v1/cameras/cam-c/preview.jpg"
    assert post_frame(a.client, dev["access_token"], meta("c-1", "cam-c"), old).status_code == 201
    first = b.client.get(preview, headers=bearer(b.admin))
    assert first.status_code == 200
    cached = b.gw.store.root / "cam-c/2026-05-04/c-1.jpg"
    assert cached.read_bytes() == old
    expired = a.client.post("/v1/privacy/expire", headers=bearer(a.admin),
                            json={"frames": [{"camera_id": "cam-c", "frame_id": "c-1"}]})
    assert expired.status_code == 200 and expired.json()["frames_deleted"] == 1
    assert post_frame(a.client, dev["access_token"], meta("c-1", "cam-c"), new).status_code == 201
    pa = a.client.get(preview, headers=bearer(a.admin))
    pb = b.client.get(preview, headers=bearer(b.admin))
    assert pa.status_code == pb.status_code == 200
    assert pb.content == pa.content and pb.content != first.content
    assert cached.read_bytes() == new
    erased = a.client.post("/v1/privacy/erase", headers=bearer(a.admin), json={
        "camera_id": "cam-c", "since": "2000-01-01T00:00:00Z", "until": "2099-01-01T00:00:00Z"})
    assert erased.status_code == 200 and erased.json()["frames_deleted"] == 1
    assert b.client.get(preview, headers=bearer(b.admin)).status_code == 404  # no row
    assert cached.exists()  # out of A's reach; B never reads it again, its sweep takes it
    assert b.gw.store.cache_ttl_s == b.settings.frame_cache_ttl_s == 3600
    assert b.gw.cache_sweeper is not None and b.gw.cache_sweeper._thread is not None
    assert b.gw.cache_sweeper._thread.is_alive()  # the gateway's own timer
    _age(cached, b.settings.frame_cache_ttl_s + 1)
    assert b.gw.store.sweep_cache(force=True) == 1 and not cached.exists()


def _image_gets(store: S3FrameStore) -> list[tuple[str, bool]]:
    """Hook ``store``'s GETs: (key, conditional) of each image GET, appended as they go."""
    calls: list[tuple[str, bool]] = []
    real = store.client.get_object

    def get_object(**kw: Any) -> Any:
        if kw["Key"].endswith(".jpg"):
            calls.append((kw["Key"], "IfNoneMatch" in kw))
        return real(**kw)

    store.client.get_object = get_object  # type: ignore[method-assign]
    return calls


def test_the_record_states_the_image_hash_so_cached_frames_cost_no_request(
        replicas: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    """``iter_frames`` and ``find_frame`` read each frame's record anyway; it states the
    image's SHA-256, so a cached copy with those bytes is used without asking the store (it
    used to be a conditional GET per cached frame, per read). A copy that is not the
    store's is still never served."""
    a, b = replicas
    old, new = jpegs
    a.write_frame(record("f1", image=synthetic_image(1)), old)
    a.write_frame(record("f2", image=synthetic_image(1), at=record("f1").captured_at
                         + timedelta(minutes=1)), old)
    assert b.read_record("cam_a", "f1").image_sha256 == _sha(old)  # type: ignore[union-attr]
    assert [p.read_bytes() for _, p in b.iter_frames("cam_a")] == [old, old]  # downloaded
    gets = _image_gets(b)
    assert [p.read_bytes() for _, p in b.iter_frames("cam_a")] == [old, old]
    assert b.find_frame("cam_a", "f1") is not None
    assert gets == []
    (b.root / REL).write_bytes(new)  # a cached copy that is not the store's object
    assert [p.read_bytes() for _, p in b.iter_frames("cam_a")] == [old, old]
    assert gets == [("fleet/" + REL, False)]  # downloaded whole, not served


def test_a_record_without_the_hash_still_asks_the_store(
        replicas: tuple[S3FrameStore, S3FrameStore], jpegs: tuple[bytes, bytes]) -> None:
    """A sidecar written before records stated the hash: the cached copy is checked with a
    conditional GET, as before."""
    a, b = replicas
    old, _ = jpegs
    rec = record("f1", image=synthetic_image(1))
    a.client.put_object(Bucket=a.bucket, Key="fleet/" + REL, Body=old)
    a.client.put_object(Bucket=a.bucket, Key="fleet/" + REL.replace(".jpg", ".json"),
                        Body=rec.model_dump_json(indent=2).encode())
    assert b.read_record("cam_a", "f1") == rec and rec.image_sha256 is None
    assert [p.read_bytes() for _, p in b.iter_frames("cam_a")] == [old]
    gets = _image_gets(b)
    assert [p.read_bytes() for _, p in b.iter_frames("cam_a")] == [old]
    assert gets == [("fleet/" + REL, True)]  # a 304


def test_the_gateway_hashes_an_upload_once_for_its_row_and_its_record(
        s3_server: Any, tmp_path: Path, make_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row's SHA-256 and the record's are the uploaded bytes'. A replay of a frame whose
    record an older gateway wrote (no hash) is the plain duplicate it always was, not a
    frame "with other content"."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    env = make_env("h", frame_store_url=f"s3://{s3_server.new_bucket('gw')}/frames",
                   s3_endpoint_url=s3_server.endpoint_url)
    tok = env.enroll("cam-c")["access_token"]
    jpeg = synthetic_jpeg(1, (W, H), cells=(12, 9), quality=85)
    assert post_frame(env.client, tok, meta("c-1", "cam-c"), jpeg).status_code == 201
    [row] = env.rows()
    stored = env.gw.store.read_record("cam-c", "c-1")
    assert stored is not None and row.sha256 == stored.image_sha256 == _sha(jpeg)

    older = stored.model_copy(update={"image_sha256": None})  # as an older gateway wrote it
    key = f"frames/{row.path[:-len('.jpg')]}.json"
    env.gw.store.client.put_object(Bucket=env.gw.store.bucket, Key=key,
                                   Body=older.model_dump_json(indent=2).encode())
    again = post_frame(env.client, tok, meta("c-1", "cam-c"), jpeg)
    assert again.status_code == 409 and "other content" not in again.text
    assert env.gw.stats.counters["frames_other_content_refused"] == 0
