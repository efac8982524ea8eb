"""Fleet gateway: enrollment, tokens, frame intake durability, limits, heartbeats, audit.

Unit level: FastAPI ``TestClient`` against a real SQLite file in ``tmp_path``. One e2e test
starts ``python -m fleet serve`` as a real process, SIGKILLs it mid-burst and restarts it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fleet.app import create_app
from fleet.auth import create_admin_token, hash_token
from fleet.config import GatewaySettings
from fleet.db import FrameRow, Token
from fleet.jpeg import JpegError, check_jpeg, jpeg_dimensions
from fleet.runtime import Gateway
from launch.localfleet import GatewayProcess
from roadloop.data.frame_quality import compute_quality
from roadloop.data.frame_records import FrameRecord, FrameWrite
from roadloop.data.frames import FrameStore

from .helpers import SHARED_DIR, encode_jpeg, synthetic_jpeg

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 5, 4, 12, 0, 0, tzinfo=UTC)
W, H = 160, 120


# --------------------------------------------------------------------------- helpers
class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def frame_jpeg() -> bytes:
    """A real frame from the shared videos (160x120), or a synthetic one without them."""
    videos = sorted((SHARED_DIR / "videos").glob("*.mp4"))
    if videos:
        cap = cv2.VideoCapture(str(videos[0]))
        ok, frame = cap.read()
        cap.release()
        if ok and frame is not None:
            return encode_jpeg(cv2.resize(frame, (W, H), interpolation=cv2.INTER_AREA), 85)
    return synthetic_jpeg(0, (W, H), cells=(12, 9), quality=85)


def meta(frame_id: str, camera_id: str = "cam-a", **over: Any) -> dict[str, Any]:
    m = {
        "frame_id": frame_id,
        "camera_id": camera_id,
        "captured_at": T0.isoformat(),
        "reasons": ["low_confidence"],
        "importance": 2.0,
        "model_version": "sha256:abc",
        "detections": [
            {"class_id": 0, "class_name": "car", "confidence": 0.4, "xyxy": [1, 2, 30, 40]}
        ],
        "width": W,
        "height": H,
        # What a redacting agent states: cameras redact unless configured "off".
        "redaction": {"method": "blur", "version": "test", "counts": {}, "area_share": 0.0},
    }
    m.update(over)
    return m


def post_frame(client: Any, token: str | None, metadata: Any, image: bytes) -> httpx.Response:
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(
        "/v1/frames",
        files={"image": ("f.jpg", image, "image/jpeg")},
        data={"metadata": text},
        headers=headers,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Env:
    client: TestClient
    gw: Gateway
    clock: Clock
    admin: str
    settings: GatewaySettings

    def enrollment_token(self, **body: Any) -> str:
        r = self.client.post("/v1/enrollment-tokens", json=body, headers=bearer(self.admin))
        assert r.status_code == 201, r.text
        return r.json()["enrollment_token"]

    def enroll(self, camera_id: str = "cam-a", **token_body: Any) -> dict[str, Any]:
        tok = self.enrollment_token(**token_body)
        r = self.client.post("/v1/enroll", json={"enrollment_token": tok, "camera_id": camera_id,
                                                 "agent_version": "0.1.0",
                                                 "hardware": {"cpu": "test"}})
        assert r.status_code == 201, r.text
        return r.json()

    def rows(self) -> list[FrameRow]:
        from sqlalchemy import select

        with self.gw.db.read() as s:
            return list(s.scalars(select(FrameRow)))

    def audit_actions(self) -> list[tuple[str, str]]:
        r = self.client.get("/v1/audit", params={"limit": 1000}, headers=bearer(self.admin))
        assert r.status_code == 200, r.text
        return [(e["action"], e["outcome"]) for e in r.json()]


def _admin_token(gw: Gateway, clock: Clock) -> str:
    with gw.db.write() as session:
        token, _ = create_admin_token(session, clock(), ttl_s=10 * 86400, actor="test")
        session.commit()
    return token


@pytest.fixture()
def make_env(tmp_path: Path) -> Iterator[Any]:
    opened: list[TestClient] = []

    def _make(name: str = "home", **overrides: Any) -> Env:
        settings = GatewaySettings(home=tmp_path / name, **overrides)
        clock = Clock()
        gw_app = create_app(settings, clock=clock)
        client = TestClient(gw_app)
        client.__enter__()
        opened.append(client)
        gw = gw_app.state.gateway
        return Env(client, gw, clock, _admin_token(gw, clock), settings)

    yield _make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture()
def env(make_env: Any) -> Env:
    return make_env()


def assert_clear_4xx(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    for w in words:
        assert w.lower() in detail.lower(), detail


# --------------------------------------------------------------------------- happy path
def test_enroll_post_frame_then_replay_is_409(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll("cam-a")
    assert dev["expires_in"] == 3600 and dev["scopes"] == ["camera:write"]
    assert dev["device_id"].startswith("dev-") and dev["access_token"] != dev["refresh_token"]

    r = post_frame(env.client, dev["access_token"], meta("f-0001"), frame_jpeg)
    assert r.status_code == 201, r.text
    assert r.json() == {"frame_id": "f-0001", "stored": True}

    store = FrameStore(env.settings.frame_store)
    path = store.find_frame("cam-a", "f-0001")
    assert path is not None and path.read_bytes() == frame_jpeg
    rec = FrameRecord.model_validate_json(path.with_suffix(".json").read_text())
    assert rec.source == f"agent:{dev['device_id']}" and rec.quality is not None
    assert rec.detections[0].class_name == "car" and rec.reasons == ["low_confidence"]
    (row,) = env.rows()
    assert (row.camera_id, row.frame_id, row.device_id) == ("cam-a", "f-0001", dev["device_id"])
    assert row.path == path.relative_to(store.root).as_posix() and not row.recovered

    again = post_frame(env.client, dev["access_token"], meta("f-0001"), frame_jpeg)
    assert_clear_4xx(again, 409, "frame f-0001 already stored")
    assert len(env.rows()) == 1 and store.count("cam-a") == 1

    devices = env.client.get("/v1/devices", headers=bearer(env.admin)).json()
    assert devices[0]["last_seen_at"] is not None and devices[0]["status"] == "active"


def test_tokens_are_stored_hashed_only(env: Env) -> None:
    dev = env.enroll()
    from sqlalchemy import select

    with env.gw.db.read() as s:
        hashes = set(s.scalars(select(Token.token_hash)))
    assert hash_token(dev["access_token"]) in hashes
    db_bytes = Path(env.settings.database_url.removeprefix("sqlite:///")).read_bytes()
    wal = Path(env.settings.database_url.removeprefix("sqlite:///") + "-wal")
    blob = db_bytes + (wal.read_bytes() if wal.exists() else b"")
    for secret in (dev["access_token"], dev["refresh_token"], env.admin):
        assert secret.encode() not in blob


def test_concurrent_uploads_of_one_frame_store_it_once(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll()
    codes: list[int] = []

    def worker(i: int) -> None:
        fid = "same" if i % 2 else f"f-{i}"
        codes.append(post_frame(env.client, dev["access_token"], meta(fid), frame_jpeg).status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(codes)) == [201, 409]
    assert codes.count(409) == 5  # six uploads of "same": one stored, five replays
    rows = env.rows()
    assert len(rows) == 7 and len({(r.camera_id, r.frame_id) for r in rows}) == 7
    assert FrameStore(env.settings.frame_store).fsck().frames_ok == 7


# --------------------------------------------------------------------------- enrollment / tokens
def test_enrollment_token_is_one_time_and_bound(env: Env) -> None:
    tok = env.enrollment_token()
    body = {"enrollment_token": tok, "camera_id": "cam-a", "agent_version": "1"}
    assert env.client.post("/v1/enroll", json=body).status_code == 201
    assert_clear_4xx(env.client.post("/v1/enroll", json={**body, "camera_id": "cam-b"}),
                     401, "already used")
    assert_clear_4xx(env.client.post("/v1/enroll", json={**body, "enrollment_token": "nope"}),
                     401, "unknown enrollment token")

    bound = env.enrollment_token(camera_id="cam-c")
    assert_clear_4xx(env.client.post("/v1/enroll", json={**body, "enrollment_token": bound,
                                                         "camera_id": "cam-d"}),
                     403, "for camera cam-c")
    # A camera keeps one live device until an operator revokes it.
    other = env.enrollment_token()
    assert_clear_4xx(env.client.post("/v1/enroll", json={**body, "enrollment_token": other}),
                     409, "already enrolled", "revoke")

    expiring = env.enrollment_token(ttl_s=60)
    env.clock.advance(61)
    assert_clear_4xx(env.client.post("/v1/enroll", json={**body, "enrollment_token": expiring,
                                                         "camera_id": "cam-e"}),
                     401, "expired")
    bad_scope = env.client.post("/v1/enrollment-tokens", json={"scopes": ["camera:admin"]},
                                headers=bearer(env.admin))
    assert_clear_4xx(bad_scope, 422, "camera:admin")
    assert ("enroll", "denied") in env.audit_actions()


def run_concurrently(target: Any, args: list[tuple[Any, ...]]) -> None:
    """One thread per argument tuple, all started before any is joined."""
    threads = [threading.Thread(target=target, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_one_token_one_winner(env: Env, refresh_camera: str = "cam-a") -> None:
    """Eight concurrent uses of one enrollment token, then of one refresh token: one wins.
    Shared by the SQLite tests here and the PostgreSQL ones (tests/test_fleet_postgres.py)."""
    tok = env.enrollment_token()
    codes: list[int] = []

    def enroll(i: int) -> None:
        body = {"enrollment_token": tok, "camera_id": f"cam-{i}", "agent_version": "1"}
        codes.append(env.client.post("/v1/enroll", json=body).status_code)

    run_concurrently(enroll, [(i,) for i in range(8)])
    assert sorted(codes) == [201] + [401] * 7

    dev = env.enroll(refresh_camera)
    refreshed: list[int] = []

    def refresh() -> None:
        r = env.client.post("/v1/token/refresh", json={"refresh_token": dev["refresh_token"]})
        refreshed.append(r.status_code)

    run_concurrently(refresh, [()] * 8)
    assert sorted(refreshed) == [200] + [401] * 7


def test_one_token_enrolls_one_device_and_one_refresh_rotates_once(env: Env) -> None:
    assert_one_token_one_winner(env)


def test_refresh_rotates_and_expired_access_is_401(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll()
    env.clock.advance(3601)
    expired = post_frame(env.client, dev["access_token"], meta("f-1"), frame_jpeg)
    assert_clear_4xx(expired, 401, "expired", "/v1/token/refresh")
    assert "Bearer" in expired.headers["www-authenticate"]

    r = env.client.post("/v1/token/refresh", json={"refresh_token": dev["refresh_token"]})
    assert r.status_code == 200, r.text
    new = r.json()
    assert set(new) == {"access_token", "refresh_token", "expires_in"}
    assert new["refresh_token"] != dev["refresh_token"]
    assert post_frame(env.client, new["access_token"], meta("f-1"), frame_jpeg).status_code == 201

    reused = env.client.post("/v1/token/refresh", json={"refresh_token": dev["refresh_token"]})
    assert_clear_4xx(reused, 401, "already used")
    as_access = post_frame(env.client, new["refresh_token"], meta("f-2"), frame_jpeg)
    assert_clear_4xx(as_access, 401, "not an access token")
    actions = env.audit_actions()
    assert ("token_refreshed", "ok") in actions and ("token_refresh", "denied") in actions


def test_missing_bogus_and_wrong_scope_tokens(env: Env, frame_jpeg: bytes) -> None:
    assert_clear_4xx(post_frame(env.client, None, meta("f-1"), frame_jpeg), 401, "bearer")
    assert_clear_4xx(post_frame(env.client, "garbage", meta("f-1"), frame_jpeg), 401, "unknown")

    reader = env.enroll("cam-r", scopes=["camera:read"])
    assert_clear_4xx(post_frame(env.client, reader["access_token"], meta("f-1", "cam-r"),
                                frame_jpeg), 403, "lacks scope camera:write")
    assert_clear_4xx(post_frame(env.client, env.admin, meta("f-1"), frame_jpeg), 403,
                     "lacks scope camera:write")
    writer = env.enroll("cam-w")
    assert_clear_4xx(env.client.get("/v1/devices", headers=bearer(writer["access_token"])),
                     403, "camera:admin")
    assert not env.rows()
    assert ("auth_failure", "denied") in env.audit_actions()


def test_revoked_and_inactive_devices_are_refused(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll("cam-a")
    did, token = dev["device_id"], dev["access_token"]
    r = env.client.post(f"/v1/devices/{did}/status", json={"status": "inactive"},
                        headers=bearer(env.admin))
    assert r.status_code == 200 and r.json()["status"] == "inactive"
    assert_clear_4xx(post_frame(env.client, token, meta("f-1"), frame_jpeg), 403,
                     "inactive", "only active devices")
    for status in ("maintenance", "error"):
        env.client.post(f"/v1/devices/{did}/status", json={"status": status},
                        headers=bearer(env.admin))
        assert_clear_4xx(post_frame(env.client, token, meta("f-1"), frame_jpeg), 403, status)
    env.client.post(f"/v1/devices/{did}/status", json={"status": "active"},
                    headers=bearer(env.admin))
    assert post_frame(env.client, token, meta("f-1"), frame_jpeg).status_code == 201

    r = env.client.post(f"/v1/devices/{did}/revoke", headers=bearer(env.admin))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert_clear_4xx(post_frame(env.client, token, meta("f-2"), frame_jpeg), 401, "revoked")
    assert_clear_4xx(env.client.post("/v1/token/refresh",
                                     json={"refresh_token": dev["refresh_token"]}),
                     401, "revoked")
    assert_clear_4xx(env.client.post(f"/v1/devices/{did}/status", json={"status": "active"},
                                     headers=bearer(env.admin)), 409, "revoked")
    assert_clear_4xx(env.client.post("/v1/devices/nope/revoke", headers=bearer(env.admin)),
                     404, "no device")
    # The camera can be enrolled again once its old device is revoked.
    assert env.enroll("cam-a")["device_id"] != did
    actions = env.audit_actions()
    for action in ("device_status_changed", "device_revoked", "enrolled",
                   "enrollment_token_created"):
        assert (action, "ok") in actions


def test_pending_verification_until_an_admin_activates(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll("cam-v", require_verification=True)
    assert_clear_4xx(post_frame(env.client, dev["access_token"], meta("f-1", "cam-v"),
                                frame_jpeg), 403, "pending_verification")
    env.client.post(f"/v1/devices/{dev['device_id']}/status", json={"status": "active"},
                    headers=bearer(env.admin))
    ok = post_frame(env.client, dev["access_token"], meta("f-1", "cam-v"), frame_jpeg)
    assert ok.status_code == 201


# --------------------------------------------------------------------------- bad uploads
def _with_sof_size(jpeg: bytes, w: int, h: int) -> bytes:
    """Rewrite the frame header's dimensions (a 'decompression bomb' header)."""
    b = bytearray(jpeg)
    i = 2
    while True:
        marker, seg = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            b[i + 5 : i + 7] = h.to_bytes(2, "big")
            b[i + 7 : i + 9] = w.to_bytes(2, "big")
            return bytes(b)
        i += 2 + seg


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("non_image", 422, ["not a JPEG"]),
        ("truncated", 422, ["truncated"]),
        ("corrupt_body", 422, ["does not decode"]),
        ("wrong_size", 422, ["metadata says"]),
        ("bomb_header", 422, ["at most 4096"]),
        ("malformed_json", 422, ["not valid JSON"]),
        ("not_object", 422, ["JSON object"]),
        ("missing_fields", 422, ["frame_id", "Field required"]),
        ("naive_time", 422, ["captured_at"]),
        ("bad_frame_id", 422, ["frame_id"]),
        ("bad_box", 422, ["xyxy"]),
        ("camera_mismatch", 403, ["not this device's camera"]),
        ("no_image_field", 422, ["missing form field", "image"]),
        ("not_multipart", 422, ["missing form field"]),
    ],
)
def test_bad_uploads_get_clear_4xx_and_store_nothing(
    env: Env, frame_jpeg: bytes, case: str, status: int, words: list[str]
) -> None:
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    m: Any = meta("f-bad")
    image = frame_jpeg
    if case == "non_image":
        image = b"GIF89a this is not a jpeg" * 20
    elif case == "truncated":
        image = frame_jpeg[: len(frame_jpeg) // 2]
    elif case == "corrupt_body":
        sos = frame_jpeg.index(b"\xff\xda")
        image = frame_jpeg[: sos + 2] + b"\x00\x02" + b"\xff\x00" * 10 + b"\xff\xd9"
    elif case == "wrong_size":
        m = meta("f-bad", width=W + 1)
    elif case == "bomb_header":
        image, m = _with_sof_size(frame_jpeg, 5000, 5000), meta("f-bad", width=5000, height=5000)
    elif case == "malformed_json":
        m = '{"frame_id": "f-bad", '
    elif case == "not_object":
        m = "[1, 2]"
    elif case == "missing_fields":
        m = {k: v for k, v in meta("f-bad").items() if k not in ("frame_id", "width")}
    elif case == "naive_time":
        m = meta("f-bad", captured_at="2026-05-04T12:00:00")
    elif case == "bad_frame_id":
        m = meta("../etc/passwd")
    elif case == "bad_box":
        m = meta("f-bad", detections=[{"class_id": 0, "class_name": "car", "confidence": 0.5,
                                       "xyxy": [50, 50, 10, 10]}])
    elif case == "camera_mismatch":
        m = meta("f-bad", camera_id="cam-other")
    if case == "no_image_field":
        r = env.client.post("/v1/frames", data={"metadata": json.dumps(m)}, headers=bearer(tok))
    elif case == "not_multipart":
        r = env.client.post("/v1/frames", json=m, headers=bearer(tok))
    else:
        r = post_frame(env.client, tok, m, image)
    assert_clear_4xx(r, status, *words)
    assert not env.rows()
    report = FrameStore(env.settings.frame_store).fsck()
    assert report.frames_ok == 0 and report.clean


def test_oversized_bodies_are_413(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(max_request_bytes=100_000, max_json_bytes=2_000)
    tok = env.enroll()["access_token"]
    big = frame_jpeg + b"\x00" * 150_000
    assert_clear_4xx(post_frame(env.client, tok, meta("f-big"), big), 413, "100000-byte limit")

    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to trust
        for _ in range(20):
            yield b"x" * 10_000

    streamed = env.client.post(
        "/v1/frames", content=chunks(),
        headers={**bearer(tok), "Content-Type": "multipart/form-data; boundary=zzz"},
    )
    assert_clear_4xx(streamed, 413, "limit")
    hb = env.client.post("/v1/heartbeats", json={"pad": "x" * 5000}, headers=bearer(tok))
    assert_clear_4xx(hb, 413, "2000-byte limit")
    assert not env.rows()


def test_rate_limit_gives_429_with_retry_after(make_env: Any, frame_jpeg: bytes) -> None:
    env = make_env(rate_limit_per_s=0.01, rate_limit_burst=2)
    tok = env.enroll()["access_token"]
    codes = [post_frame(env.client, tok, meta(f"f-{i}"), frame_jpeg).status_code
             for i in range(2)]
    assert codes == [201, 201]
    r = post_frame(env.client, tok, meta("f-3"), frame_jpeg)
    assert_clear_4xx(r, 429, "rate limit")
    assert int(r.headers["retry-after"]) >= 1
    # Another device has its own bucket.
    other = env.enroll("cam-b")["access_token"]
    assert post_frame(env.client, other, meta("f-3", "cam-b"), frame_jpeg).status_code == 201


# --------------------------------------------------------------------------- one decode, agent's quality
AGENT_QUALITY = {"brightness": 12.5, "sharpness": 3.25, "dhash": "0123456789abcdef"}


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every JPEG decode from now on: ``cv2.imdecode`` (the frame store's) and simplejpeg's
    (the gateway's strict decode), as the flags or the requested minimum size."""
    import simplejpeg

    calls: list[Any] = []
    real_cv2, real_sj = cv2.imdecode, simplejpeg.decode_jpeg

    def counting_cv2(buf: np.ndarray, flags: int) -> Any:
        calls.append(flags)
        return real_cv2(buf, flags)

    def counting_sj(data: bytes, **kw: Any) -> Any:
        calls.append((kw.get("min_width"), kw.get("min_height")))
        return real_sj(data, **kw)

    monkeypatch.setattr(cv2, "imdecode", counting_cv2)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", counting_sj)
    return calls


class DecodedSizeStore(FrameStore):
    """The real ``FrameStore``, recording what the gateway tells it about the decode."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.sizes: list[tuple[int, int] | None] = []

    def write_frame(self, record: FrameRecord, jpeg_bytes: bytes, *,
                    image: np.ndarray | None = None,
                    decoded_size: tuple[int, int] | None = None,
                    durable: bool = True, look_in_other_days: bool = True,
                    sidecar: bytes | None = None) -> FrameWrite:
        assert image is None and decoded_size is not None, \
            "the gateway hands over the size it verified, so the store does not decode again"
        assert sidecar is not None, \
            "the gateway hands over the sidecar it checked, so the store does not make it again"
        self.sizes.append(decoded_size)
        return super().write_frame(record, jpeg_bytes, decoded_size=decoded_size,
                                   durable=durable, look_in_other_days=look_in_other_days,
                                   sidecar=sidecar)


@pytest.mark.parametrize("sent", [False, True], ids=["gateway_quality", "agent_quality"])
def test_gateway_decodes_once_and_hands_the_size_to_the_store(
    env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch, sent: bool
) -> None:
    dev = env.enroll()
    store = DecodedSizeStore(env.settings.frame_store)
    monkeypatch.setattr(env.gw, "store", store)
    calls = _count_decodes(monkeypatch)
    m = meta("f-once", quality=AGENT_QUALITY) if sent else meta("f-once")
    r = post_frame(env.client, dev["access_token"], m, frame_jpeg)
    assert r.status_code == 201, r.text
    # One decode: at full size without the agent's quality (sharpness is native); with all
    # of it only a strict check of the data, at 1/8 (jpeg_decode=dc).
    assert calls == ([(W // 8, H // 8)] if sent else [(W, H)])
    assert store.sizes == [(W, H)]
    assert store.find_frame("cam-a", "f-once") is not None and len(env.rows()) == 1


@pytest.mark.parametrize("sent", [False, True], ids=["gateway_quality", "agent_quality"])
def test_accepted_upload_decodes_the_jpeg_once(
    env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch, sent: bool
) -> None:
    dev = env.enroll()
    calls = _count_decodes(monkeypatch)
    m = meta("f-once", quality=AGENT_QUALITY) if sent else meta("f-once")
    r = post_frame(env.client, dev["access_token"], m, frame_jpeg)
    assert r.status_code == 201, r.text
    assert len(calls) == 1, f"{len(calls)} decodes of one accepted upload"


def test_agent_quality_values_are_stored_as_sent(env: Env, frame_jpeg: bytes) -> None:
    dev = env.enroll()
    tok = dev["access_token"]
    partial = {"brightness": 200.0, "sharpness": 7.0}  # what the agent measures itself
    for frame_id, quality in (("f-all", AGENT_QUALITY), ("f-part", partial), ("f-none", None)):
        m = meta(frame_id, quality=quality) if quality else meta(frame_id)
        r = post_frame(env.client, tok, m, frame_jpeg)
        assert r.status_code == 201, r.text
    store = FrameStore(env.settings.frame_store)

    def stored(frame_id: str) -> dict[str, Any]:
        path = store.find_frame("cam-a", frame_id)
        assert path is not None
        rec = FrameRecord.model_validate_json(path.with_suffix(".json").read_text())
        assert rec.quality is not None
        return rec.quality.model_dump()

    computed = compute_quality(
        cv2.imdecode(np.frombuffer(frame_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)).model_dump()
    assert computed["brightness"] != AGENT_QUALITY["brightness"]
    assert stored("f-all") == AGENT_QUALITY
    assert stored("f-part") == {**partial, "dhash": computed["dhash"]}
    assert stored("f-none") == computed
    bad = post_frame(env.client, tok, meta("f-bad", quality={"brightness": 300}), frame_jpeg)
    assert_clear_4xx(bad, 422, "quality.brightness")


# --------------------------------------------------------------------------- crash safety
def test_commit_failure_after_file_write_then_retry_stores_once(
    env: Env, frame_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash window 1: the file is durable, the row is not; the agent's retry heals it."""
    from fleet.committer import CommitFailed

    tok = env.enroll()["access_token"]
    real_submit = env.gw.committer.submit

    def failing_submit(fn: Any, timeout: float = 60.0) -> Any:
        raise CommitFailed("simulated crash before commit")

    monkeypatch.setattr(env.gw.committer, "submit", failing_submit)
    r = post_frame(env.client, tok, meta("f-1"), frame_jpeg)
    assert_clear_4xx(r, 503, "not acknowledged")
    store = FrameStore(env.settings.frame_store)
    assert store.find_frame("cam-a", "f-1") is not None and not env.rows()

    monkeypatch.setattr(env.gw.committer, "submit", real_submit)
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 201
    assert post_frame(env.client, tok, meta("f-1"), frame_jpeg).status_code == 409
    assert len(env.rows()) == 1 and store.count("cam-a") == 1 and store.fsck().clean


def test_restart_reconciles_frames_without_rows(make_env: Any, frame_jpeg: bytes) -> None:
    """Crash window 2: the process died between write and commit and the agent never
    retried; start-up gives the frame its row and removes half-written leftovers."""
    env = make_env("home")
    dev = env.enroll()
    assert post_frame(env.client, dev["access_token"], meta("f-ok"), frame_jpeg).status_code == 201
    store = FrameStore(env.settings.frame_store)
    crashed = FrameRecord(frame_id="f-crash", camera_id="cam-a", captured_at=T0,
                          source=f"agent:{dev['device_id']}", width=W, height=H)
    path = store.write_frame(crashed, frame_jpeg).path
    (path.parent / ".f-next.jpg.tmp-deadbeef").write_bytes(b"partial")
    (path.parent / "f-half.jpg").write_bytes(frame_jpeg)  # image written, sidecar not yet
    env.client.__exit__(None, None, None)

    env2 = make_env("home")  # same home: restart
    rows = {r.frame_id: r for r in env2.rows()}
    assert set(rows) == {"f-ok", "f-crash"}
    assert rows["f-crash"].recovered and rows["f-crash"].device_id == dev["device_id"]
    assert store.fsck().clean and store.count("cam-a") == 2
    again = post_frame(env2.client, dev["access_token"], meta("f-crash"), frame_jpeg)
    assert again.status_code == 409
    assert post_frame(env2.client, dev["access_token"], meta("f-half"), frame_jpeg).status_code == 201
    assert len(env2.rows()) == 3 and store.count("cam-a") == 3


# --------------------------------------------------------------------------- heartbeats
def _hb(camera_id: str, at: datetime, **extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "camera_id": camera_id, "sent_at": at.isoformat(),
            "model_version": "sha256:abc", "fps": 9.5, "latency_ms": {"p50": 20.0, "p95": 41.0},
            "errors": 0, "dropped_frames": 3, "outbox_depth": 12,
            "per_class_counts": {"car": 4}, **extra}


def test_heartbeats_time_series(env: Env) -> None:
    dev = env.enroll("cam-a")
    tok = dev["access_token"]
    for i in range(5):
        r = env.client.post("/v1/heartbeats", json=_hb("cam-a", T0 + timedelta(seconds=10 * i)),
                            headers=bearer(tok))
        assert r.status_code == 202, r.text
        assert r.json()["duplicate"] is False
    dup = env.client.post("/v1/heartbeats", json=_hb("cam-a", T0), headers=bearer(tok))
    assert dup.status_code == 202 and dup.json()["duplicate"] is True

    all_hb = env.client.get("/v1/cameras/cam-a/heartbeats", headers=bearer(env.admin)).json()
    assert len(all_hb) == 5
    first = all_hb[0]
    assert (first["fps"], first["latency_p50_ms"], first["latency_p95_ms"]) == (9.5, 20.0, 41.0)
    assert first["dropped_frames"] == 3 and first["outbox_depth"] == 12
    assert first["payload"]["per_class_counts"] == {"car": 4}
    since = env.client.get("/v1/cameras/cam-a/heartbeats",
                           params={"since": (T0 + timedelta(seconds=25)).isoformat(), "limit": 1},
                           headers=bearer(env.admin)).json()
    assert [h["sent_at"][:19] for h in since] == ["2026-05-04T12:00:30"]
    latest = env.client.get("/v1/cameras/cam-a/heartbeats", params={"limit": 2},
                            headers=bearer(env.admin)).json()
    assert [h["sent_at"][:19] for h in latest] == ["2026-05-04T12:00:30", "2026-05-04T12:00:40"]

    assert_clear_4xx(env.client.post("/v1/heartbeats", json=_hb("cam-x", T0),
                                     headers=bearer(tok)), 403, "not this device's camera")
    bad = {k: v for k, v in _hb("cam-a", T0).items() if k != "model_version"}
    assert_clear_4xx(env.client.post("/v1/heartbeats", json=bad, headers=bearer(tok)),
                     422, "model_version")
    assert_clear_4xx(env.client.post("/v1/heartbeats", content=b"{nope",
                                     headers={**bearer(tok), "Content-Type": "application/json"}),
                     422, "JSON")
    reader = env.enroll("cam-b", scopes=["camera:read", "camera:write"])
    assert_clear_4xx(env.client.get("/v1/cameras/cam-a/heartbeats",
                                    headers=bearer(reader["access_token"])), 403, "cam-b")
    assert_clear_4xx(env.client.get("/v1/cameras/cam-a/heartbeats",
                                    headers=bearer(tok)), 403, "camera:read")


# --------------------------------------------------------------------------- misc
def test_health_openapi_and_docs(env: Env) -> None:
    assert env.client.get("/healthz").json() == {"status": "ok"}
    doc = env.client.get("/openapi.json").json()
    for path in ("/v1/enroll", "/v1/token/refresh", "/v1/frames", "/v1/heartbeats",
                 "/v1/cameras/{camera_id}/heartbeats", "/v1/devices", "/v1/audit"):
        assert path in doc["paths"]
    assert "multipart/form-data" in doc["paths"]["/v1/frames"]["post"]["requestBody"]["content"]
    assert env.client.get("/docs").status_code == 200
    stats = env.client.get("/v1/stats", headers=bearer(env.admin)).json()
    assert "counters" in stats and "group_commit" in stats


def test_stats_time_the_garbage_collectors_pauses_while_the_gateway_runs(
    make_env: Any
) -> None:
    import gc

    env = make_env()
    watcher = env.gw.stats.gc._on_gc
    assert watcher in gc.callbacks
    gc.collect()  # a full collection, as the collector's own thresholds would start one
    spans = env.client.get("/v1/stats", headers=bearer(env.admin)).json()["spans_ms"]
    assert spans["gc_gen2"]["count"] >= 1 and spans["gc_gen2"]["max_ms"] >= 0.0
    env.client.__exit__(None, None, None)  # the gateway stops: the callback goes
    assert watcher not in gc.callbacks


def test_a_served_gateway_freezes_its_start_up_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fleet serve`` (one process or its workers' factory) freezes what start-up made, so
    full collections no longer walk it; ``gc_freeze_on_start=false`` keeps the collector as
    it was; a test process, which builds many apps, does not freeze by default."""
    import gc

    import fleet.app as fleet_app

    asked: list[bool] = []
    real = fleet_app.create_app

    def spy(settings: Any = None, **kw: Any) -> Any:
        asked.append(kw.get("freeze_gc", False))
        return real(settings, **kw)

    monkeypatch.setattr(fleet_app, "create_app", spy)
    monkeypatch.setenv("ROADLOOP_GATEWAY_HOME", str(tmp_path / "served"))
    fleet_app.create_served_app()
    monkeypatch.setenv("ROADLOOP_GATEWAY_GC_FREEZE_ON_START", "false")
    fleet_app.create_served_app()
    assert asked == [True, False]

    before = gc.get_freeze_count()
    try:
        app = real(GatewaySettings(home=tmp_path / "frozen"), freeze_gc=True)
        with TestClient(app) as client:
            # modules, routes, ORM and schema machinery: all of this process, here
            assert gc.get_freeze_count() > before + 10_000
            assert client.get("/healthz").status_code == 200
    finally:
        gc.unfreeze()  # this test process goes on building apps


def test_jpeg_header_parsing(frame_jpeg: bytes) -> None:
    assert jpeg_dimensions(frame_jpeg) == (W, H)
    check_jpeg(frame_jpeg, W, H, 4096)
    for bad in (b"", b"\xff\xd8\xff", frame_jpeg[:40], b"\x89PNG" + frame_jpeg):
        with pytest.raises(JpegError):
            check_jpeg(bad, W, H, 4096)


def test_cli_tokens_and_devices(tmp_path: Path) -> None:
    from fleet.cli import fleet_app, gateway_app

    runner = CliRunner()
    home = str(tmp_path / "h")
    r = runner.invoke(fleet_app, ["token", "create", "--home", home, "--camera-id", "cam-z",
                                  "--ttl", "600"])
    assert r.exit_code == 0, r.output
    enrollment = r.stdout.strip().splitlines()[0]
    r = runner.invoke(fleet_app, ["admin-token", "create", "--home", home])
    assert r.exit_code == 0, r.output
    bad = runner.invoke(fleet_app, ["token", "create", "--home", home, "--scopes", "camera:admin"])
    assert bad.exit_code != 0 and "camera:admin" in bad.output

    app = create_app(GatewaySettings(home=tmp_path / "h"))
    with TestClient(app) as client:
        r = client.post("/v1/enroll", json={"enrollment_token": enrollment, "camera_id": "cam-z",
                                            "agent_version": "1"})
        assert r.status_code == 201, r.text
    r = runner.invoke(fleet_app, ["devices", "list", "--home", home, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout.splitlines()[0])["camera_id"] == "cam-z"
    assert "serve" in runner.invoke(gateway_app, ["--help"]).output


def test_fleet_never_imports_frameworks() -> None:
    code = ("import sys, fleet, fleet.app, fleet.cli, fleet.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('dagster', 'torch', 'ultralytics')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- real process
@pytest.mark.e2e
def test_real_server_survives_sigkill_mid_burst(tmp_path: Path, frame_jpeg: bytes) -> None:
    home = tmp_path / "home"
    gateway = GatewayProcess(home, log_path=tmp_path / "gateway.log")
    admin = gateway.admin_token()
    gateway.start()
    base = gateway.url
    acked: list[str] = []
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            tok = client.post("/v1/enrollment-tokens", json={}, headers=bearer(admin)).json()
            dev = client.post("/v1/enroll", json={"enrollment_token": tok["enrollment_token"],
                                                  "camera_id": "cam-a", "agent_version": "1"})
            assert dev.status_code == 201, dev.text
            access = dev.json()["access_token"]
            r = post_frame(client, access, meta("f-first"), frame_jpeg)
            assert r.status_code == 201, r.text
            acked.append("f-first")

        ids = [f"f-{i:03d}" for i in range(50)]
        stop = threading.Event()

        def burst(part: list[str]) -> None:
            with httpx.Client(base_url=base, timeout=5) as c:
                for fid in part:
                    if stop.is_set():
                        return
                    try:
                        resp = post_frame(c, access, meta(fid), frame_jpeg)
                    except httpx.HTTPError:
                        return  # the server died under us
                    if resp.status_code == 201:
                        acked.append(fid)

        # Four senders keep several uploads in flight when the kill lands.
        senders = [threading.Thread(target=burst, args=(ids[i::4],)) for i in range(4)]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 30
        while (len(acked) < 21 and any(t.is_alive() for t in senders)
               and time.monotonic() < deadline):
            time.sleep(0.002)
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait(10)
        stop.set()
        for t in senders:
            t.join(30)
        assert len(acked) >= 2
        print(f"acknowledged before SIGKILL: {len(acked)} of 51")

        gateway.start()  # restart on the same state and port
        store = FrameStore(home / "frames")
        db = sqlite3.connect(home / "fleet" / "fleet.db")
        stored = {fid for (fid,) in db.execute("SELECT frame_id FROM frames")}
        for fid in acked:  # every acknowledged frame is on disk and in the table
            assert fid in stored, fid
            assert store.find_frame("cam-a", fid) is not None, fid

        # The agent re-sends everything it has not seen acknowledged: all land exactly once.
        with httpx.Client(base_url=base, timeout=10) as client:
            for fid in ids:
                r = post_frame(client, access, meta(fid), frame_jpeg)
                assert r.status_code in (201, 409), r.text
                if fid in acked:
                    assert r.status_code == 409
        rows = db.execute("SELECT camera_id, frame_id FROM frames").fetchall()
        db.close()
        assert len(rows) == len(set(rows)) == 51
        report = store.fsck()
        assert report.frames_ok == 51 and report.clean, report
    finally:
        gateway.stop()


@pytest.mark.e2e
def test_two_worker_processes_share_one_store(tmp_path: Path, frame_jpeg: bytes) -> None:
    """``--workers 2``: two serving processes; a frame stored by one is a 409 at the other."""
    import psutil

    gateway = GatewayProcess(tmp_path / "home", log_path=tmp_path / "gateway.log",
                             extra_args=["--workers", "2"])
    admin = gateway.admin_token()
    gateway.start()
    try:
        server = psutil.Process(gateway.process.pid)
        port = gateway.port

        def listening() -> set[int]:
            """The worker processes with their own socket listening on the port (each binds
            one; until both have, the kernel hands every connection to the first)."""
            pids = set()
            for child in server.children(recursive=True):
                try:
                    if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                           for c in child.net_connections(kind="tcp")):
                        pids.add(child.pid)
                except psutil.Error:  # a process that ended meanwhile
                    continue
            return pids

        deadline = time.monotonic() + 120  # a hang guard: the loop waits for a state
        while len(listening()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(listening()) == 2, "each of the two workers should listen on the port"
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            tok = client.post("/v1/enrollment-tokens", json={}, headers=bearer(admin)).json()
            dev = client.post("/v1/enroll", json={"enrollment_token": tok["enrollment_token"],
                                                  "camera_id": "cam-w", "agent_version": "1"})
            assert dev.status_code == 201, dev.text
            access = dev.json()["access_token"]
        codes: list[int] = []

        def send(fids: list[str]) -> None:
            with httpx.Client(base_url=gateway.url, timeout=30) as c:  # own connection
                for fid in fids:
                    codes.append(post_frame(c, access, meta(fid, camera_id="cam-w"),
                                            frame_jpeg).status_code)

        # Six connections post 10 distinct frames, each three times (replays across workers).
        ids = [f"w-{i}" for i in range(10)]
        run_concurrently(send, [(ids[i % 2::2],) for i in range(6)])
        assert codes.count(201) == 10 and codes.count(409) == 20, codes
        # Each worker listens on its own SO_REUSEPORT socket: the kernel spreads connections
        # by address hash (16 all on one of 2 workers: p = 2**-15), where with one shared
        # socket a burst of connections (agents after a restart) could all land on one.
        pids: set[int] = set()
        clients = [httpx.Client(base_url=gateway.url, timeout=30) for _ in range(16)]
        try:
            run_concurrently(lambda c: pids.add(c.get(
                "/v1/stats", headers=bearer(admin)).json()["worker_pid"]),
                [(c,) for c in clients])
        finally:
            for c in clients:
                c.close()
        workers = {p.pid for p in server.children(recursive=True)}
        assert len(pids) == 2 and pids <= workers, (pids, workers)
        # ... and the two listeners are two sockets (one shared socket is one inode)
        port = gateway.port
        listeners = {os.readlink(f"/proc/{pid}/fd/{c.fd}")
                     for pid in pids for c in psutil.Process(pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert len(listeners) == 2, listeners
        # A worker that dies is replaced, and the new one listens at once (the start-up wait
        # for the other workers is over): the gateway serves from two workers again.
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with httpx.Client(base_url=gateway.url, timeout=30) as c:
                    pid = c.get("/v1/stats", headers=bearer(admin)).json()["worker_pid"]
            except httpx.TransportError:  # reset: it hashed to the dead worker's socket
                pid = victim
            if pid not in pids:
                break
            assert time.monotonic() < deadline, "no replacement worker answered"
            time.sleep(0.2)
    finally:
        gateway.stop()
    db = sqlite3.connect(tmp_path / "home" / "fleet" / "fleet.db")
    rows = db.execute("SELECT frame_id FROM frames WHERE camera_id = 'cam-w'").fetchall()
    db.close()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert FrameStore(tmp_path / "home" / "frames").fsck().frames_ok == 10


def test_worker_count_is_bounded() -> None:
    """ROADLOOP_GATEWAY_WORKERS must be 1..64; anything else is a clear settings error."""
    from pydantic import ValidationError

    for bad in (0, -1, 65):
        with pytest.raises(ValidationError, match="workers"):
            GatewaySettings(workers=bad)


def test_tokens_never_start_with_a_dash() -> None:
    """Tokens go on command lines (`--enroll-token TOKEN`): a leading '-' would read as an option."""
    from fleet.auth import new_token

    assert not any(new_token().startswith("-") for _ in range(2000))


def test_healthz_checks_the_database_once_a_second_and_names_no_server(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probes' route is public and frequent: one SELECT 1 answers a second of them, and a
    database that is down is a bare 503 (the driver's message, naming the server, is logged)."""
    probe = env.client.app.state.database_probe
    probe.forget()
    reads: list[int] = []
    real_read = env.gw.db.read
    monkeypatch.setattr(env.gw.db, "read", lambda: reads.append(1) or real_read())
    for _ in range(5):
        assert env.client.get("/healthz").status_code == 200
    assert len(reads) == 1

    def down() -> Any:
        raise OSError("could not connect to server at db.internal:5432")

    monkeypatch.setattr(env.gw.db, "read", down)
    probe.forget()  # as when the second is over
    r = env.client.get("/healthz")
    assert r.status_code == 503 and r.json()["detail"] == "database unreachable"
