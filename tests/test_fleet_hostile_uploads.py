"""Hostile frame uploads: what a few-KB request may cost, and that nothing is acknowledged
that the platform cannot read (``fleet/jpeg.py``, ``fleet/intake.py``).

Every refusal is a 4xx (503 for a full decoder, which asks for a retry) with a message, and
leaves neither a ``frames`` row nor a file in the frame store.
"""

from __future__ import annotations

import io
import json
import math
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import simplejpeg
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleet import jpeg as fleet_jpeg
from fleet.app import create_app
from fleet.auth import create_admin_token
from fleet.config import GatewaySettings
from fleet.db import FrameRow
from fleet.jpeg import JpegError, decode_scale, inspect_jpeg
from fleet.runtime import Gateway
from roadloop.data.frame_quality import compute_quality
from roadloop.data.frame_records import FrameRecord, frame_sidecar
from roadloop.data.frames import FrameStore
from roadloop.errors import InvalidInputError

T0 = datetime(2026, 5, 4, 12, 0, 0, tzinfo=UTC)
W, H = 160, 120
AGENT_QUALITY = {"brightness": 101.5, "sharpness": 250.25}  # what agents send


# --------------------------------------------------------------------------- helpers
def texture(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def encode(image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85, *params])
    assert ok
    return buf.tobytes()


def with_sof(jpeg: bytes, *, w: int | None = None, h: int | None = None,
             marker: int | None = None, precision: int | None = None) -> bytes:
    """Rewrite fields of the frame header (SOF), as a hostile client would."""
    b = bytearray(jpeg)
    i = 2
    while True:
        m, seg = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        if m in (0xC0, 0xC1, 0xC2):
            if marker is not None:
                b[i + 1] = marker
            if precision is not None:
                b[i + 4] = precision
            if h is not None:
                b[i + 5 : i + 7] = h.to_bytes(2, "big")
            if w is not None:
                b[i + 7 : i + 9] = w.to_bytes(2, "big")
            return bytes(b)
        i += 2 + seg


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """Insert one APPn/COM segment right after SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload \
        + jpeg[2:]


def a_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "not a frame " * 50)
    return buf.getvalue()


def a_png() -> bytes:
    ok, buf = cv2.imencode(".png", texture(32, 32))
    assert ok
    return buf.tobytes()


def meta(frame_id: str, *, width: int = W, height: int = H, **over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "frame_id": frame_id, "camera_id": "cam-a", "captured_at": T0.isoformat(),
        "reasons": ["base_rate"], "importance": 1.0, "model_version": "sha256:abc",
        "detections": [{"class_id": 0, "class_name": "car", "confidence": 0.5,
                        "xyxy": [1.0, 2.0, 30.0, 40.0]}],
        "width": width, "height": height, "quality": dict(AGENT_QUALITY),
        # What a redacting agent states: cameras redact unless configured "off".
        "redaction": {"method": "blur", "version": "test", "counts": {}, "area_share": 0.0},
    }
    m.update(over)
    return m


@dataclass
class Env:
    client: TestClient
    gw: Gateway
    settings: GatewaySettings
    token: str

    def post(self, metadata: Any, image: bytes, *, metadata_as_file: bool = False,
             **kw: Any) -> httpx.Response:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        files: dict[str, Any] = {"image": ("f.jpg", image, "image/jpeg")}
        data: dict[str, str] = {}
        if metadata_as_file:
            files["metadata"] = ("metadata.json", text.encode(), "application/json")
        else:
            data["metadata"] = text
        return self.client.post("/v1/frames", files=files, data=data,
                                headers={"Authorization": f"Bearer {self.token}"}, **kw)

    def rows(self) -> list[FrameRow]:
        with self.gw.db.read() as s:
            return list(s.scalars(select(FrameRow)))

    def assert_nothing_stored(self) -> None:
        assert not self.rows()
        report = FrameStore(self.settings.frame_store).fsck()
        assert report.frames_ok == 0 and report.clean, report
        assert not [p for p in Path(self.settings.frame_store).rglob("*") if p.is_file()]


@pytest.fixture()
def make_env(tmp_path: Path) -> Iterator[Any]:
    opened: list[TestClient] = []

    def _make(**overrides: Any) -> Env:
        settings = GatewaySettings(home=tmp_path / f"home{len(opened)}", **overrides)
        app = create_app(settings, clock=lambda: T0)
        client = TestClient(app)
        client.__enter__()
        opened.append(client)
        gw: Gateway = app.state.gateway
        with gw.db.write() as session:
            admin, _ = create_admin_token(session, T0, ttl_s=86400, actor="test")
            session.commit()
        auth = {"Authorization": f"Bearer {admin}"}
        r = client.post("/v1/enrollment-tokens", json={}, headers=auth)
        assert r.status_code == 201, r.text
        r = client.post("/v1/enroll", json={"enrollment_token": r.json()["enrollment_token"],
                                            "camera_id": "cam-a", "agent_version": "0.1.0"})
        assert r.status_code == 201, r.text
        return Env(client, gw, settings, r.json()["access_token"])

    yield _make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture()
def env(make_env: Any) -> Env:
    return make_env()


@pytest.fixture(scope="module")
def good() -> bytes:
    return encode(texture(W, H))


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every pixel decode from now on, as the (width, height) asked of simplejpeg; cv2's
    decoder must not be used by the gateway at all."""
    calls: list[tuple[int, int]] = []
    real = simplejpeg.decode_jpeg

    def recording(data: bytes, **kw: Any) -> Any:
        calls.append((kw["min_width"], kw["min_height"]))
        return real(data, **kw)

    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("the gateway decoded with cv2.imdecode")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", recording)
    monkeypatch.setattr(cv2, "imdecode", forbidden)
    return calls


def assert_4xx(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    for word in words:
        assert word.lower() in detail.lower(), detail


# --------------------------------------------------------------------------- decompression bombs
def test_header_claiming_more_pixels_than_the_cap_is_refused_before_any_decode(
    env: Env, good: bytes, decodes: list[tuple[int, int]]
) -> None:
    # 4096x4096 is within the 4096 px side limit, but 16.8 Mpx is over the 4096x2160 cap.
    bomb = with_sof(good, w=4096, h=4096)
    assert len(bomb) < 10_000
    r = env.post(meta("bomb", width=4096, height=4096), bomb)
    assert_4xx(r, 422, "4096x4096", "max_image_pixels")
    assert decodes == []
    env.assert_nothing_stored()


@pytest.mark.parametrize("sent_sharpness", [True, False], ids=["agent", "no_quality"])
def test_tiny_jpeg_claiming_a_large_image_within_the_caps_is_refused(
    env: Env, good: bytes, decodes: list[tuple[int, int]], sent_sharpness: bool
) -> None:
    """The old gateway decoded it in full and stored a grey 4096x2160 frame (201): libjpeg
    only warns that the image data ended early. The strict decode refuses it."""
    bomb = with_sof(good, w=4096, h=2160)
    m = meta("bomb", width=4096, height=2160)
    if not sent_sharpness:
        del m["quality"]
    r = env.post(m, bomb)
    assert_4xx(r, 422, "does not decode cleanly", "premature end")
    # One decode, at 1/8 scale (jpeg_decode=dc) when the agent sent its sharpness (native
    # when it did not): the strict entropy decode refuses it either way.
    assert decodes == ([(512, 270)] if sent_sharpness else [(4096, 2160)])
    env.assert_nothing_stored()


def test_pixel_cap_is_a_setting(make_env: Any, good: bytes) -> None:
    env = make_env(max_image_pixels=W * H - 1)
    assert_4xx(env.post(meta("f-1"), good), 422, f"at most {W * H - 1} px")
    env.assert_nothing_stored()
    assert make_env(max_image_pixels=W * H).post(meta("f-1"), good).status_code == 201


@pytest.mark.parametrize("claimed", [(W, H + 8), (W * 2, H * 2), (H, W)])
def test_header_and_metadata_sizes_must_agree(
    env: Env, good: bytes, decodes: list[tuple[int, int]], claimed: tuple[int, int]
) -> None:
    r = env.post(meta("f-1", width=claimed[0], height=claimed[1]), good)
    assert_4xx(r, 422, f"JPEG is {W}x{H} but metadata says {claimed[0]}x{claimed[1]}")
    assert decodes == []
    env.assert_nothing_stored()


# --------------------------------------------------------------------------- broken files
def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _truncated_with_eoi(good: bytes) -> bytes:
    return good[: len(good) // 2] + b"\xff\xd9"


def _junk_between_segments(good: bytes) -> bytes:
    after_app0 = 4 + int.from_bytes(good[4:6], "big")
    return good[:after_app0] + b"junk" + good[after_app0:]


def _extraneous_before_eoi(good: bytes) -> bytes:
    return good[:-2] + b"PK\x03\x04 hidden bytes before the end marker" + b"\xff\xd9"


@pytest.mark.parametrize(
    "make, words",
    [
        (_truncated, ["truncated"]),
        (_truncated_with_eoi, ["premature end"]),
        (_extraneous_before_eoi, ["extraneous bytes"]),
        (lambda g: g + a_zip(), ["after its end-of-image marker", "ZIP"]),
        (lambda g: g + a_png(), ["after its end-of-image marker", "PNG"]),
        (lambda g: g + g, ["after its end-of-image marker", "second JPEG"]),
        (lambda g: g + b"\x00\x00", ["2 bytes after its end-of-image marker"]),
        (_junk_between_segments, ["corrupt", "no marker"]),
        (lambda g: with_sof(g, marker=0xC9), ["arithmetic-coded"]),
        (lambda g: with_sof(g, marker=0xC3), ["lossless"]),
        (lambda g: with_sof(g, precision=12), ["12-bit"]),
        (lambda g: g[:2] + g[2:].replace(b"\xff\xda", b"\xff\xd9", 1), ["no image data"]),
    ],
    ids=["truncated", "truncated_eoi", "extraneous", "zip", "png", "two_jpegs", "padding",
         "junk", "arithmetic", "lossless", "12bit", "no_scan"],
)
def test_broken_or_polyglot_jpegs_are_422_and_store_nothing(
    env: Env, good: bytes, make: Any, words: list[str]
) -> None:
    r = env.post(meta("f-bad"), make(good))
    assert_4xx(r, 422, "f-bad", *words)
    env.assert_nothing_stored()


def test_cv2_alone_would_accept_the_premature_end(good: bytes) -> None:
    """Why the decode is simplejpeg's: OpenCV returns a (grey-filled) picture for a JPEG
    whose image data stops short, as long as the file ends in FFD9."""
    broken = _truncated_with_eoi(good)
    assert cv2.imdecode(np.frombuffer(broken, np.uint8), cv2.IMREAD_GRAYSCALE) is not None
    info = inspect_jpeg(broken)  # the structure alone looks fine
    with pytest.raises(JpegError, match="premature end"):
        fleet_jpeg.decode_grey(broken, info, 1)


def test_scan_and_metadata_segment_limits(make_env: Any) -> None:
    image = texture(W, H, seed=3)
    progressive = encode(image, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    info = inspect_jpeg(progressive)
    assert info.coding == "progressive" and info.scans > 3
    env = make_env(max_jpeg_scans=3, max_jpeg_metadata_bytes=4096)
    assert_4xx(env.post(meta("prog"), progressive), 422, f"{info.scans} scans", "at most 3")
    commented = with_segment(encode(image), 0xFE, b"x" * 8000)
    assert_4xx(env.post(meta("com"), commented), 422, "APPn/COM", "at most 4096")
    env.assert_nothing_stored()
    # Within the limits both are ordinary frames.
    relaxed = make_env()
    assert relaxed.post(meta("prog"), progressive).status_code == 201
    assert relaxed.post(meta("com"), commented).status_code == 201


def test_restart_markers_fill_bytes_and_grey_jpegs_are_fine(env: Env) -> None:
    image = texture(W, H, seed=4)
    rst = encode(image, cv2.IMWRITE_JPEG_RST_INTERVAL, 2)
    filled = rst[:2] + b"\xff\xff" + rst[2:]  # fill bytes before a marker are legal
    grey = encode(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    for i, data in enumerate((rst, filled, grey)):
        r = env.post(meta(f"f-{i}"), data)
        assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- quality on a reduced decode
def test_quality_is_measured_on_a_reduced_decode_and_keeps_its_meaning(
    make_env: Any, decodes: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(jpeg_decode="reduced")  # the default, dc, decodes at 1/8 (test_frame_batch)
    image = cv2.resize(texture(480, 270, seed=5), (1920, 1080), interpolation=cv2.INTER_CUBIC)
    data = encode(image)
    monkeypatch.undo()  # the reference values below decode with cv2
    native = compute_quality(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE))
    calls: list[tuple[int, int]] = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda d, **kw: (
        calls.append((kw["min_width"], kw["min_height"])), real(d, **kw))[1])

    # The agent sends brightness and sharpness (measured natively): one decode at 1/2 scale,
    # only the dhash comes from it — a 9x8 thumbnail, the native one's within a bit.
    r = env.post(meta("agent", width=1920, height=1080), data)
    assert r.status_code == 201, r.text
    assert calls == [(960, 540)]
    store = FrameStore(env.settings.frame_store)
    rec = store.read_record("cam-a", "agent")
    assert rec is not None and rec.quality is not None
    assert (rec.quality.brightness, rec.quality.sharpness) == (101.5, 250.25)
    assert (int(rec.quality.dhash, 16) ^ int(native.dhash, 16)).bit_count() <= 1

    # A client that sends no sharpness gets the native value, not a 1/2-scale Laplacian
    # (which differs several-fold): one native decode.
    calls.clear()
    r = env.post(meta("bare", width=1920, height=1080, quality=None), data)
    assert r.status_code == 201, r.text
    assert calls == [(1920, 1080)]
    rec = store.read_record("cam-a", "bare")
    assert rec is not None and rec.quality == native


def test_decode_scale_follows_the_pixel_budget() -> None:
    budget = 1024 * 576
    assert decode_scale(640, 360, budget) == 1
    assert decode_scale(1920, 1080, budget) == 2
    assert decode_scale(3840, 2160, budget) == 4
    assert decode_scale(4096, 2160, budget) == 4
    assert decode_scale(4096, 4096, 100) == 8


# --------------------------------------------------------------------------- concurrent decodes
def test_full_decode_slots_answer_503_with_retry_after_and_store_nothing(
    make_env: Any, good: bytes
) -> None:
    env = make_env(max_concurrent_decodes=1, decode_wait_s=0)
    assert env.gw.decoders.slots.acquire(blocking=False)  # another upload is decoding
    try:
        r = env.post(meta("f-1"), good)
        assert_4xx(r, 503, "decode slots", "not acknowledged")
        assert r.headers["retry-after"] == "1"
        env.assert_nothing_stored()
    finally:
        env.gw.decoders.slots.release()
    assert env.post(meta("f-1"), good).status_code == 201


def test_no_more_decodes_run_at_once_than_there_are_slots(
    make_env: Any, good: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots: two uploads are held inside the decoder; a third is turned away; once they
    are let go both are stored. Decodes run on the pool's own threads (what the allocator
    keeps after a decode stays in those threads' arenas). Driven by events, not timing."""
    env = make_env(max_concurrent_decodes=2, decode_wait_s=0)
    inside = threading.Semaphore(0)
    let_go = threading.Event()
    running = [0]
    peak = [0]
    threads_used: set[str] = set()
    lock = threading.Lock()
    real = fleet_jpeg.decode_grey

    def held(data: bytes, info: Any, scale: int) -> np.ndarray:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads_used.add(threading.current_thread().name)
        inside.release()
        assert let_go.wait(60), "test did not let the decoder go"
        with lock:
            running[0] -= 1
        return real(data, info, scale)

    monkeypatch.setattr(fleet_jpeg, "decode_grey", held)
    results: dict[str, int] = {}

    def upload(frame_id: str) -> None:
        results[frame_id] = env.post(meta(frame_id), good).status_code

    threads = [threading.Thread(target=upload, args=(f"f-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
        assert inside.acquire(timeout=60)  # this upload now holds a slot
    third = env.post(meta("f-third"), good)
    assert_4xx(third, 503, "decode slots")
    let_go.set()
    for t in threads:
        t.join(60)
    assert results == {"f-0": 201, "f-1": 201}
    assert peak[0] == 2
    assert len(threads_used) == 2 and all(n.startswith("jpeg-decode") for n in threads_used)
    assert sorted(r.frame_id for r in env.rows()) == ["f-0", "f-1"]


# --------------------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize(
    "patch, words",
    [
        ('"importance": NaN', ["NaN"]),
        ('"importance": Infinity', ["Infinity"]),
        ('"importance": -Infinity', ["-Infinity"]),
        ('"importance": 1e999', ["1e999"]),
        ('"importance": "Infinity"', ["importance", "finite"]),
        ('"quality": {"brightness": 10, "sharpness": Infinity}', ["Infinity"]),
        ('"quality": {"brightness": 10, "sharpness": "inf"}', ["quality.sharpness", "finite"]),
        (('"detections": [{"class_id": 0, "class_name": "car", "confidence": 0.5, '
          '"xyxy": [0, 0, "NaN", 5]}]'), ["detections.0.xyxy.2", "finite"]),
        ('"unknown_key": NaN', ["NaN"]),
    ],
    ids=["nan", "inf", "neg_inf", "overflow", "inf_string", "quality_inf",
         "quality_inf_string", "box_nan_string", "unknown_key"],
)
def test_non_finite_numbers_in_metadata_are_422_and_nothing_is_stored(
    env: Env, good: bytes, patch: str, words: list[str]
) -> None:
    base = meta("f-nan")
    base.pop("importance")
    if patch.startswith('"quality"'):
        base.pop("quality")
    if patch.startswith('"detections"'):
        base.pop("detections")
    text = json.dumps(base)[:-1] + ", " + patch + "}"
    r = env.post(text, good)
    assert_4xx(r, 422, *words)
    env.assert_nothing_stored()


def test_store_refuses_a_record_that_would_not_read_back(tmp_path: Path, good: bytes) -> None:
    """The library guard under the gateway: ``write_frame`` never writes a sidecar its own
    readers would skip (here a record built without validation, holding NaN)."""
    store = FrameStore(tmp_path)
    record = FrameRecord.model_construct(
        frame_id="f-1", camera_id="cam-a", captured_at=T0, reasons=[], importance=math.nan,
        source="test", source_ref=None, labels_ref=None, model_version=None, detections=[],
        width=W, height=H, quality=None, schema_version=1,
    )
    with pytest.raises(InvalidInputError, match="does not read back"):
        store.write_frame(record, good, decoded_size=(W, H))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_store_refuses_a_record_that_reads_back_as_other_data(
    tmp_path: Path, good: bytes
) -> None:
    """The library path (no sidecar handed in) checks what the gateway's ``frame_sidecar``
    checks: the sidecar reads back as the same data, not only that it parses. Built without
    validation, this record's capture time is not in UTC, which every reader's would be."""
    store = FrameStore(tmp_path)
    record = FrameRecord.model_construct(
        frame_id="f-1", camera_id="cam-a", captured_at=T0.astimezone(timezone(timedelta(hours=2))),
        reasons=[], importance=1.0, source="test", source_ref=None, labels_ref=None,
        model_version=None, detections=[], width=W, height=H, quality=None, schema_version=1,
    )
    assert frame_sidecar(record) is None
    with pytest.raises(InvalidInputError, match="does not read back.*other data"):
        store.write_frame(record, good, decoded_size=(W, H))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    fixed = FrameRecord.model_validate(record.model_dump())  # validated: in UTC
    assert store.write_frame(fixed, good, decoded_size=(W, H)).already_existed is False


def test_a_sidecar_that_does_not_read_back_is_removed_and_refused(
    make_env: Any, good: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader stricter than the writer (e.g. a newer platform): with ``frame_read_back`` the
    gateway reads the sidecar back before the 201, and removes the frame instead of committing
    its row (without it, ``roadloop.data.frame_records.frame_sidecar`` checks the same in memory:
    tests/test_frame_batch.py)."""
    env = make_env(frame_read_back=True)
    store = env.gw.store
    real = store.read_record
    monkeypatch.setattr(store, "read_record", lambda cam, fid, **kw: None if fid == "f-skew"
                        else real(cam, fid, **kw))
    r = env.post(meta("f-skew"), good)
    assert_4xx(r, 422, "does not read back", "nothing was stored")
    env.assert_nothing_stored()
    assert env.post(meta("f-fine"), good).status_code == 201


def test_database_and_reader_agree_after_hostile_and_good_uploads(env: Env, good: bytes) -> None:
    texts = {
        "ok-1": json.dumps(meta("ok-1")),
        "nan-1": json.dumps(meta("nan-1"))[:-1] + ', "importance": NaN}',
        "ok-2": json.dumps(meta("ok-2", importance=3.5, quality=None)),
        "inf-1": json.dumps({**meta("inf-1"), "quality": None})[:-1]
        + ', "quality": {"sharpness": 1e999}}',
        "ok-3": json.dumps(meta("ok-3", detections=[])),
    }
    for frame_id, text in texts.items():
        r = env.post(text, good)
        assert r.status_code == (201 if frame_id.startswith("ok") else 422), r.text
    rows = {r.frame_id: r for r in env.rows()}
    records = {rec.frame_id: rec for rec, _ in FrameStore(env.settings.frame_store)
               .iter_frames("cam-a")}
    assert set(rows) == set(records) == {"ok-1", "ok-2", "ok-3"}
    for frame_id, rec in records.items():
        row = rows[frame_id]
        assert (row.width, row.height, row.importance, row.reasons, row.model_version,
                row.n_detections) == (rec.width, rec.height, rec.importance, rec.reasons,
                                      rec.model_version, len(rec.detections))
        assert row.captured_at.replace(tzinfo=UTC) == rec.captured_at


# --------------------------------------------------------------------------- the metadata part
@pytest.mark.parametrize("as_file", [False, True], ids=["text_field", "file_part"])
def test_metadata_over_the_cap_is_413_whatever_the_part_type(
    make_env: Any, good: bytes, as_file: bool
) -> None:
    env = make_env(max_metadata_bytes=2000)
    padded = json.dumps(meta("f-big")) + " " * 5000  # valid JSON, over the cap
    r = env.post(padded, good, metadata_as_file=as_file)
    assert_4xx(r, 413, "metadata is larger than the 2000-byte limit")
    env.assert_nothing_stored()
    small = json.dumps(meta("f-small"))
    assert len(small) < 2000
    assert env.post(small, good, metadata_as_file=as_file).status_code == 201


def test_metadata_file_part_gets_the_same_checks(env: Env, good: bytes) -> None:
    bad_utf8 = env.client.post(
        "/v1/frames",
        files={"image": ("f.jpg", good, "image/jpeg"),
               "metadata": ("m.json", b'{"frame_id": "\xff\xfe"}', "application/json")},
        headers={"Authorization": f"Bearer {env.token}"},
    )
    assert_4xx(bad_utf8, 422, "not UTF-8")
    nan = json.dumps(meta("f-1"))[:-1] + ', "importance": NaN}'
    assert_4xx(env.post(nan, good, metadata_as_file=True), 422, "NaN")
    env.assert_nothing_stored()


def test_image_must_be_a_file_part(env: Env, good: bytes) -> None:
    r = env.client.post(
        "/v1/frames", data={"metadata": json.dumps(meta("f-1")), "image": "not a file"},
        headers={"Authorization": f"Bearer {env.token}"},
    )
    assert_4xx(r, 422, "'image' must be a file part")
    env.assert_nothing_stored()
