"""Model rollouts at unit level: signing, cohorts, publish checks, the stage state machine,
pause/advance/rollback, scopes, audit rows, manifest ETag/304 and Range downloads.

FastAPI ``TestClient`` on a real SQLite file; the gateway's clock is moved by hand, so the
hold is exercised without sleeping.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet.app import create_app
from fleet.auth import create_admin_token
from fleet.config import GatewaySettings
from fleet.rollout_policy import (
    DEFAULT_STAGES,
    Budgets,
    Stage,
    cohort_hash,
    normalise_stages,
    stage_health,
    stage_threshold,
)
from roadloop.errors import InvalidInputError
from roadloop.release.signing import (
    KEY_FILE,
    PUBLIC_KEY_FILE,
    SignatureError,
    build_manifest,
    canonical_bytes,
    key_id,
    load_or_create_signing_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)

T0 = datetime(2026, 11, 25, 20, 0, 0, tzinfo=UTC)
CLASSES = ["car", "truck", "bus", "two_wheeler", "person"]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# =========================================================================== signing
def test_signing_key_created_once_0600_and_manifest_round_trip(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    key = load_or_create_signing_key(keys)
    assert stat.S_IMODE((keys / KEY_FILE).stat().st_mode) == 0o600
    pub = load_public_key(keys / PUBLIC_KEY_FILE)
    again = load_or_create_signing_key(keys)
    assert key_id(again) == key_id(key) == key_id(pub)
    assert not [p for p in keys.iterdir() if p.name.endswith(".tmp")]

    model = tmp_path / "model.int8.onnx"
    model.write_bytes(os.urandom(1000))
    manifest = sign_manifest(build_manifest("7", model, 320, CLASSES, "ro-1"), key)
    assert manifest["size"] == 1000 and manifest["file"] == "model.int8.onnx"
    assert manifest["key_id"] == key_id(key) and len(manifest["key_id"]) == 16
    verify_manifest(manifest, pub)
    # The canonical form is the documented one: sorted keys, no spaces, UTF-8, no signature.
    body = {k: v for k, v in manifest.items() if k != "signature"}
    assert canonical_bytes(manifest) == json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    tampered = {**manifest, "sha256": "0" * 64}
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(tampered, pub)
    other = load_or_create_signing_key(tmp_path / "other")
    by_other = sign_manifest(manifest, other)
    with pytest.raises(SignatureError, match="not by the trusted key"):
        verify_manifest(by_other, pub)
    forged = {**by_other, "key_id": manifest["key_id"]}  # claims our key id
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(forged, pub)
    with pytest.raises(SignatureError, match="lacks"):
        verify_manifest({k: v for k, v in manifest.items() if k != "signature"}, pub)


def test_platform_signer_and_edge_verifier_share_one_implementation(tmp_path: Path) -> None:
    import edge_agent.manifest as edge
    import roadloop.release.signing as platform

    for name in ("canonical_bytes", "key_id", "manifest_sha256", "verify_manifest",
                 "raw_public_key", "REQUIRED_FIELDS", "MANIFEST_VERSION", "MANIFEST_FORMATS"):
        assert getattr(platform, name) is getattr(edge, name), name
    assert platform.SignatureError is edge.ManifestError

    # Signed by the platform, verified by the agent's verifier with the .pub the gateway hands out.
    key = load_or_create_signing_key(tmp_path / "keys")
    model = tmp_path / "m.onnx"
    model.write_bytes(os.urandom(100))
    manifest = sign_manifest(build_manifest("9", model, 320, CLASSES, "ro-9"), key)
    verifier = edge.ManifestVerifier(tmp_path / "keys" / PUBLIC_KEY_FILE)
    parsed = verifier.verify(manifest)
    assert (parsed.model_version, parsed.rollout_id, parsed.size) == ("9", "ro-9", 100)
    assert verifier.key_id == key_id(key) == manifest["key_id"]
    pub = load_public_key(tmp_path / "keys" / PUBLIC_KEY_FILE)
    for name, value in (("sha256", "0" * 64), ("class_names", ["car"]), ("size", 101)):
        tampered = {**manifest, name: value}
        with pytest.raises(edge.ManifestError, match="does not verify") as exc:
            verifier.verify(tampered)
        assert exc.value.rollout_id == "ro-9" and exc.value.digest
        with pytest.raises(SignatureError, match="does not verify"):
            verify_manifest(tampered, pub)


def test_build_manifest_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not found"):
        build_manifest("1", tmp_path / "missing.onnx", 320, CLASSES, "ro-x")
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="input_size"):
        build_manifest("1", f, 0, CLASSES, "ro-x")
    with pytest.raises(ValueError, match="class_names"):
        build_manifest("1", f, 320, [], "ro-x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / KEY_FILE).write_text("not a key")
    with pytest.raises(InvalidInputError, match="PEM"):
        load_or_create_signing_key(tmp_path / "bad")


# =========================================================================== cohorts
def test_cohorts_only_grow_over_random_device_ids() -> None:
    ids = [f"dev-{uuid.uuid4().hex[:16]}" for _ in range(5000)]
    hashes = sorted(cohort_hash(d) for d in ids)
    assert all(0.0 <= h < 1.0 for h in hashes)
    threshold, previous = 0.0, set()
    for stage in DEFAULT_STAGES:
        threshold = stage_threshold(threshold, stage.percent, hashes, 1)
        members = {d for d in ids if cohort_hash(d) < threshold}
        assert previous <= members, "a device left the cohort as the percentage grew"
        assert abs(len(members) / len(ids) - stage.percent / 100) < 0.03
        previous = members
    assert len(previous) == len(ids)


def test_tiny_fleet_min_cohort_and_growth_keep_monotonic() -> None:
    ids = [f"dev-{i:04d}" for i in range(3)]
    hashes = sorted(cohort_hash(d) for d in ids)
    t = stage_threshold(0.0, 5, hashes, 1)
    first = {d for d in ids if cohort_hash(d) < t}
    assert len(first) >= 1
    # More devices enroll; the next stage recomputes over the new fleet: nobody drops out.
    more = ids + [f"dev-{i:04d}" for i in range(3, 40)]
    t2 = stage_threshold(t, 10, sorted(cohort_hash(d) for d in more), 1)
    assert first <= {d for d in more if cohort_hash(d) < t2}
    assert stage_threshold(t2, 100, hashes, 1) == 1.0


def test_stage_validation() -> None:
    assert [s.name for s in normalise_stages(None)] == ["shadow", "canary", "10%", "25%", "50%",
                                                       "100%"]
    with pytest.raises(ValueError, match="decrease"):
        normalise_stages([Stage(percent=50), Stage(percent=10), Stage(percent=100)])
    with pytest.raises(ValueError, match="100"):
        normalise_stages([Stage(percent=50)])


def test_stage_health_rules() -> None:
    b = Budgets(max_error_rate=0.01, p95_latency_budget_ms=100, min_shadow_f1=0.6,
                min_reporting_fraction=1.0, min_frames=10, min_cohort_devices=1)
    serve = Stage(name="canary", percent=5)
    kw: dict[str, Any] = {"rollout_id": "ro-1", "model_ids": {"7", "abc"}, "since": T0, "now": T0,
                              "cohort": {"a", "b"}, "failure_reports": [], "budgets": b}

    def hb(**p: Any) -> dict[str, Any]:
        return {"rollout_id": "ro-1", "update_status": "serving", "model_version": "7",
                "frames_processed": 50, "errors": 0, "latency_p95_ms": 40.0, **p}

    two_each = [(d, hb()) for d in ("a", "b", "a", "b")]
    ok = stage_health(stage=serve, heartbeats=two_each, **kw)
    assert ok.verdict == "pass" and ok.frames == 200 and ok.error_rate == 0
    first_only = stage_health(stage=serve, heartbeats=[("a", hb()), ("b", hb())], **kw)
    assert first_only.verdict == "insufficient"  # one window each may straddle the swap
    one = stage_health(stage=serve, heartbeats=[("a", hb()), ("a", hb())], **kw)
    assert one.verdict == "insufficient" and "1/2 cohort devices" in one.reasons[0]
    outsider = stage_health(stage=serve, heartbeats=[*two_each[::2], ("zz", hb()),
                                                     ("zz", hb())], **kw)
    assert outsider.verdict == "insufficient"
    idle = stage_health(stage=serve, heartbeats=[*two_each[::2], *[("b", hb(
        frames_processed=0, latency_p95_ms=None))] * 2], **kw)
    assert idle.verdict == "insufficient"  # windows without a finished frame do not vouch
    old_model = stage_health(stage=serve, heartbeats=[*two_each[::2], *[("b", hb(
        model_version="6", rollout_id=None, update_status="idle"))] * 2], **kw)
    assert old_model.verdict == "insufficient"
    err = stage_health(stage=serve, heartbeats=[("a", hb(errors=5))], **kw)
    assert err.verdict == "fail" and "error rate" in err.reasons[0]
    slow = stage_health(stage=serve, heartbeats=[("a", hb(latency_p95_ms=400.0))], **kw)
    assert slow.verdict == "fail" and "P95 latency" in slow.reasons[0]
    shadow = Stage(name="shadow", percent=5, mode="shadow")
    low = stage_health(stage=shadow, heartbeats=[
        (d, {"model_version": "6", "shadow": {"model_version": "7", "agreement_f1": 0.2,
                                              "frames": 30, "latency_p95_ms": 50.0}})
        for d in ("a", "b")], **kw)
    assert low.verdict == "fail" and "shadow agreement" in low.reasons[0]
    reported = stage_health(stage=serve, heartbeats=[], **{**kw, "failure_reports": [
        ("b", {"update_status": "rolled_back", "update_reason": "model failed to load"})]})
    assert reported.verdict == "fail" and "model failed to load" in reported.reasons[0]


# =========================================================================== gateway
@dataclass
class Env:
    client: TestClient
    clock: Clock
    admin: str
    key: Any
    tmp: Path
    devices: list[dict[str, Any]] = field(default_factory=list)

    def post(self, path: str, token: str | None = None, **kw: Any) -> Any:
        return self.client.post(path, headers=bearer(token or self.admin), **kw)

    def get(self, path: str, token: str | None = None, **kw: Any) -> Any:
        return self.client.get(path, headers=bearer(token or self.admin), **kw)

    def enroll(self, n: int) -> list[dict[str, Any]]:
        for _ in range(n):
            i = len(self.devices)
            tok = self.post("/v1/enrollment-tokens", json={}).json()["enrollment_token"]
            r = self.client.post("/v1/enroll", json={"enrollment_token": tok,
                                                     "camera_id": f"cam-{i}",
                                                     "agent_version": "0.1"})
            assert r.status_code == 201, r.text
            self.devices.append({**r.json(), "camera_id": f"cam-{i}"})
        return self.devices

    def publish(self, version: str, rollout_id: str, data: bytes | None = None,
                key: Any = None, **override: Any) -> Any:
        data = data if data is not None else os.urandom(4096)
        path = self.tmp / f"{rollout_id}.onnx"
        path.write_bytes(data)
        manifest = sign_manifest(build_manifest(version, path, 320, CLASSES, rollout_id),
                                 key or self.key)
        manifest.update(override)
        return self.post("/v1/models", files={"file": ("model.int8.onnx", data)},
                         data={"manifest": json.dumps(manifest)})

    def rollout(self, version: str, hold: float = 60, **body: Any) -> dict[str, Any]:
        rid = f"ro-{version}-{uuid.uuid4().hex[:6]}"
        assert self.publish(version, rid).status_code == 201
        r = self.post("/v1/rollouts", json={"model_version": version, "hold_seconds": hold,
                                            **body})
        assert r.status_code == 201, r.text
        return r.json()

    def heartbeat(self, dev: dict[str, Any], **payload: Any) -> None:
        body = {"schema_version": 1, "camera_id": dev["camera_id"],
                "sent_at": (self.clock.now + timedelta(microseconds=len(str(payload)))).isoformat(),
                "model_version": "old", **payload}
        self.clock.advance(0.001)
        r = self.post("/v1/heartbeats", dev["access_token"], json=body)
        assert r.status_code == 202, r.text

    def evaluate(self, rid: str) -> dict[str, Any]:
        r = self.post(f"/v1/rollouts/{rid}/evaluate")
        assert r.status_code == 200, r.text
        return r.json()

    def cohort(self, rollout: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for d in self.devices:
            body = self.get("/v1/manifest", d["access_token"]).json()
            if body["assignment"]["mode"] != "none":
                out.append(d)
        return out

    def audit(self, action: str) -> list[dict[str, Any]]:
        return self.get("/v1/audit", params={"action": action, "limit": 1000}).json()


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[Env]:
    key = load_or_create_signing_key(tmp_path / "keys")
    settings = GatewaySettings(home=tmp_path / "home",
                               model_public_key_file=tmp_path / "keys" / PUBLIC_KEY_FILE,
                               rollout_min_frames=10)
    clock = Clock()
    app = create_app(settings, clock=clock)
    with TestClient(app) as client:
        gw = app.state.gateway
        with gw.db.write() as s:
            admin, _ = create_admin_token(s, clock(), ttl_s=86400, actor="test")
            s.commit()
        yield Env(client, clock, admin, key, tmp_path)


def serving(rid: str, version: str, **over: Any) -> dict[str, Any]:
    return {"model_version": version, "rollout_id": rid, "update_status": "serving",
            "frames_processed": 100, "errors": 0, "latency_p95_ms": 30.0, **over}


def shadowing(rid: str, version: str, f1: float = 0.9, **over: Any) -> dict[str, Any]:
    return {"model_version": "old", "rollout_id": rid, "update_status": "shadow",
            "frames_processed": 100, "errors": 0, "latency_p95_ms": 30.0,
            "shadow": {"model_version": version, "agreement_f1": f1, "frames": 100,
                       "latency_p95_ms": 35.0, **over}}


def test_enrollment_hands_out_the_model_public_key(env: Env) -> None:
    (dev,) = env.enroll(1)
    assert dev["model_public_key"] == load_public_key(env.tmp / "keys" / PUBLIC_KEY_FILE)


def test_publish_checks_signature_hash_size_and_scope(env: Env) -> None:
    env.enroll(1)
    device = env.devices[0]["access_token"]
    good = env.publish("7", "ro-a")
    assert good.status_code == 201, good.text
    assert good.json()["created"] and good.json()["key_id"] == key_id(env.key)

    r = env.publish("7", "ro-b", signature="AAAA")
    assert r.status_code == 422 and "signature" in r.json()["detail"]
    other = load_or_create_signing_key(env.tmp / "other-keys")
    r = env.publish("7", "ro-c", key=other)
    assert r.status_code == 422 and "not by the trusted key" in r.json()["detail"]
    data = os.urandom(2048)
    path = env.tmp / "x.onnx"
    path.write_bytes(data)
    manifest = sign_manifest(build_manifest("8", path, 320, CLASSES, "ro-d"), env.key)
    r = env.post("/v1/models", files={"file": ("m.onnx", data[:-10])},
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 422 and "bytes" in r.json()["detail"]
    r = env.post("/v1/models", files={"file": ("m.onnx", data[::-1])},
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 422 and "SHA-256" in r.json()["detail"]
    models = env.tmp / "home" / "fleet" / "models"
    assert sorted(p.name for p in models.iterdir()) == [good.json()["sha256"] + ".onnx"]
    r = env.post("/v1/models", device, files={"file": ("m.onnx", data)},
                 data={"manifest": json.dumps(manifest)})
    assert r.status_code == 403
    ok = env.post("/v1/models", files={"file": ("m.onnx", data)},
                  data={"manifest": json.dumps(manifest)})
    assert ok.status_code == 201
    again = env.post("/v1/models", data={"manifest": json.dumps(manifest)})  # file stored
    assert again.status_code == 200 and not again.json()["created"]
    assert {e["detail"]["rollout_id"] for e in env.audit("model_published")} == {"ro-a", "ro-d"}


def test_non_admin_cannot_create_advance_or_rollback(env: Env) -> None:
    (dev,) = env.enroll(1)
    assert env.publish("7", "ro-na").status_code == 201
    r = env.post("/v1/rollouts", dev["access_token"], json={"model_version": "7"})
    assert r.status_code == 403 and "camera:admin" in r.json()["detail"]
    ro = env.post("/v1/rollouts", json={"model_version": "7"}).json()
    for action in ("advance", "pause", "rollback", "evaluate"):
        r = env.post(f"/v1/rollouts/{ro['rollout_id']}/{action}", dev["access_token"])
        assert r.status_code == 403, action
    assert env.client.post(f"/v1/rollouts/{ro['rollout_id']}/advance").status_code == 401
    assert env.get(f"/v1/rollouts/{ro['rollout_id']}").json()["stage"] == "shadow"


def test_full_rollout_advances_after_hold_and_holds_on_too_little_data(env: Env) -> None:
    env.enroll(12)
    ro = env.rollout("7", hold=60)
    rid = ro["rollout_id"]
    assert (ro["stage"], ro["percent"], ro["status"]) == ("shadow", 5, "active")
    assert ro["cohort_size"] >= 1
    seen: set[str] = set()
    for stage in ["shadow", "canary", "10%", "25%", "50%", "100%"]:
        cur = env.get(f"/v1/rollouts/{rid}").json()
        assert cur["stage"] == stage
        cohort = env.cohort(cur)
        ids = {d["device_id"] for d in cohort}
        assert seen <= ids, "cohort shrank"
        seen = ids
        assert len(cohort) == cur["cohort_size"]
        if stage == "canary":  # the hold elapsed but nobody reported yet: hold
            env.clock.advance(61)
        first = env.evaluate(rid)
        assert first["decision"] == "hold" and first["health"]["verdict"] == "insufficient"
        for d in cohort * 2:  # two windows each: the first may straddle the swap
            env.heartbeat(d, **(shadowing(rid, "7") if stage == "shadow" else serving(rid, "7")))
        if stage == "shadow":
            body = env.get("/v1/manifest", cohort[0]["access_token"]).json()
            assert body["assignment"]["mode"] == "shadow"
            assert body["manifest"]["model_version"] == "7"
        if stage != "canary":  # healthy, but the stage's hold has not elapsed: hold
            held = env.evaluate(rid)
            assert held["decision"] == "hold" and held["health"]["verdict"] == "pass"
            env.clock.advance(61)
        done = env.evaluate(rid)
        assert done["decision"] == ("complete" if stage == "100%" else "advance"), done
    final = env.get(f"/v1/rollouts/{rid}").json()
    assert final["status"] == "complete" and final["cohort_size"] == 12
    assert set(final["health"]) == {"shadow", "canary", "10%", "25%", "50%", "100%"}
    assert [h["event"] for h in final["history"]] == ["created"] + ["advanced"] * 5 + ["completed"]
    for d in env.devices:
        body = env.get("/v1/manifest", d["access_token"]).json()
        assert body["assignment"]["mode"] == "serve" and body["assignment"]["status"] == "complete"
    assert len(env.audit("rollout_advanced")) == 5 and len(env.audit("rollout_completed")) == 1
    assert env.evaluate(rid)["decision"] == "complete"


@pytest.mark.parametrize("case", ["errors", "slow", "shadow_f1", "agent_rolled_back"])
def test_automatic_rollback(env: Env, case: str) -> None:
    env.enroll(6)
    ro = env.rollout("7", hold=60)
    rid = ro["rollout_id"]
    if case != "shadow_f1":
        env.post(f"/v1/rollouts/{rid}/advance")  # to canary: the new model serves
    cohort = env.cohort(ro)
    d = cohort[0]
    if case == "errors":
        env.heartbeat(d, **serving(rid, "7", errors=30))
    elif case == "slow":
        env.heartbeat(d, **serving(rid, "7", latency_p95_ms=5000.0))
    elif case == "shadow_f1":
        env.heartbeat(d, **shadowing(rid, "7", f1=0.1))
    else:
        env.heartbeat(d, model_version="old", rollout_id=rid, update_status="rolled_back",
                      update_reason="model does not load: InvalidProtobuf")
    out = env.evaluate(rid)  # no hold needed to roll back
    assert out["decision"] == "rollback" and out["status"] == "rolled_back"
    reason = out["rollout"]["reason"]
    assert {"errors": "error rate", "slow": "P95 latency", "shadow_f1": "shadow agreement",
            "agent_rolled_back": "InvalidProtobuf"}[case] in reason
    body = env.get("/v1/manifest", d["access_token"]).json()
    assert body["assignment"] == {"mode": "none", "rollout_id": rid, "stage": out["stage"],
                                  "percent": out["percent"], "status": "rolled_back"}
    assert body["manifest"] is None
    (event,) = env.audit("rollout_rolled_back")
    assert event["detail"]["how"] == "automatic" and event["detail"]["reason"] == reason
    assert env.evaluate(rid)["decision"] == "rolled_back"


def test_pause_stops_advancing_and_resume_continues(env: Env) -> None:
    env.enroll(4)
    rid = env.rollout("7", hold=10)["rollout_id"]
    assert env.post(f"/v1/rollouts/{rid}/pause").json()["status"] == "paused"
    for d in env.cohort({}) * 2:
        env.heartbeat(d, **shadowing(rid, "7"))
    env.clock.advance(3600)
    for _ in range(3):
        out = env.evaluate(rid)
        assert out["decision"] == "paused" and out["stage"] == "shadow"
    r = env.post(f"/v1/rollouts/{rid}/advance")
    assert r.status_code == 409 and "resume" in r.json()["detail"]
    assert env.post(f"/v1/rollouts/{rid}/resume").json()["status"] == "active"
    assert env.evaluate(rid)["decision"] == "advance"
    manual = env.post(f"/v1/rollouts/{rid}/advance").json()
    assert manual["stage"] == "10%"
    rb = env.post(f"/v1/rollouts/{rid}/rollback", json={"reason": "operator says no"}).json()
    assert rb["status"] == "rolled_back" and rb["reason"] == "operator says no"
    actions = [e["action"] for e in env.get("/v1/audit", params={"limit": 100}).json()]
    for a in ("rollout_created", "rollout_paused", "rollout_resumed", "rollout_advanced",
              "rollout_rolled_back"):
        assert a in actions
    events = env.get(f"/v1/rollouts/{rid}").json()["history"]
    assert [e["event"] for e in events] == ["created", "paused", "resumed", "advanced",
                                            "advanced", "rolled_back"]


def test_new_rollout_supersedes_and_knows_the_previous_version(env: Env) -> None:
    env.enroll(2)
    first = env.rollout("7", hold=0)["rollout_id"]
    for _ in range(6):
        env.post(f"/v1/rollouts/{first}/advance")
    assert env.get(f"/v1/rollouts/{first}").json()["status"] == "complete"
    second = env.rollout("8", hold=0)
    assert second["previous_model_version"] == "7"
    third = env.rollout("9", hold=0)
    assert env.get(f"/v1/rollouts/{second['rollout_id']}").json()["status"] == "cancelled"
    assert third["previous_model_version"] == "7"
    body = env.get("/v1/manifest", env.devices[0]["access_token"]).json()
    assert body["baseline"]["model_version"] == "7" and body["previous_model_version"] == "7"
    r = env.post("/v1/rollouts", json={"model_version": "9"})
    assert r.status_code == 409 and "new one" in r.json()["detail"]


def test_manifest_etag_304_and_range_download(env: Env) -> None:
    (dev,) = env.enroll(1)
    tok = dev["access_token"]
    r0 = env.get("/v1/manifest", tok)
    assert r0.status_code == 200 and r0.json()["assignment"]["mode"] == "none"
    etag = r0.headers["etag"]
    r = env.client.get("/v1/manifest", headers={**bearer(tok), "If-None-Match": etag})
    assert r.status_code == 304 and r.headers["etag"] == etag and r.content == b""
    assert env.get("/v1/manifest").status_code == 403  # admin token: not a device

    data = os.urandom(10_000)
    assert env.publish("7", "ro-e", data=data).status_code == 201
    rid = env.post("/v1/rollouts", json={"model_version": "7", "hold_seconds": 0}).json()[
        "rollout_id"]
    r1 = env.client.get("/v1/manifest", headers={**bearer(tok), "If-None-Match": etag})
    assert r1.status_code == 200 and r1.headers["etag"] != etag
    manifest = r1.json()["manifest"]  # the only device is the whole cohort
    assert r1.json()["assignment"]["mode"] == "shadow" and manifest["rollout_id"] == rid
    verify_manifest(manifest, load_public_key(env.tmp / "keys" / PUBLIC_KEY_FILE))

    url = f"/v1/models/{manifest['sha256']}"
    full = env.get(url, tok)
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes"
    part = env.client.get(url, headers={**bearer(tok), "Range": "bytes=4000-"})
    assert part.status_code == 206 and part.content == data[4000:]
    assert part.headers["content-range"] == f"bytes 4000-9999/{len(data)}"
    assert env.client.get(url, headers={**bearer(tok), "Range": "bytes=20000-"}).status_code == 416
    # An invalid Range (RFC 9110: last before first, not bytes, not numbers) is ignored: the
    # whole file, not Starlette's plain-text 400.
    for bad in ("bytes=9-0", "bytes=abc", "lines=0-5", "bytes=", "bytes=1-2,x"):
        r = env.client.get(url, headers={**bearer(tok), "Range": bad})
        assert r.status_code == 200 and r.content == data, (bad, r.status_code, r.text[:80])
    two = env.client.get(url, headers={**bearer(tok), "Range": "bytes=0-1, -2"})
    assert two.status_code == 206
    # A broken multipart body to POST /v1/models is the API's 422, not Starlette's 400; a
    # manifest part over its 256 KiB cap is a 413.
    r = env.client.post("/v1/models", content=b"--X\r\n",
                        headers={**bearer(env.admin), "Content-Type": "multipart/form-data"})
    assert r.status_code == 422 and "multipart" in r.json()["detail"], r.text
    r = env.post("/v1/models", data={"manifest": "x" * (256 * 1024 + 1)},
                 files={"file": ("m.onnx", b"x")})
    assert r.status_code == 413 and "limit" in r.json()["detail"], r.text
    assert env.get("/v1/models/" + "0" * 64, tok).status_code == 404
    assert env.client.get(url).status_code == 401


# =========================================================================== Dagster side
@pytest.fixture()
def live_gateway(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A real gateway on loopback (uvicorn in a thread): URL, admin token, key folder."""
    import socket
    import threading
    import time

    import uvicorn

    keys = tmp_path / "keys"
    load_or_create_signing_key(keys)
    settings = GatewaySettings(home=tmp_path / "gw", model_public_key_file=keys / PUBLIC_KEY_FILE)
    app = create_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    gw = app.state.gateway
    with gw.db.write() as s:
        admin, _ = create_admin_token(s, datetime.now(UTC), ttl_s=3600, actor="test")
        s.commit()
    yield f"http://127.0.0.1:{port}", admin, keys
    server.should_exit = True
    thread.join(10)


def test_model_rollout_asset_and_health_sensor(live_gateway: tuple[str, str, Path],
                                               tmp_path: Path) -> None:
    import dagster as dg

    from assets.records import QuantizedModelVersion, TrainedModelVersion
    from assets.rollout import model_rollout
    from resources import MlflowResource
    from resources.fleet_resource import FleetResource
    from roadloop.fsutil import sha256_file
    from roadloop.models.quantize import QuantConfig, QuantizedModelInfo
    from roadloop.models.tracking import PRODUCTION_ALIAS
    from sensors.rollout_health import rollout_health_sensor

    url, admin, keys = live_gateway
    onnx = tmp_path / "model.int8.onnx"
    onnx.write_bytes(os.urandom(5000))
    mlflow = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            artifact_root=str(tmp_path / "mlruns"))
    tracker = mlflow.tracker()
    run_id = tracker.start_run("t")
    mv = tracker.register_version("roadloop-detector", run_id, "weights")
    trained = TrainedModelVersion(
        registered_name="roadloop-detector", model_version=mv.version, run_id=run_id,
        weights=tmp_path / "best.pt", imgsz=320, class_names=CLASSES, dataset_md5="x")
    wide = tmp_path / "model.192x320.int8.onnx"
    wide.write_bytes(os.urandom(3000))

    def info(path: Path) -> QuantizedModelInfo:  # the hash model_rollout checks the file against
        return QuantizedModelInfo(
            path=path, sha256=sha256_file(path), size_bytes=path.stat().st_size, fp32_path=path,
            fp32_sha256="0" * 64, excluded_nodes=0, quantized_nodes=0, calibration_frames=0,
            config=QuantConfig())

    quant = QuantizedModelVersion(model_version=mv.version, run_id=run_id, info=info(onnx),
                                  variants={"192x320": info(wide)})
    fleet = FleetResource(gateway_url=url, admin_token=admin, key_dir=str(keys), hold_seconds=0)

    def run_asset() -> dg.MaterializeResult:
        return model_rollout(context=dg.build_asset_context(), quantized_model=quant,
                             trained_model=trained, fleet=fleet, mlflow=mlflow)

    with pytest.raises(dg.Failure, match="not the production model"):
        run_asset()
    tracker.set_alias("roadloop-detector", PRODUCTION_ALIAS, mv.version)
    result = run_asset()
    md = result.metadata
    assert md["stage_at_start"] == "shadow" and md["model_version"] == mv.version
    assert "stage" not in md and "status" not in md  # the current state is the observations'
    # The square file is the manifest's own; the 16:9 INT8 is a signed variant beside it.
    assert md["input_shapes"].value == [[320, 320], [192, 320]]
    assert md["key_id"] == key_id(load_public_key(keys / PUBLIC_KEY_FILE))
    rid = md["rollout_id"]

    ctx = dg.build_sensor_context(resources={"fleet": fleet})
    out = rollout_health_sensor(ctx)
    assert isinstance(out, dg.SensorResult)
    (obs,) = out.asset_events
    assert obs.asset_key == model_rollout.key
    assert obs.metadata["rollout_id"].value == rid
    assert obs.metadata["stage"].value == "shadow" and obs.metadata["decision"].value == "hold"
    assert "cohort_size" in obs.metadata and "health_per_stage" in obs.metadata
    again = rollout_health_sensor(dg.build_sensor_context(resources={"fleet": fleet},
                                                         cursor=out.cursor))
    assert isinstance(again, dg.SkipReason)  # nothing changed: no new observation
    assert again.skip_message == f"{rid}: hold at shadow"

    fleet.action(rid, "rollback", reason="test")
    # The finished rollout is observed once with its final status, then the sensor idles.
    done = rollout_health_sensor(dg.build_sensor_context(resources={"fleet": fleet},
                                                        cursor=out.cursor))
    assert isinstance(done, dg.SensorResult)
    (final,) = done.asset_events
    assert final.metadata["rollout_id"].value == rid
    assert final.metadata["status"].value == "rolled_back"
    idle = rollout_health_sensor(dg.build_sensor_context(resources={"fleet": fleet},
                                                        cursor=done.cursor))
    assert isinstance(idle, dg.SkipReason)
    assert idle.skip_message == f"no active rollout ({rid}: rolled_back, recorded)"
    down = FleetResource(gateway_url="http://127.0.0.1:9", admin_token=admin, key_dir=str(keys))
    with pytest.raises(dg.Failure, match="unreachable"):
        model_rollout(context=dg.build_asset_context(), quantized_model=quant,
                      trained_model=trained, fleet=down, mlflow=mlflow)
    skip = rollout_health_sensor(dg.build_sensor_context(resources={"fleet": down}))
    assert isinstance(skip, dg.SkipReason) and "unreachable" in str(skip.skip_message)


# =========================================================================== the fleet's baseline
def test_manifest_names_the_baseline_a_superseded_canary_returns_to(env: Env) -> None:
    """A device left serving a cancelled rollout's canary learns from every answer what the
    fleet stands behind: ``baseline`` (the newest other complete rollout; ``null`` while none
    completed, i.e. the model each agent was started with)."""
    (dev,) = env.enroll(1)
    a = env.rollout("8", hold=0)["rollout_id"]
    env.post(f"/v1/rollouts/{a}/advance")  # canary: the only device serves A
    assert env.get("/v1/manifest", dev["access_token"]).json()["assignment"]["mode"] == "serve"
    env.rollout("9", hold=0)  # cancels A
    body = env.get("/v1/manifest", dev["access_token"]).json()
    assert env.get(f"/v1/rollouts/{a}").json()["status"] == "cancelled"
    assert body["assignment"]["rollout_id"] != a
    assert "baseline" in body and body["baseline"] is None  # no rollout ever completed

    done = env.rollout("10", hold=0)["rollout_id"]
    for _ in range(6):
        env.post(f"/v1/rollouts/{done}/advance")
    assert env.get(f"/v1/rollouts/{done}").json()["status"] == "complete"
    live = env.rollout("11", hold=0)["rollout_id"]
    body = env.get("/v1/manifest", dev["access_token"]).json()
    assert body["assignment"]["rollout_id"] == live
    assert body["baseline"]["rollout_id"] == done and body["baseline"]["model_version"] == "10"
    # the completed rollout is rolled back while another is live: no longer the baseline
    assert env.post(f"/v1/rollouts/{done}/rollback").json()["status"] == "rolled_back"
    assert env.get("/v1/manifest", dev["access_token"]).json()["baseline"] is None
