"""Agent-side model rollouts (``edge_agent.updater`` and its parts: ``manifest``,
``model_store``, ``model_slot``, ``rollback_guard``, ``shadow``), unit level.

A tiny threaded HTTP server plays the gateway (``/v1/manifest`` with ETags, ``/v1/models/<sha>``
with ``Range``, plus enroll/frames/heartbeats for the whole-agent test). Manifests are signed
here with the contract's canonical form, written out independently of the agent's code.

Models: the shared 320 ONNX (serving), a copy with one extra metadata entry (same weights,
another SHA-256: the candidate), the shared 480 ONNX (wrong input size for a 320 manifest),
and random bytes with a correct hash and signature (does not load). Skips without them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent import AgentConfig, EdgeAgent, FramePipeline
from edge_agent.client import GatewayClient
from edge_agent.fsutil import file_sha256
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.identity import DeviceIdentity
from edge_agent.inference import Detection, OnnxDetector
from edge_agent.manifest import (
    ManifestError,
    ManifestVerifier,
    PublicKeyError,
    canonical_bytes,
    key_id,
    load_public_key,
)
from edge_agent.model_slot import FAULT_DELAY_ENV, LoadedModel, ModelSlot
from edge_agent.model_store import HASH_MISMATCH_ATTEMPTS, UpdaterState
from edge_agent.rollback_guard import GuardLimits
from edge_agent.shadow import ShadowRunner, f1_score, match_boxes
from edge_agent.sources import Frame
from edge_agent.updater import ModelUpdater

from .helpers import SHARED_DIR, require_shared

MODEL_320 = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"
MODEL_480 = SHARED_DIR / "models" / "atl_v2_yolo11n_480.onnx"
IMAGES = SHARED_DIR / "datasets" / "atl_v2" / "images" / "test"

require_shared(MODEL_320, MODEL_480)

CLASSES = ["bike", "bus", "car", "truck"]


# ---------------------------------------------------------------- signing (the contract's form)
def _raw_pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(manifest: dict[str, Any], key: Ed25519PrivateKey, *, key_id: str | None = None) -> dict:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    body["key_id"] = key_id or hashlib.sha256(_raw_pub(key)).hexdigest()[:16]
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {**body, "signature": base64.b64encode(key.sign(canon.encode("utf-8"))).decode()}


def manifest_for(
    data: bytes,
    key: Ed25519PrivateKey,
    *,
    version: str = "7",
    rollout: str = "ro-1",
    input_size: int = 320,
    sha: str | None = None,
    size: int | None = None,
    classes: list[str] | None = None,
) -> dict:
    return sign(
        {
            "manifest_version": 1,
            "model_version": version,
            "rollout_id": rollout,
            "file": "model.onnx",
            "sha256": sha or hashlib.sha256(data).hexdigest(),
            "size": len(data) if size is None else size,
            "input_size": input_size,
            "class_names": classes or CLASSES,
            "format": "onnx-fp32",
            "created_at": "2026-11-25T20:00:00Z",
        },
        key,
    )


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def public_b64(signing_key: Ed25519PrivateKey) -> str:
    return base64.b64encode(_raw_pub(signing_key)).decode()


# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    onnx = pytest.importorskip("onnx")
    d = tmp_path_factory.mktemp("models")
    variant = onnx.load(str(MODEL_320))
    entry = variant.metadata_props.add()
    entry.key, entry.value = "roadloop_test_variant", "candidate"
    onnx.save(variant, str(d / "candidate.onnx"))
    garbage = d / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(50_000))
    return {"good": MODEL_320, "candidate": d / "candidate.onnx", "480": MODEL_480, "junk": garbage}


def _detector(path: Path) -> OnnxDetector:
    return OnnxDetector(path, intra_op_threads=1)


@pytest.fixture(scope="module")
def baseline() -> OnnxDetector:
    return _detector(MODEL_320)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    require_shared(IMAGES / "*.jpg")
    paths = sorted(IMAGES.glob("*.jpg"))
    img = cv2.imread(str(paths[0]))
    assert img is not None
    return img


# ---------------------------------------------------------------- the fake gateway
@dataclass
class FakeGateway:
    body: dict[str, Any] = field(default_factory=lambda: {"assignment": {"mode": "none"}})
    models: dict[str, bytes] = field(default_factory=dict)
    truncate_next: int | None = None  # drop the connection after this many body bytes, once
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    heartbeats: list[dict] = field(default_factory=list)
    frame_versions: list[str] = field(default_factory=list)
    enroll_extra: dict[str, Any] = field(default_factory=dict)
    token: str = "tok"

    def etag(self) -> str:
        return (
            '"'
            + hashlib.sha256(json.dumps(self.body, sort_keys=True).encode()).hexdigest()[:16]
            + '"'
        )

    def assign(self, mode: str, manifest: dict | None, rollout: str | None = "ro-1") -> None:
        self.body = {
            "assignment": {"mode": mode, "rollout_id": rollout, "stage": "canary", "percent": 5},
            "manifest": manifest,
            "previous_model_version": None,
        }

    def model_requests(self) -> list[dict[str, str]]:
        return [h for m, p, h in self.requests if m == "GET" and p.startswith("/v1/models/")]


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _json(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self, gw: FakeGateway) -> bool:
        if self.headers.get("Authorization") != f"Bearer {gw.token}":
            self._json(401, {"detail": "bad token"})
            return False
        return True

    def do_GET(self) -> None:
        gw: FakeGateway = self.server.gw
        gw.requests.append(("GET", self.path, dict(self.headers)))
        if not self._authorised(gw):
            return
        if self.path == "/v1/manifest":
            etag = gw.etag()
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self._json(200, gw.body, {"ETag": etag})
            return
        m = re.match(r"^/v1/models/([0-9a-f]{64})$", self.path)
        if not m or m.group(1) not in gw.models:
            self._json(404, {"detail": "no such model"})
            return
        data = gw.models[m.group(1)]
        start, rng = 0, self.headers.get("Range")
        if rng:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self._json(416, {"detail": "range not satisfiable"})
                return
        payload = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(payload)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut, gw.truncate_next = gw.truncate_next, None
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(payload)

    def do_POST(self) -> None:
        gw: FakeGateway = self.server.gw
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        gw.requests.append(("POST", self.path, dict(self.headers)))
        if self.path == "/v1/enroll":
            self._json(
                201,
                {
                    "device_id": "dev-1",
                    "access_token": gw.token,
                    "refresh_token": "refresh",
                    "expires_in": 3600,
                    "scopes": ["camera:read", "camera:write"],
                    **gw.enroll_extra,
                },
            )
            return
        if not self._authorised(gw):
            return
        if self.path == "/v1/heartbeats":
            gw.heartbeats.append(json.loads(body))
            self._json(202, {"heartbeat_id": len(gw.heartbeats), "stored": True})
        elif self.path == "/v1/frames":
            found = re.search(rb'"model_version": "([0-9a-f]{64})"', body)
            gw.frame_versions.append(found.group(1).decode() if found else "")
            self._json(201, {"frame_id": "x", "stored": True})
        else:
            self._json(404, {"detail": "no route"})


@pytest.fixture()
def gateway() -> Iterator[tuple[FakeGateway, str]]:
    gw = FakeGateway()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.gw = gw  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gw, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Rig:
    gw: FakeGateway
    url: str
    state: Path
    client: GatewayClient
    slot: ModelSlot
    updater: ModelUpdater
    base_sha: str

    def new_updater(self, **kw: Any) -> ModelUpdater:
        """A fresh updater on the same state dir (an agent restart)."""
        return _updater(
            self.client, self.state, ModelSlot(self.slot.current), self.updater.verifier, **kw
        )


def _updater(client, state, slot, verifier, **kw: Any) -> ModelUpdater:
    kw.setdefault("shadow_background", False)
    kw.setdefault("detector_factory", _detector)
    return ModelUpdater(client, state, slot, verifier, **kw)


@pytest.fixture()
def rig(gateway, tmp_path: Path, baseline: OnnxDetector, public_b64: str) -> Iterator[Rig]:
    gw, url = gateway
    state = tmp_path / "state"
    DeviceIdentity("dev-1", "cam-1", url, gw.token, "refresh", time.time() + 3600).save(state)
    client = GatewayClient(url, state)
    slot = ModelSlot(baseline)
    updater = _updater(client, state, slot, ManifestVerifier(public_b64))
    updater.restore()
    try:
        yield Rig(gw, url, state, client, slot, updater, baseline.model_sha256)
    finally:
        updater.stop()
        client.close()


def _publish(rig: Rig, path: Path, key, *, mode: str = "serve", **kw: Any) -> dict:
    data = path.read_bytes()
    manifest = manifest_for(data, key, **kw)
    rig.gw.models[manifest["sha256"]] = data
    rig.gw.assign(mode, manifest, manifest["rollout_id"])
    return manifest


def _state_json(rig: Rig) -> dict:
    return json.loads((rig.state / "updater.json").read_text())


# ---------------------------------------------------------------- signing and verification
def test_canonical_bytes_and_key_id_follow_the_contract(signing_key, public_b64) -> None:
    m = {"b": 1, "a": "é", "signature": "x", "class_names": ["car"]}
    assert canonical_bytes(m) == '{"a":"é","b":1,"class_names":["car"]}'.encode()
    raw = base64.b64decode(public_b64)
    assert key_id(raw) == key_id(public_b64) == hashlib.sha256(raw).hexdigest()[:16]
    v = ManifestVerifier(public_b64)
    signed = manifest_for(b"abc", signing_key)
    parsed = v.verify(signed)
    assert parsed.sha256 == hashlib.sha256(b"abc").hexdigest() and parsed.size == 3
    assert parsed.model_version == "7" and parsed.class_names == tuple(CLASSES)


def test_public_key_forms(tmp_path: Path, signing_key, public_b64) -> None:
    raw = base64.b64decode(public_b64)
    pub_file = tmp_path / "model-signing.pub"
    pub_file.write_text(public_b64 + "\n")
    pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "k.pem").write_bytes(pem)
    assert load_public_key(public_b64) == raw
    assert load_public_key(pub_file) == raw == load_public_key(str(tmp_path / "k.pem"))
    with pytest.raises(PublicKeyError, match="32 bytes"):
        load_public_key(base64.b64encode(b"short").decode())
    (tmp_path / "bad.pub").write_text("not base64 at all!")
    with pytest.raises(PublicKeyError, match="bad.pub"):
        load_public_key(tmp_path / "bad.pub")


def test_verifier_refuses_tampering_other_keys_and_bad_fields(signing_key, public_b64) -> None:
    v = ManifestVerifier(public_b64)
    other = Ed25519PrivateKey.generate()
    good = manifest_for(b"abc", signing_key)
    with pytest.raises(ManifestError, match="bad manifest signature"):
        v.verify({**good, "model_version": "8"})  # changed after signing
    with pytest.raises(ManifestError, match="signed by another key"):
        v.verify(manifest_for(b"abc", other))  # honest key_id of another key
    forged = sign({k: val for k, val in good.items() if k != "key_id"}, other, key_id=v.key_id)
    with pytest.raises(ManifestError, match="bad manifest signature"):
        v.verify(forged)  # claims the pinned key, signed by another
    with pytest.raises(ManifestError, match="no signature"):
        v.verify({k: val for k, val in good.items() if k != "signature"})
    with pytest.raises(ManifestError, match="sha256"):
        v.verify(sign({**good, "sha256": "XYZ"}, signing_key))
    with pytest.raises(ManifestError, match="manifest_version"):
        v.verify(sign({**good, "manifest_version": 2}, signing_key))


# ---------------------------------------------------------------- the happy path
def test_serve_rollout_downloads_verifies_swaps_and_keeps_previous(
    rig: Rig, models, signing_key, image, caplog
) -> None:
    caplog.set_level("INFO", logger="edge_agent")  # the updater and its model store
    m = _publish(rig, models["candidate"], signing_key)
    assert rig.updater.poll_once() == "serving"
    assert rig.slot.sha256 == m["sha256"] != rig.base_sha
    assert rig.slot.current.model_version == "7" and rig.slot.current.rollout_id == "ro-1"
    stored = rig.state / "models" / f"{m['sha256']}.onnx"
    assert file_sha256(stored) == m["sha256"]
    assert (rig.state / "models" / f"{rig.base_sha}.onnx").is_file()  # previous kept on disk
    assert not list((rig.state / "models").glob(".partial-*"))
    st = _state_json(rig)
    assert st["serving"]["sha256"] == m["sha256"] and st["previous"]["sha256"] == rig.base_sha
    fields = rig.updater.heartbeat_fields()
    assert fields["update_status"] == "serving" and fields["rollout_id"] == "ro-1"
    assert fields["serving_model_version"] == "7" and fields["shadow"] is None
    dets = rig.slot.detector.detect(image)
    assert dets and {d.model_sha256 for d in dets} == {m["sha256"]}
    # unchanged manifest: If-None-Match → 304, nothing downloaded again
    n_models = len(rig.gw.model_requests())
    assert rig.updater.poll_once() == "unchanged"
    assert rig.gw.requests[-1][2].get("If-None-Match") == rig.gw.etag()
    assert len(rig.gw.model_requests()) == n_models
    text = caplog.text
    for needle in (
        "manifest seen",
        "manifest verified",
        "download done",
        "model verified",
        "swapped",
    ):
        assert needle in text, needle


# ---------------------------------------------------------------- every refusal
REFUSALS = [
    "hash_mismatch",
    "bad_signature",
    "other_key",
    "truncated_file",
    "does_not_load",
    "wrong_input_size",
    "wrong_classes",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_update_keeps_old_model_and_reports_why(
    rig: Rig, models, signing_key, image, case: str
) -> None:
    other = Ed25519PrivateKey.generate()
    cand = models["candidate"].read_bytes()
    expect_status, expect_reason, downloads = "rejected", "", True
    if case == "hash_mismatch":
        m = manifest_for(cand, signing_key)
        tampered = bytearray(cand)
        tampered[len(cand) // 2] ^= 0xFF
        rig.gw.models[m["sha256"]] = bytes(tampered)
        expect_reason = "sha256 mismatch"
    elif case == "bad_signature":
        m = {**manifest_for(cand, signing_key), "input_size": 480}
        rig.gw.models[m["sha256"]] = cand
        expect_reason, downloads = "bad manifest signature", False
    elif case == "other_key":
        m = manifest_for(cand, other)
        rig.gw.models[m["sha256"]] = cand
        expect_reason, downloads = "signed by another key", False
    elif case == "truncated_file":  # the gateway's file is shorter than the signed size
        m = manifest_for(cand, signing_key)
        rig.gw.models[m["sha256"]] = cand[: len(cand) // 2]
        expect_reason = "size mismatch"
    elif case == "does_not_load":
        junk = models["junk"].read_bytes()
        m = manifest_for(junk, signing_key)
        rig.gw.models[m["sha256"]] = junk
        expect_status, expect_reason = "rolled_back", "does not load"
    elif case == "wrong_input_size":
        big = models["480"].read_bytes()
        m = manifest_for(big, signing_key, input_size=320)
        rig.gw.models[m["sha256"]] = big
        expect_status, expect_reason = "rolled_back", "input size 480, the manifest says 320"
    else:
        m = manifest_for(cand, signing_key, classes=["car", "truck", "bus", "bike"])
        rig.gw.models[m["sha256"]] = cand
        expect_status, expect_reason = "rolled_back", "classes"
    rig.gw.assign("serve", m, "ro-1")

    if case in ("hash_mismatch", "truncated_file"):  # maybe a corrupt transfer: tried again,
        for _ in range(HASH_MISMATCH_ATTEMPTS - 1):  # reported as not final meanwhile
            assert rig.updater.poll_once() == "retrying"
            fields = rig.updater.heartbeat_fields()
            assert fields["update_status"] == "retrying" and "retried" in fields["update_reason"]
    assert rig.updater.poll_once() == expect_status
    assert rig.slot.sha256 == rig.base_sha  # the old model keeps serving
    assert rig.slot.detector.detect(image)
    fields = rig.updater.heartbeat_fields()
    assert fields["update_status"] == expect_status
    assert expect_reason in fields["update_reason"] and fields["rollout_id"] == "ro-1"
    assert bool(rig.gw.model_requests()) == downloads  # signatures are checked first
    assert not list((rig.state / "models").glob(f"*{m['sha256']}*"))  # nothing half-kept
    assert _state_json(rig)["status"] == expect_status

    # it is not retried forever: a restarted agent (fresh ETag) skips it or gives up after 3
    for _ in range(3):
        rig.new_updater().poll_once()
    before = len(rig.gw.model_requests())
    again = rig.new_updater()
    assert again.poll_once() == "skipped"
    assert len(rig.gw.model_requests()) == before
    assert again.slot.sha256 == rig.base_sha


def test_dropped_connection_resumes_with_range(rig: Rig, models, signing_key) -> None:
    m = _publish(rig, models["candidate"], signing_key)
    cut = m["size"] // 3
    rig.gw.truncate_next = cut
    assert rig.updater.poll_once() == "downloading"
    partial = rig.state / "models" / f".partial-{m['sha256']}"
    have = partial.stat().st_size
    assert 0 < have <= cut
    assert rig.slot.sha256 == rig.base_sha
    assert rig.updater.heartbeat_fields()["update_status"] == "downloading"
    assert rig.updater.poll_once() == "serving"  # the ETag was not settled: polled again
    assert rig.gw.model_requests()[-1].get("Range") == f"bytes={have}-"
    assert rig.slot.sha256 == m["sha256"] and not partial.exists()


# ---------------------------------------------------------------- atomic swap
def test_swap_is_atomic_under_concurrent_frames(baseline, models, image) -> None:
    a = LoadedModel.from_detector(baseline)
    b = LoadedModel.from_detector(_detector(models["candidate"]))
    assert a.sha256 != b.sha256
    slot = ModelSlot(a)
    results, errors = [], []
    progress = threading.Event()

    def worker(k: int) -> None:
        pipe = FramePipeline(slot)
        try:
            for i in range(6):
                r = pipe.process(Frame(image, i, time.time(), f"t{k}:{i}"))
                results.append(r)
                progress.set()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    swaps = 0
    while any(t.is_alive() for t in threads):
        if progress.wait(0.05):
            progress.clear()
            slot.swap(b if slot.current is a else a)
            swaps += 1
    for t in threads:
        t.join()
    assert not errors and len(results) == 18 and swaps >= 1
    used = set()
    for r in results:
        assert r.model in (a, b)
        assert r.detections and {d.model_sha256 for d in r.detections} == {r.model.sha256}
        used.add(r.model.sha256)
    assert used == {a.sha256, b.sha256}


# ---------------------------------------------------------------- shadow
def test_matched_box_f1() -> None:
    def det(cls: str, x: float, conf: float = 0.9) -> Detection:
        return Detection(0, conf, x, 0, x + 10, 10, class_name=cls)

    ref = [det("car", 0), det("car", 100), det("bus", 200)]
    assert match_boxes(ref, ref) == (3, 0, 0) and f1_score(3, 0, 0) == 1.0
    cand = [det("car", 2), det("truck", 100), det("bus", 206), det("car", 500)]
    # car@2 matches car@0 (IoU 0.67); truck≠car; bus@206 IoU 0.25 < 0.5; car@500 unmatched
    assert match_boxes(ref, cand) == (1, 3, 2)
    assert f1_score(1, 3, 2) == pytest.approx(2 / 7)
    assert f1_score(0, 0, 0) == 1.0  # both found nothing
    # greedy: the most confident candidate takes the best box, a second one cannot reuse it
    assert match_boxes([det("car", 0)], [det("car", 1, 0.5), det("car", 0, 0.9)]) == (1, 1, 0)


def test_shadow_candidate_equal_to_serving_agrees_and_is_never_used(
    rig: Rig, models, signing_key, image, caplog
) -> None:
    caplog.set_level("INFO", logger="edge_agent.updater")
    m = _publish(rig, models["candidate"], signing_key, mode="shadow")
    assert rig.updater.poll_once() == "shadow"
    assert rig.slot.sha256 == rig.base_sha  # still serving the old model
    served = []
    for _ in range(10):
        model = rig.slot.current
        dets = model.detector.detect(image)
        served.append(dets)
        rig.updater.observe_frame(model, 10.0, dets, image)
    assert all({d.model_sha256 for d in ds} == {rig.base_sha} for ds in served)
    shadow = rig.updater.heartbeat_fields()["shadow"]
    assert shadow["model_version"] == m["sha256"] and shadow["manifest_model_version"] == "7"
    assert shadow["frames"] == 2  # 20 % of 10 frames
    assert shadow["agreement_f1"] == pytest.approx(1.0) and shadow["fp"] == shadow["fn"] == 0
    assert shadow["tp"] > 0 and shadow["latency_p95_ms"] > 0
    assert rig.updater.heartbeat_fields()["update_status"] == "shadow"
    assert "shadow started" in caplog.text
    # promotion reuses the loaded candidate: no second download
    n = len(rig.gw.model_requests())
    rig.gw.assign("serve", m, "ro-1")
    assert rig.updater.poll_once() == "serving"
    assert rig.slot.sha256 == m["sha256"] and len(rig.gw.model_requests()) == n
    assert rig.updater.heartbeat_fields()["shadow"] is None


def test_background_shadow_runner_skips_when_busy(baseline, image) -> None:
    runner = ShadowRunner(baseline, model_version="x", sample_rate=1.0, queue_size=1, delay_s=0.05)
    dets = baseline.detect(image)
    offered = [runner.offer(image, dets) for _ in range(6)]
    assert runner.drain(30)
    w = runner.take_window()
    runner.stop()
    assert w["frames"] == sum(offered) and w["frames"] + w["skipped"] == 6
    assert w["agreement_f1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- rollback
def test_mode_none_for_the_rollout_goes_back_to_previous(rig: Rig, models, signing_key) -> None:
    m = _publish(rig, models["candidate"], signing_key)
    assert rig.updater.poll_once() == "serving"
    rig.gw.assign("none", None, "ro-other")  # another rollout: keep serving
    assert rig.updater.poll_once() == "none" and rig.slot.sha256 == m["sha256"]
    rig.gw.assign("none", None, "ro-1")  # ours was withdrawn
    assert rig.updater.poll_once() == "none"
    assert rig.slot.sha256 == rig.base_sha
    fields = rig.updater.heartbeat_fields()
    assert fields["update_status"] == "idle" and "withdrawn" in fields["update_reason"]
    kept = {p.name for p in (rig.state / "models").glob("*.onnx")}
    assert kept == {f"{rig.base_sha}.onnx", f"{m['sha256']}.onnx"}


def test_withdrawn_rollout_without_previous_falls_back_to_signed_baseline(
    rig: Rig, models, signing_key
) -> None:
    m = _publish(rig, models["candidate"], signing_key)
    assert rig.updater.poll_once() == "serving"
    rig.updater._previous, rig.updater.state.previous = None, None  # e.g. lost on this device
    (rig.state / "models" / f"{rig.base_sha}.onnx").unlink()
    data = MODEL_320.read_bytes()
    baseline = manifest_for(data, signing_key, version="6", rollout="ro-0")
    rig.gw.models[baseline["sha256"]] = data
    rig.gw.assign("none", None, "ro-1")
    rig.gw.body["baseline"] = baseline
    assert rig.updater.poll_once() == "none"
    assert rig.slot.sha256 == rig.base_sha and rig.slot.current.model_version == "6"
    assert ("GET", f"/v1/models/{baseline['sha256']}") in [
        (m_, p_) for m_, p_, _ in rig.gw.requests
    ]
    assert (rig.state / "models" / f"{rig.base_sha}.onnx").is_file()
    assert _state_json(rig)["previous"]["sha256"] == m["sha256"]


def test_self_rollback_after_n_bad_windows(rig: Rig, models, signing_key, caplog) -> None:
    caplog.set_level("INFO", logger="edge_agent.updater")
    rig.updater.guard.limits = GuardLimits(latency_budget_ms=100.0, bad_windows=3)
    m = _publish(rig, models["candidate"], signing_key)
    assert rig.updater.poll_once() == "serving"
    new = rig.slot.current

    def window(latency_ms: float, errors: int = 0) -> dict:
        for _ in range(20):
            rig.updater.observe_frame(new, latency_ms, [], np.zeros((1, 1, 3), np.uint8))
        for _ in range(errors):
            rig.updater.observe_error(new)
        return rig.updater.heartbeat_fields()

    assert window(500.0)["update_status"] == "serving"  # bad 1
    assert window(500.0)["update_status"] == "serving"  # bad 2
    assert window(20.0)["update_status"] == "serving"  # good: the streak resets
    assert rig.updater.heartbeat_fields()["update_status"] == "serving"  # idle: no verdict
    window(500.0)
    window(500.0)
    assert rig.slot.sha256 == m["sha256"]
    fields = window(500.0)  # third bad window in a row
    assert rig.slot.sha256 == rig.base_sha
    assert fields["update_status"] == "rolled_back" and fields["rollout_id"] == "ro-1"
    assert "latency P95 500.0 ms > budget 100.0 ms for 3 consecutive" in fields["update_reason"]
    assert "rolled back:" in caplog.text
    # the gateway still says serve: the rolled-back model is not installed again
    rig.gw.assign("serve", {**m}, "ro-1")
    rig.gw.body["previous_model_version"] = "6"  # a new ETag
    assert rig.updater.poll_once() == "skipped" and rig.slot.sha256 == rig.base_sha
    assert not (rig.state / "models" / f"{m['sha256']}.onnx").exists()


def test_self_rollback_on_error_rate(rig: Rig, models, signing_key) -> None:
    rig.updater.guard.limits = GuardLimits(max_error_rate=0.05, bad_windows=1)
    _publish(rig, models["candidate"], signing_key)
    rig.updater.poll_once()
    new = rig.slot.current
    for _ in range(10):
        rig.updater.observe_frame(new, 5.0, [], np.zeros((1, 1, 3), np.uint8))
        rig.updater.observe_error(new)
    fields = rig.updater.heartbeat_fields()
    assert rig.slot.sha256 == rig.base_sha and fields["update_status"] == "rolled_back"
    assert "error rate 50.0% > 5.0%" in fields["update_reason"]


def test_restart_restores_the_updated_model_or_rolls_back(rig: Rig, models, signing_key) -> None:
    m = _publish(rig, models["candidate"], signing_key)
    rig.updater.poll_once()
    again = rig.new_updater()
    again.slot.swap(LoadedModel.from_detector(rig.updater._previous.detector))  # started on --model
    again.restore()
    assert again.slot.sha256 == m["sha256"] and again.slot.current.rollout_id == "ro-1"
    assert again.poll_once() == "serving"  # the first poll after a restart re-applies: no-op
    # the stored file is damaged while the agent is down → it falls back and says why
    (rig.state / "models" / f"{m['sha256']}.onnx").write_bytes(b"broken")
    third = rig.new_updater()
    third.slot.swap(LoadedModel.from_detector(rig.updater._previous.detector))
    third.restore()
    assert third.slot.sha256 == rig.base_sha
    assert third.status == "rolled_back" and "does not load at start-up" in third.reason


def test_unreadable_state_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "updater.json"
    path.write_text("{not json")
    state = UpdaterState.load(path)
    assert state.serving is None and state.rejected == {} and state.status == "idle"
    assert list(tmp_path.glob("updater.json.corrupt-*"))  # kept for a person to look at


# ---------------------------------------------------------------- pipeline / heartbeat / agent
def test_fault_delay_knob_slows_only_the_named_model(monkeypatch, baseline, models, image) -> None:
    cand = _detector(models["candidate"])
    monkeypatch.setenv(FAULT_DELAY_ENV, f"{cand.model_sha256[:12]}=80")
    slow, fast = LoadedModel.from_detector(cand), LoadedModel.from_detector(baseline)
    assert slow.delay_s == pytest.approx(0.08) and fast.delay_s == 0.0
    r = FramePipeline(ModelSlot(slow)).process(Frame(image, 0, time.time(), "x"))
    assert r.timings_ms["detect_ms"] >= 80.0  # a lower bound: sleep never returns early


def test_heartbeat_carries_optional_rollout_fields() -> None:
    tw = TelemetryWindow("cam-1", "a" * 64, CLASSES)
    plain = json.loads(tw.build(outbox_depth=0, outbox_bytes=0, outbox_evicted_total=0).to_json())
    assert plain["update_status"] is None and plain["schema_version"] == 2
    hb = tw.build(
        outbox_depth=0,
        outbox_bytes=0,
        outbox_evicted_total=0,
        model_version="b" * 64,
        rollout={
            "update_status": "rolled_back",
            "update_reason": "why",
            "rollout_id": "ro-1",
            "shadow": {"agreement_f1": 1.0},
            "not_a_field": 1,
        },
    )
    data = json.loads(hb.to_json())
    assert data["model_version"] == "b" * 64 and data["update_status"] == "rolled_back"
    assert data["update_reason"] == "why" and data["shadow"] == {"agreement_f1": 1.0}
    assert "not_a_field" not in data


def test_agent_pins_enrollment_key_and_swaps_mid_stream(
    gateway, tmp_path: Path, models, signing_key, public_b64
) -> None:
    """The whole agent: enrollment pins the key, the updater thread swaps between frames,
    later frames and heartbeats carry the new model version and the rollout status."""
    gw, url = gateway
    gw.enroll_extra = {"model_public_key": public_b64}
    data = models["candidate"].read_bytes()
    m = manifest_for(data, signing_key)
    gw.models[m["sha256"]] = data
    gw.assign("serve", m, "ro-1")
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted(IMAGES.glob("*.jpg"))[:3]:
        img = cv2.imread(str(p))
        cv2.imwrite(str(frames / p.name), cv2.resize(img, (160, 160)))
    cfg = AgentConfig(
        gateway_url=url,
        camera_id="cam-1",
        source=str(frames),
        model_path=MODEL_320,
        state_dir=tmp_path / "state",
        enroll_token="enroll-me",
        heartbeat_interval_s=0.3,
        realtime=True,
        loop=True,
        intra_op_threads=1,
        update_interval_s=0.5,
        drain_timeout_s=2.0,
    )
    from edge_agent.samplers import SamplerConfig

    cfg.sampler = SamplerConfig(base_rate=1.0, hourly_budget=None)
    agent = EdgeAgent(cfg)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("summary", agent.run()), daemon=True)
    t.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if (
            any(
                h.get("update_status") == "serving" and h["model_version"] == m["sha256"]
                for h in list(gw.heartbeats)
            )
            and m["sha256"] in gw.frame_versions
        ):
            break
        time.sleep(0.2)
    agent.request_stop()
    t.join(60)
    assert not t.is_alive()
    summary = box["summary"]
    ident = json.loads((tmp_path / "state" / "identity.json").read_text())
    assert ident["model_public_key"] == public_b64
    assert summary.final_model_version == m["sha256"] and summary.update_status == "serving"
    hb = [h for h in gw.heartbeats if h.get("update_status") == "serving"]
    assert hb and hb[-1]["rollout_id"] == "ro-1" and hb[-1]["serving_model_version"] == "7"
    assert m["sha256"] in gw.frame_versions  # frames after the swap name the new model


def test_cli_update_flags_reach_the_agent(monkeypatch, tmp_path: Path, public_b64, capsys) -> None:
    import edge_agent.agent as agent_mod
    from edge_agent.agent import AgentSummary
    from edge_agent.cli import main

    seen: dict[str, Any] = {}

    class FakeAgent:
        def __init__(self, config: AgentConfig) -> None:
            seen["config"] = config
            self._stop = threading.Event()

        def request_stop(self, force: bool = False) -> None:
            pass

        def run(self) -> AgentSummary:
            return AgentSummary("cam-1", "dev-1", "x", stopped_by="max_frames")

    monkeypatch.setattr(agent_mod, "EdgeAgent", FakeAgent)
    key_file = tmp_path / "model-signing.pub"
    key_file.write_text(public_b64)
    base = ["run", "--gateway", "http://127.0.0.1:9", "--camera-id", "cam-1", "--source", "x"]
    base += ["--model", str(MODEL_320), "--state-dir", str(tmp_path / "s")]
    flags = ["--model-public-key", str(key_file), "--update-interval", "5"]
    flags += ["--latency-budget-ms", "250", "--rollback-after", "2", "--shadow-rate", "0.5"]
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(base + flags) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the host process gets its handler back
    cfg = seen["config"]
    assert (cfg.model_public_key, cfg.update_interval_s) == (str(key_file), 5.0)
    assert (cfg.latency_budget_ms, cfg.rollback_after, cfg.shadow_sample_rate) == (250.0, 2, 0.5)
    assert json.loads(capsys.readouterr().out)["device_id"] == "dev-1"
    # a key that is not one is an input error (exit 2) that says what is wrong, before any work
    (tmp_path / "bad.pub").write_text("abc")
    assert main([*base, "--model-public-key", str(tmp_path / "bad.pub")]) == 2
    assert "bad.pub" in capsys.readouterr().err
    assert main([*base, "--rollback-after", "0"]) == 2
