# ruff: noqa: F811 - the fixtures of tests/test_fleet_gateway.py are imported by name
"""POST /v1/frames/batch (fleet.intake_batch), the group durability barrier and the principal
cache for frame uploads. TestClient against a real SQLite file, as tests/test_fleet_gateway.py
(whose fixtures these tests reuse)."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import select

from fleet.auth import revoke_device
from fleet.db import Device
from fleet.intake_batch import BATCH_CONTENT_TYPE

from .test_fleet_gateway import (  # noqa: F401 - fixtures
    Env,
    bearer,
    env,
    frame_jpeg,
    make_env,
    meta,
    post_frame,
)


def batch_body(frames: list[tuple[Any, bytes]]) -> bytes:
    manifest = json.dumps({"frames": [{"metadata": m, "image_bytes": len(img)}
                                      for m, img in frames]}).encode()
    return struct.pack(">I", len(manifest)) + manifest + b"".join(img for _, img in frames)


def _prefixed(manifest: bytes) -> bytes:
    """A raw envelope with ``manifest`` as given (no image follows)."""
    return struct.pack(">I", len(manifest)) + manifest


def post_batch(env: Env, token: str, body: bytes,
               ctype: str = BATCH_CONTENT_TYPE) -> httpx.Response:
    return env.client.post("/v1/frames/batch", content=body,
                           headers={**bearer(token), "Content-Type": ctype})


def truncated(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 2] + b"\xff\xd9"


def test_mixed_batch_gives_each_frame_the_single_routes_answer(env: Env,
                                                               frame_jpeg: bytes) -> None:
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    assert post_frame(env.client, tok, meta("f-dup"), frame_jpeg).status_code == 201
    frames = [
        (meta("f-1"), frame_jpeg),
        (meta("f-dup"), frame_jpeg),
        (meta("f-bad"), truncated(frame_jpeg)),
        (meta("f-cam", camera_id="cam-b"), frame_jpeg),
        ({"camera_id": "cam-a"}, frame_jpeg),  # no frame_id
        (meta("f-2"), frame_jpeg),
    ]
    r = post_batch(env, tok, batch_body(frames))
    assert r.status_code == 200, r.text
    out = r.json()
    got = [(x["frame_id"], x["status"]) for x in out["results"]]
    assert got == [("f-1", 201), ("f-dup", 409), ("f-bad", 422), ("f-cam", 403), (None, 422),
                   ("f-2", 201)]
    assert (out["stored"], out["duplicates"], out["refused"], out["retry_later"]) == (2, 1, 3, 0)
    assert "retry-after" not in r.headers
    # The same frames alone on POST /v1/frames: the same statuses and messages.
    for (m, img), res in zip(frames[1:5], out["results"][1:5], strict=True):
        alone = post_frame(env.client, tok, m, img)
        assert (alone.status_code, alone.json()["detail"]) == (res["status"], res["detail"])
    stored = {(row.frame_id, row.device_id) for row in env.rows()}
    assert stored == {(f, dev["device_id"]) for f in ("f-dup", "f-1", "f-2")}
    for fid in ("f-1", "f-2"):
        path = env.gw.store.find_frame("cam-a", fid)
        assert path is not None and path.read_bytes() == frame_jpeg
    assert env.gw.store.find_frame("cam-a", "f-bad") is None

    replay = post_batch(env, tok, batch_body([(meta("f-1"), frame_jpeg),
                                              (meta("f-2"), frame_jpeg)]))
    assert [x["status"] for x in replay.json()["results"]] == [409, 409]
    assert len(env.rows()) == 3


@pytest.mark.parametrize("body, why", [
    (b"\x00\x00", "shorter than"),
    (struct.pack(">I", 99) + b"{}", "runs past"),
    (struct.pack(">I", 5) + b"{nope", "not valid JSON"),
    (struct.pack(">I", 2) + b"[]", "must be a JSON object"),
    (struct.pack(">I", 13) + b'{"frames":[]}', "no frames"),
    (batch_body([({"frame_id": "x"}, b"abc")])[:-1], "add up to"),
    (batch_body([({"frame_id": f"x{i}"}, b"") for i in range(5)]), "more than max_batch"),
    (struct.pack(">I", 0xFFFFFFFF) + b"{}", "over the"),
    (_prefixed(b'{"frames":' + b"[" * 40 + b"]" * 40 + b"}"), "nested deeper"),
    (_prefixed(b'{"frames":[1e999]}'), "finite numbers only"),
    (_prefixed(b'{"frames":["x"]}'), "must be an object"),
    (_prefixed(b'{"frames":[{"image_bytes":0}]}'), "must be an object"),
    (_prefixed(b'{"frames":[{"metadata":{},"image_bytes":-1}]}'), "non-negative"),
    (_prefixed(b'{"frames":[{"metadata":{},"image_bytes":true}]}'), "non-negative"),
    (_prefixed(b'{"frames":[{"metadata":{},"image_bytes":1.0}]}'), "non-negative"),
], ids=["short", "past_end", "not_json", "not_object", "empty", "sizes", "too_many",
        "manifest_length_absurd", "deep_nesting", "not_finite", "entry_not_object",
        "no_metadata", "negative_size", "bool_size", "float_size"])
def test_bad_envelope_is_422_and_stores_nothing(make_env: Any, body: bytes, why: str) -> None:
    env = make_env(max_batch_frames=4)
    tok = env.enroll()["access_token"]
    r = post_batch(env, tok, body)
    assert r.status_code == 422 and why in r.json()["detail"], r.text
    assert env.rows() == []


def test_wrong_content_type_is_415_and_oversize_is_413_unread(make_env: Any,
                                                               frame_jpeg: bytes) -> None:
    env = make_env(max_batch_bytes=len(frame_jpeg) + 2000)
    tok = env.enroll()["access_token"]
    body = batch_body([(meta("f-1"), frame_jpeg)])
    assert post_batch(env, tok, body, ctype="multipart/form-data").status_code == 415
    big = batch_body([(meta("f-1"), frame_jpeg), (meta("f-2"), frame_jpeg)])
    r = post_batch(env, tok, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert env.rows() == []
    assert post_batch(env, tok, body).json()["stored"] == 1


def test_oversized_frame_metadata_or_image_is_413_for_that_frame_only(
        make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(max_metadata_bytes=4096, max_request_bytes=len(frame_jpeg) + 10_000)
    tok = env.enroll()["access_token"]
    huge_meta = {**meta("f-meta"), "source_ref": "x" * 5000}
    frames = [(meta("f-1"), frame_jpeg), (huge_meta, frame_jpeg),
              (meta("f-img"), frame_jpeg + b"\0" * 20_000)]
    r = post_batch(env, tok, batch_body(frames))
    assert r.status_code == 200, r.text
    got = [(x["frame_id"], x["status"]) for x in r.json()["results"]]
    assert [status for _, status in got] == [201, 413, 413], r.text
    assert "metadata is larger" in r.json()["results"][1]["detail"]
    assert [row.frame_id for row in env.rows()] == ["f-1"]


def test_rate_limit_counts_frames(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(rate_limit_per_s=0.001, rate_limit_burst=3)
    tok = env.enroll()["access_token"]
    r = post_batch(env, tok, batch_body([(meta(f"f-{i}"), frame_jpeg) for i in range(5)]))
    assert [x["status"] for x in r.json()["results"]] == [201, 201, 201, 429, 429]
    assert "rate limit exceeded" in r.json()["results"][3]["detail"]
    assert len(env.rows()) == 3
    assert post_batch(env, tok, batch_body([(meta("f-9"), frame_jpeg)])).status_code == 429


def test_each_worker_takes_a_whole_batch_from_a_rested_device(make_env: Any,
                                                              frame_jpeg: bytes) -> None:
    """With four workers each holds a quarter of a device's rate, but its bucket still holds
    one full batch (``max_batch_frames``): a quarter of the default burst is 25, and an agent
    draining its backlog sends 32 frames a request, so 7 of every full batch would be 429."""
    env = make_env(workers=4)
    batch = env.settings.max_batch_frames
    assert env.settings.rate_limit_burst // 4 < batch  # the case this is about
    assert env.gw.limiter.rate == env.settings.rate_limit_per_s / 4  # the rate still divided
    tok = env.enroll()["access_token"]
    r = post_batch(env, tok, batch_body([(meta(f"f-{i}"), frame_jpeg) for i in range(batch)]))
    assert [x["status"] for x in r.json()["results"]] == [201] * batch, r.text
    tight = make_env("tight", workers=4, rate_limit_burst=3)  # never more than configured
    assert tight.gw.limiter.burst == 3


def test_switched_off_batches_answer_404(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(frame_batch_enabled=False)
    tok = env.enroll()["access_token"]
    assert post_batch(env, tok, batch_body([(meta("f-1"), frame_jpeg)])).status_code == 404


# --------------------------------------------------------------------------- durability
def test_group_sync_once_per_commit_and_a_failed_sync_acknowledges_nothing(
    env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert env.settings.frame_sync == "group"
    tok = env.enroll()["access_token"]
    calls: list[int] = []
    real_sync = env.gw.store.sync
    monkeypatch.setattr(env.gw.store, "sync", lambda: calls.append(1) or real_sync())
    before = env.gw.committer.batches
    r = post_batch(env, tok, batch_body([(meta(f"f-{i}"), frame_jpeg) for i in range(4)]))
    assert r.json()["stored"] == 4
    assert len(calls) == env.gw.committer.batches - before == 1

    def broken() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(env.gw.store, "sync", broken)
    r = post_batch(env, tok, batch_body([(meta("f-x"), frame_jpeg), (meta("f-y"), frame_jpeg)]))
    assert [x["status"] for x in r.json()["results"]] == [503, 503]
    assert "not acknowledged" in r.json()["results"][0]["detail"]
    assert r.headers["retry-after"] == "1"
    single = post_frame(env.client, tok, meta("f-z"), frame_jpeg)
    assert single.status_code == 503
    assert {row.frame_id for row in env.rows()} == {f"f-{i}" for i in range(4)}
    monkeypatch.setattr(env.gw.store, "sync", real_sync)  # healed: the retry is stored
    r = post_batch(env, tok, batch_body([(meta("f-x"), frame_jpeg)]))
    assert r.json()["stored"] == 1


def test_per_file_sync_needs_no_barrier(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(frame_sync="per_file", frame_read_back=True)
    assert env.gw.committer.before_commit is None
    tok = env.enroll()["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    r = post_batch(env, tok, batch_body([(meta("f-2"), frame_jpeg)]))
    assert r.json()["stored"] == 1 and len(env.rows()) == 2


def test_frame_store_sync_falls_back_to_fsync(tmp_path: Any, frame_jpeg: bytes,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    from roadloop.data import frames as frames_mod
    from roadloop.data.frame_records import FrameRecord
    from roadloop.data.frames import FrameStore

    store = FrameStore(tmp_path)
    rec = FrameRecord(frame_id="f-1", camera_id="cam-a", captured_at=datetime.now(UTC),
                      source="test", width=160, height=120)
    store.write_frame(rec, frame_jpeg, decoded_size=(160, 120), durable=False)
    synced: list[str] = []
    monkeypatch.setattr(store._syncfs, "sync", lambda: False)
    real_fsync = frames_mod.os.fsync
    monkeypatch.setattr(frames_mod.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    store.sync()
    assert len(synced) == 4  # image, sidecar, day folder, camera folder
    store.sync()
    assert len(synced) == 4  # nothing new written


# --------------------------------------------------------------------------- principal cache
class Seconds:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_revocation_reaches_cached_frame_principals(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(principal_cache_s=5.0)
    clock = Seconds()
    env.gw.auth_cache.clock = clock
    a, b = env.enroll("cam-a"), env.enroll("cam-b")
    assert post_frame(env.client, a["access_token"], meta("f-1"), frame_jpeg).status_code == 201
    bm = meta("f-1", camera_id="cam-b")
    assert post_frame(env.client, b["access_token"], bm, frame_jpeg).status_code == 201

    # Revoked through this gateway: refused at once.
    r = env.client.post(f"/v1/devices/{a['device_id']}/revoke", headers=bearer(env.admin))
    assert r.status_code == 200
    assert post_frame(env.client, a["access_token"], meta("f-2"), frame_jpeg).status_code == 401

    # Revoked elsewhere (another replica, the CLI): refused once the bound has passed.
    with env.gw.db.write() as session:
        revoke_device(session, session.scalar(
            select(Device).where(Device.device_id == b["device_id"])), env.clock())
        session.commit()
    bm2 = meta("f-2", camera_id="cam-b")
    clock.t += 4.9
    assert post_frame(env.client, b["access_token"], bm2, frame_jpeg).status_code == 201
    clock.t += 0.2
    r = post_frame(env.client, b["access_token"], meta("f-3", camera_id="cam-b"), frame_jpeg)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_status_change_and_expiry_reach_cached_principals(make_env: Any,
                                                           frame_jpeg: bytes) -> None:
    env = make_env(principal_cache_s=30.0)
    env.gw.auth_cache.clock = Seconds()  # frozen: only invalidation or expiry can refuse
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    r = env.client.post(f"/v1/devices/{dev['device_id']}/status",
                        json={"status": "inactive", "reason": "test"}, headers=bearer(env.admin))
    assert r.status_code == 200, r.text
    assert post_frame(env.client, tok, meta("f-2"), frame_jpeg).status_code == 403
    r = env.client.post(f"/v1/devices/{dev['device_id']}/status",
                        json={"status": "active", "reason": "test"}, headers=bearer(env.admin))
    assert post_frame(env.client, tok, meta("f-2"), frame_jpeg).status_code == 201
    assert env.client.get("/v1/manifest", headers=bearer(tok)).status_code != 401  # cached
    env.clock.advance(dev["expires_in"] + 1)  # the token's expiry is not cached away
    r = post_frame(env.client, tok, meta("f-3"), frame_jpeg)
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    r = env.client.get("/v1/manifest", headers=bearer(tok))  # nor on the read routes' cache
    assert r.status_code == 401 and "expired" in r.json()["detail"]


# --------------------------------------------------------------------------- JPEG decode
@pytest.mark.parametrize("mode", ["dc", "reduced"])
def test_corrupt_image_data_is_refused_at_either_decode_scale(
    make_env: Any, frame_jpeg: bytes, mode: str
) -> None:
    env = make_env(jpeg_decode=mode)
    tok = env.enroll()["access_token"]
    sent = {"brightness": 100.0, "sharpness": 50.0}  # the agent's: the decode is only a check
    r = post_batch(env, tok, batch_body([
        (meta("f-bad", quality=sent), truncated(frame_jpeg)),
        (meta("f-ok", quality=sent), frame_jpeg),
    ]))
    bad, ok = r.json()["results"]
    assert bad["status"] == 422 and "premature end" in bad["detail"], bad
    assert ok["status"] == 201
    assert [row.frame_id for row in env.rows()] == ["f-ok"]
    rec = env.gw.store.read_record("cam-a", "f-ok")
    assert rec is not None and rec.quality is not None and rec.quality.dhash
    assert (rec.quality.brightness, rec.quality.sharpness) == (100.0, 50.0)


def test_a_record_that_does_not_read_back_is_refused_before_writing(
    env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``frame_read_back`` off (default): the in-memory check refuses it, nothing written."""
    from fleet import frame_checks

    real = frame_checks.frame_sidecar
    monkeypatch.setattr(frame_checks, "frame_sidecar",
                        lambda rec: None if rec.frame_id == "f-skew" else real(rec))
    tok = env.enroll()["access_token"]
    r = post_batch(env, tok, batch_body([(meta("f-skew"), frame_jpeg),
                                         (meta("f-fine"), frame_jpeg)]))
    skew, fine = r.json()["results"]
    assert skew["status"] == 422 and "does not read back" in skew["detail"]
    assert fine["status"] == 201
    assert env.gw.store.find_frame("cam-a", "f-skew") is None
    assert [row.frame_id for row in env.rows()] == ["f-fine"]


def test_dc_decode_gives_a_dhash_near_the_native_one(frame_jpeg: bytes) -> None:
    from fleet.jpeg import decode_grey, inspect_jpeg, quality_scale
    from roadloop.data.frame_quality import dhash_hamming, dhash_hex

    info = inspect_jpeg(frame_jpeg)  # 160x120: 1/8 would be 20x15, too coarse for the dhash
    sent = {"brightness": 1.0, "sharpness": 1.0}
    assert quality_scale(info, sent, 1024 * 576, dc_only=True) == 2
    assert quality_scale(info, sent, 1024 * 576, dc_only=False) == 1
    assert quality_scale(info, {}, 1024 * 576, dc_only=True) == 1  # sharpness is native
    assert quality_scale(info, {**sent, "dhash": "0" * 16}, 1024 * 576, dc_only=True) == 8
    big = dataclasses.replace(info, width=640, height=360)
    assert quality_scale(big, sent, 1024 * 576, dc_only=True) == 8
    native, reduced = decode_grey(frame_jpeg, info, 1), decode_grey(frame_jpeg, info, 2)
    assert reduced.shape == (60, 80)
    assert dhash_hamming(dhash_hex(native), dhash_hex(reduced)) <= 2


def test_restart_removes_torn_frames_so_the_retry_stores_them(make_env: Any,
                                                               frame_jpeg: bytes) -> None:
    """A power cut before the group sync can leave renamed but empty files of frames that
    were never acknowledged: start-up removes them instead of giving them a row."""
    from roadloop.data.frame_records import FrameRecord

    from .test_fleet_gateway import T0, H, W

    env = make_env("home")
    dev = env.enroll()
    store = env.gw.store
    for fid in ("f-empty-jpg", "f-empty-json"):
        rec = FrameRecord(frame_id=fid, camera_id="cam-a", captured_at=T0,
                          source=f"agent:{dev['device_id']}", width=W, height=H)
        path = store.write_frame(rec, frame_jpeg, durable=False).path
    (path.parent / "f-empty-jpg.jpg").write_bytes(b"")
    (path.parent / "f-empty-json.json").write_bytes(b"")
    env.client.__exit__(None, None, None)

    env2 = make_env("home")  # restart: reconcile
    assert env2.rows() == []
    assert env2.gw.store.find_frame("cam-a", "f-empty-jpg") is None
    assert env2.gw.store.find_frame("cam-a", "f-empty-json") is None
    r = post_batch(env2, dev["access_token"], batch_body([
        (meta("f-empty-jpg"), frame_jpeg), (meta("f-empty-json"), frame_jpeg)]))
    assert r.json()["stored"] == 2


def test_a_frame_twice_in_one_batch_is_stored_once(env: Env, frame_jpeg: bytes) -> None:
    """One INSERT ... ON CONFLICT DO NOTHING for the whole batch: the first copy is stored
    (201), the second is a duplicate (409), as if sent one after the other."""
    tok = env.enroll("cam-a")["access_token"]
    r = post_batch(env, tok, batch_body([(meta("f-x"), frame_jpeg), (meta("f-y"), frame_jpeg),
                                         (meta("f-x"), frame_jpeg)]))
    assert r.status_code == 200, r.text
    assert [(x["frame_id"], x["status"]) for x in r.json()["results"]] == [
        ("f-x", 201), ("f-y", 201), ("f-x", 409)]
    assert sorted(row.frame_id for row in env.rows()) == ["f-x", "f-y"]


def test_a_failing_store_is_tried_once_per_batch(env: Env, frame_jpeg: bytes,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that fails (down, or an object store stalled for seconds an attempt) answers
    the rest of the batch without being tried again, one frame after another, past the
    agent's timeout; a bad frame before it does not stop the good ones."""
    tok = env.enroll()["access_token"]
    calls: list[str] = []

    def failing(record: Any, *a: Any, **k: Any) -> Any:
        calls.append(record.frame_id)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(env.gw.store, "write_frame", failing)
    frames = [(meta("f-bad"), truncated(frame_jpeg))] + [
        (meta(f"f-{i}"), frame_jpeg) for i in range(4)]
    r = post_batch(env, tok, batch_body(frames))
    assert [x["status"] for x in r.json()["results"]] == [422, 503, 503, 503, 503]
    assert calls == ["f-0"]
    assert "failed on an earlier frame" in r.json()["results"][2]["detail"]
    assert env.rows() == []


def test_a_cached_device_batch_is_one_thread_pool_hand_off(
    make_env: Any, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a device's principal is cached, a batch reaches the thread pool once (split and
    store), not also for the gateway dependency or the principal: each hand-off is two
    thread wake-ups and a GIL exchange per request. And the device row still records when
    it was last seen (a Core UPDATE now)."""
    env = make_env(principal_cache_s=30.0)
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    assert post_batch(env, tok, batch_body([(meta("f-0"), frame_jpeg)])).json()["stored"] == 1
    env.clock.advance(7)
    handed_off: list[str] = []
    real_run_sync = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        handed_off.append(getattr(func, "func", func).__name__)
        return await real_run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    r = post_batch(env, tok, batch_body([(meta("f-1"), frame_jpeg), (meta("f-2"), frame_jpeg)]))
    assert r.status_code == 200 and r.json()["stored"] == 2, r.text
    assert handed_off == ["_split_and_store"]
    with env.gw.db.read() as session:
        device = session.get(Device, dev["device_id"])
        assert device is not None and device.last_seen_at == env.clock()
