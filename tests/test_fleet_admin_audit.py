"""Operator (``camera:admin``) side of the gateway, as an audit found it: exact admin bodies
(unknown keys and wrong JSON types are 422s), drift windows bounded by the gateway's clock,
refused publishes that leave no downloadable file, admin-token revocation from the CLI, and
stage lists that never send serving devices back to shadow (``docs/fleet-api.md``).

FastAPI ``TestClient`` on a real SQLite file; the gateway's clock is moved by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fleet.app import create_app
from fleet.auth import create_admin_token
from fleet.config import GatewaySettings
from fleet.db import CameraDriftRow
from fleet.rollout_policy import Stage, normalise_stages
from roadloop.release.signing import (
    PUBLIC_KEY_FILE,
    build_manifest,
    load_or_create_signing_key,
    sign_manifest,
)

from .test_fleet_gateway import bearer
from .test_rollouts import CLASSES, T0, Clock


@dataclass
class Gw:
    client: TestClient
    admin: str
    home: Path
    tmp: Path
    key: Any
    clock: Clock
    app: Any
    devices: list[dict[str, Any]] = field(default_factory=list)

    def post(self, path: str, token: str | None = None, **kw: Any) -> Any:
        return self.client.post(path, headers=bearer(token or self.admin), **kw)

    def put(self, path: str, token: str | None = None, **kw: Any) -> Any:
        return self.client.put(path, headers=bearer(token or self.admin), **kw)

    def get(self, path: str, token: str | None = None, **kw: Any) -> Any:
        return self.client.get(path, headers=bearer(token or self.admin), **kw)

    def enroll(self, camera_id: str) -> dict[str, Any]:
        tok = self.post("/v1/enrollment-tokens", json={}).json()["enrollment_token"]
        r = self.client.post("/v1/enroll", json={"enrollment_token": tok,
                                                 "camera_id": camera_id, "agent_version": "1"})
        assert r.status_code == 201, r.text
        d = {**r.json(), "camera_id": camera_id}
        self.devices.append(d)
        return d

    def model(self, name: str, data: bytes | None = None) -> Path:
        path = self.tmp / name
        path.write_bytes(data if data is not None else os.urandom(2048))
        return path

    def manifest(self, version: str, rollout_id: str, model: Path,
                 variants: dict[tuple[int, int], Path] | None = None) -> dict[str, Any]:
        return sign_manifest(build_manifest(version, model, 320, CLASSES, rollout_id,
                                            input_shape=(320, 320) if variants else None,
                                            variants=variants), self.key)

    def publish(self, manifest: dict[str, Any], files: list[tuple[str, Any]]) -> Any:
        return self.post("/v1/models", files=files, data={"manifest": json.dumps(manifest)})

    def model_files(self) -> set[str]:
        root = self.app.state.gateway.models.root
        return {p.name for p in root.iterdir()} if root.exists() else set()


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gw]:
    key = load_or_create_signing_key(tmp_path / "keys")
    home = tmp_path / "home"
    settings = GatewaySettings(home=home, rollout_min_frames=10,
                               model_public_key_file=tmp_path / "keys" / PUBLIC_KEY_FILE)
    clock = Clock()
    app = create_app(settings, clock=clock)
    with TestClient(app) as client:
        gateway = app.state.gateway
        with gateway.db.write() as s:
            admin, _ = create_admin_token(s, clock(), ttl_s=86400, actor="test")
            s.commit()
        yield Gw(client, admin, home, tmp_path, key, clock, app)


def _published(gw: Gw, version: str, rollout_id: str) -> str:
    model = gw.model(f"{rollout_id}.onnx")
    r = gw.publish(gw.manifest(version, rollout_id, model), [("file", ("m.onnx",
                                                                        model.read_bytes()))])
    assert r.status_code == 201, r.text
    return str(r.json()["manifest_sha256"])


# =========================================================================== 1. unknown keys
@pytest.mark.parametrize(("extra", "key"), [
    ({"hold": 86400}, "hold"),
    ({"stage": [{"percent": 100}]}, "stage"),
    ({"budgets": {"max_error_rat": 0.5}}, "budgets.max_error_rat"),
    ({"stages": [{"percent": 100, "mdoe": "shadow"}]}, "stages.0.mdoe"),
])
def test_a_typo_in_a_rollout_body_is_a_422_naming_the_key_and_starts_nothing(
    gw: Gw, extra: dict[str, Any], key: str
) -> None:
    gw.enroll("cam-a")
    msha = _published(gw, "1", "ro-1")
    r = gw.post("/v1/rollouts", json={"manifest_sha256": msha, **extra})
    assert r.status_code == 422, r.text
    assert f"body {key}: Extra inputs are not permitted" in r.json()["detail"]
    assert gw.get("/v1/rollouts").json() == []


def test_other_admin_bodies_refuse_unknown_keys(gw: Gw) -> None:
    d = gw.enroll("cam-a")
    msha = _published(gw, "1", "ro-1")
    assert gw.post("/v1/rollouts", json={"manifest_sha256": msha}).status_code == 201
    cases = [
        ("/v1/enrollment-tokens", {"camera_id": "cam-b", "requre_verification": True},
         "requre_verification"),
        (f"/v1/devices/{d['device_id']}/status", {"status": "maintenance", "reson": "x"},
         "reson"),
        ("/v1/rollouts/ro-1/rollback", {"reason": "bad", "force": True}, "force"),
        ("/v1/privacy/erase", {"camera_id": "cam-a", "since": "2026-01-01T00:00:00Z",
                               "until": "2026-01-02T00:00:00Z", "dry_run": True}, "dry_run"),
        ("/v1/privacy/expire", {"frames": [], "heartbeat_before": "2026-01-01T00:00:00Z"},
         "heartbeat_before"),
    ]
    for path, body, key in cases:
        r = gw.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert key in r.json()["detail"] and "Extra inputs" in r.json()["detail"], r.text
    # nothing happened: the device is still active, the rollout still live
    devices = gw.get("/v1/devices").json()
    assert [x["status"] for x in devices] == ["active"]
    assert gw.get("/v1/rollouts/ro-1").json()["status"] == "active"


# =========================================================================== 2. strict types
@pytest.mark.parametrize("value", [True, "0.5", "1"])
def test_camera_config_numbers_must_be_json_numbers(gw: Gw, value: Any) -> None:
    gw.enroll("cam-a")
    r = gw.put("/v1/cameras/cam-a/config", json={
        "config": {"sampling": {"base_rate": value}}, "expected_version": 0, "reason": "x"})
    assert r.status_code == 422, r.text
    assert "config.sampling.base_rate" in r.json()["detail"]
    for sampling in ({"hourly_budget": "10"},
                     {"boost": {"factor": "2", "until": "2026-11-26T00:00:00Z", "reason": "r"}}):
        r = gw.put("/v1/cameras/cam-a/config", json={
            "config": {"sampling": sampling}, "expected_version": 0, "reason": "x"})
        assert r.status_code == 422, r.text
    assert gw.get("/v1/cameras/cam-a/config").json()["version"] == 0
    # a JSON integer is still a number
    r = gw.put("/v1/cameras/cam-a/config", json={
        "config": {"sampling": {"base_rate": 1, "hourly_budget": 60}}, "expected_version": 0,
        "reason": "x"})
    assert r.status_code == 200, r.text
    assert r.json()["config"]["sampling"] == {"base_rate": 1.0, "hourly_budget": 60.0}


@pytest.mark.parametrize("value", [False, True, "0", "1"])
def test_expected_version_must_be_a_json_integer(gw: Gw, value: Any) -> None:
    gw.enroll("cam-a")
    r = gw.put("/v1/cameras/cam-a/config", json={
        "config": {"notes": "a"}, "expected_version": value, "reason": "x"})
    assert r.status_code == 422, r.text
    assert "expected_version" in r.json()["detail"]


def test_rollout_numbers_and_admin_flags_must_be_json_typed(gw: Gw) -> None:
    gw.enroll("cam-a")
    msha = _published(gw, "1", "ro-1")
    for body, where in [
        ({"budgets": {"min_frames": True}}, "budgets.min_frames"),
        ({"budgets": {"max_error_rate": "0.5"}}, "budgets.max_error_rate"),
        ({"budgets": {"min_cohort_devices": "3"}}, "budgets.min_cohort_devices"),
        ({"hold_seconds": "60"}, "hold_seconds"),
        ({"hold_seconds": True}, "hold_seconds"),
        ({"stages": [{"percent": "100"}]}, "stages.0.percent"),
    ]:
        r = gw.post("/v1/rollouts", json={"manifest_sha256": msha, **body})
        assert r.status_code == 422, (body, r.text)
        assert where in r.json()["detail"]
    assert gw.get("/v1/rollouts").json() == []
    for body, where in [({"ttl_s": "600"}, "ttl_s"), ({"ttl_s": True}, "ttl_s"),
                        ({"require_verification": "true"}, "require_verification"),
                        ({"require_verification": 1}, "require_verification")]:
        r = gw.post("/v1/enrollment-tokens", json=body)
        assert r.status_code == 422, (body, r.text)
        assert where in r.json()["detail"]
    r = gw.post("/v1/rollouts", json={"manifest_sha256": msha, "hold_seconds": 60,
                                      "budgets": {"min_frames": 5, "max_error_rate": 0}})
    assert r.status_code == 201, r.text
    assert r.json()["budgets"]["min_frames"] == 5 and r.json()["hold_seconds"] == 60.0


DRIFT = {"window_start": "2026-11-24T00:00:00Z", "window_end": "2026-11-25T00:00:00Z",
         "verdict": "ok", "drifted": False, "scores": {}}


@pytest.mark.parametrize("body", [
    {**DRIFT, "scores": {"brightness": True}},
    {**DRIFT, "scores": {"brightness": "0.5"}},
    {**DRIFT, "drifted": 0},
    {**DRIFT, "drifted": "false"},
])
def test_drift_scores_and_flag_must_be_json_typed(gw: Gw, body: dict[str, Any]) -> None:
    gw.enroll("cam-a")
    r = gw.put("/v1/cameras/cam-a/drift", json=body)
    assert r.status_code == 422, r.text


# =========================================================================== 3. drift window
def test_a_drift_window_far_in_the_future_is_refused_and_cannot_freeze_the_camera(
    gw: Gw
) -> None:
    gw.enroll("cam-a")
    future = {**DRIFT, "window_start": "2099-05-04T00:00:00Z", "window_end": "2099-05-05T00:00:00Z"}
    r = gw.put("/v1/cameras/cam-a/drift", json=future)
    assert r.status_code == 422, r.text
    assert "window_start" in r.json()["detail"] and "ahead of the gateway's clock" in r.text
    r = gw.put("/v1/cameras/cam-a/drift", json={**DRIFT, "window_end": "2099-05-05T00:00:00Z"})
    assert r.status_code == 422 and "window_end" in r.json()["detail"]
    # A row stored before the bound existed does not outrank real windows.
    gateway = gw.app.state.gateway
    with gateway.db.write() as s:
        s.add(CameraDriftRow(
            camera_id="cam-a", window_start=datetime(2099, 5, 4, tzinfo=UTC),
            window_end=datetime(2099, 5, 5, tzinfo=UTC), verdict="ok", drifted=False,
            scores={}, model_version=None, reported_at=T0, reported_by="old"))
        s.commit()
    real = {**DRIFT, "verdict": "significant", "drifted": True}
    r = gw.put("/v1/cameras/cam-a/drift", json=real)
    assert r.status_code == 200, r.text
    assert r.json()["current"] is True and r.json()["verdict"] == "significant"
    # An older window than a real stored one still changes nothing.
    older = {**DRIFT, "window_start": "2026-11-23T00:00:00Z", "window_end": "2026-11-24T00:00:00Z"}
    r = gw.put("/v1/cameras/cam-a/drift", json=older)
    assert r.status_code == 200 and r.json()["current"] is False
    # Up to a day ahead of the gateway's clock is accepted (a clock a little ahead).
    soon = (max(T0, datetime.now(UTC)) + timedelta(hours=20)).isoformat()
    r = gw.put("/v1/cameras/cam-a/drift", json={**DRIFT, "window_end": soon})
    assert r.status_code == 200 and r.json()["current"] is True


# =========================================================================== 4. refused publish
def test_a_rollout_id_clash_stores_no_file_and_orphans_are_not_served(gw: Gw) -> None:
    d = gw.enroll("cam-a")
    _published(gw, "1", "ro-1")
    before = gw.model_files()
    other = gw.model("other.onnx", os.urandom(3000))
    sha = hashlib.sha256(other.read_bytes()).hexdigest()
    r = gw.publish(gw.manifest("2", "ro-1", other), [("file", ("m.onnx", other.read_bytes()))])
    assert r.status_code == 409, r.text
    assert gw.model_files() == before
    r = gw.get(f"/v1/models/{sha}", token=d["access_token"])
    assert r.status_code == 404
    # A file in the models folder that no manifest names (left by an older gateway, copied
    # in by hand) is not served either.
    (gw.app.state.gateway.models.root / f"{sha}.onnx").write_bytes(other.read_bytes())
    assert gw.get(f"/v1/models/{sha}", token=d["access_token"]).status_code == 404
    assert gw.get(f"/v1/models/{sha}").status_code == 404


def test_a_refused_variant_removes_the_files_the_publish_stored(gw: Gw) -> None:
    d = gw.enroll("cam-a")
    main = gw.model("model.onnx")
    wide = gw.model("model.192x320.onnx")
    manifest = gw.manifest("3", "ro-3", main, variants={(192, 320): wide})
    main_sha = hashlib.sha256(main.read_bytes()).hexdigest()
    wide_sha = hashlib.sha256(wide.read_bytes()).hexdigest()
    before = gw.model_files()
    r = gw.publish(manifest, [("file", ("model.onnx", main.read_bytes())),
                              ("variant", ("model.192x320.onnx", os.urandom(2048)))])
    assert r.status_code == 422 and "variant file" in r.text, r.text
    assert gw.model_files() == before
    assert gw.get(f"/v1/models/{main_sha}", token=d["access_token"]).status_code == 404
    # The same publish with the right variant goes through; both files are served.
    r = gw.publish(manifest, [("file", ("model.onnx", main.read_bytes())),
                              ("variant", ("model.192x320.onnx", wide.read_bytes()))])
    assert r.status_code == 201, r.text
    for sha in (main_sha, wide_sha):
        r = gw.get(f"/v1/models/{sha}", token=d["access_token"])
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha


def test_a_refused_publish_keeps_a_file_a_stored_manifest_names(gw: Gw) -> None:
    d = gw.enroll("cam-a")
    model = gw.model("shared.onnx")
    r = gw.publish(gw.manifest("1", "ro-1", model), [("file", ("m", model.read_bytes()))])
    assert r.status_code == 201
    # Same bytes under a clashing rollout id: refused, the published file stays.
    r = gw.publish(gw.manifest("2", "ro-1", model), [("file", ("m", model.read_bytes()))])
    assert r.status_code == 409
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert gw.get(f"/v1/models/{sha}", token=d["access_token"]).status_code == 200


# =========================================================================== 5. admin tokens
def test_cli_lists_and_revokes_admin_tokens_at_once(tmp_path: Path) -> None:
    from fleet.cli import fleet_app

    runner = CliRunner()
    key = load_or_create_signing_key(tmp_path / "keys")
    home = tmp_path / "h"
    r = runner.invoke(fleet_app, ["admin-token", "create", "--home", str(home),
                                  "--label", "ops laptop"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[0]
    r = runner.invoke(fleet_app, ["admin-token", "list", "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["label"], x["state"]) for x in rows] == [("ops laptop", "active")]
    assert token not in r.stdout
    token_id = rows[0]["token_id"]

    settings = GatewaySettings(home=home, model_public_key_file=tmp_path / "keys" / PUBLIC_KEY_FILE)
    app = create_app(settings)
    with TestClient(app) as client:
        model = tmp_path / "m.onnx"
        model.write_bytes(os.urandom(1000))
        manifest = sign_manifest(build_manifest("1", model, 320, CLASSES, "ro-1"), key)
        r = client.post("/v1/models", headers=bearer(token), data={
            "manifest": json.dumps(manifest)}, files={"file": ("m.onnx", model.read_bytes())})
        assert r.status_code == 201, r.text
        sha = manifest["sha256"]
        assert client.get(f"/v1/models/{sha}", headers=bearer(token)).status_code == 200
        assert client.get("/v1/devices", headers=bearer(token)).status_code == 200

        r = runner.invoke(fleet_app, ["admin-token", "revoke", str(token_id), "--home",
                                      str(home), "--reason", "laptop lost"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["already_revoked"] is False
        # at once, on admin routes and on the model download (no cached principal)
        for path in ("/v1/devices", f"/v1/models/{sha}"):
            r = client.get(path, headers=bearer(token))
            assert r.status_code == 401, (path, r.text)
            assert "admin token was revoked" in r.json()["detail"]

        # audited like create
        with app.state.gateway.db.write() as s:
            other, _ = create_admin_token(s, datetime.now(UTC), ttl_s=600, actor="test")
            s.commit()
        events = client.get("/v1/audit", headers=bearer(other),
                            params={"action": "admin_token_revoked"}).json()
        assert [(e["actor"], e["token_id"], e["detail"]["reason"]) for e in events] == [
            ("cli", token_id, "laptop lost")]

    r = runner.invoke(fleet_app, ["admin-token", "revoke", str(token_id), "--home", str(home)])
    assert r.exit_code == 0 and json.loads(r.stdout)["already_revoked"] is True
    r = runner.invoke(fleet_app, ["admin-token", "list", "--home", str(home)])
    assert r.exit_code == 0 and "revoked" in r.stdout and "ops laptop" in r.stdout
    r = runner.invoke(fleet_app, ["admin-token", "revoke", "9999", "--home", str(home)])
    assert r.exit_code == 1 and "no admin token 9999" in r.output


def test_an_admin_token_revoked_elsewhere_is_refused_on_downloads_at_once(gw: Gw) -> None:
    """The download route caches device principals for 2 s; an admin token's is never cached,
    so a revocation made by another process (the CLI, another replica) holds at once."""
    from sqlalchemy import update

    from fleet.auth import hash_token
    from fleet.db import Token

    model = gw.model("m.onnx")
    r = gw.publish(gw.manifest("1", "ro-1", model), [("file", ("m", model.read_bytes()))])
    sha = r.json()["sha256"]
    assert gw.get(f"/v1/models/{sha}").status_code == 200
    with gw.app.state.gateway.db.write() as s:  # as `fleet admin-token revoke` does
        s.execute(update(Token).where(Token.token_hash == hash_token(gw.admin))
                  .values(revoked_at=T0))
        s.commit()
    r = gw.get(f"/v1/models/{sha}")
    assert r.status_code == 401 and "admin token was revoked" in r.json()["detail"]


# =========================================================================== 6. stage order
def test_a_shadow_stage_after_a_serving_stage_is_refused(gw: Gw) -> None:
    with pytest.raises(ValueError, match=r"stages\[1\].*shadow"):
        normalise_stages([Stage(percent=50), Stage(percent=60, mode="shadow"),
                          Stage(percent=100)])
    # shadow stages first are the normal shape (the default stages start with one)
    assert [s.mode for s in normalise_stages([
        Stage(percent=5, mode="shadow"), Stage(name="wide shadow", percent=20, mode="shadow"),
        Stage(percent=50), Stage(percent=100)])] == ["shadow", "shadow", "serve", "serve"]
    assert normalise_stages(None)[0].mode == "shadow"

    gw.enroll("cam-a")
    msha = _published(gw, "1", "ro-1")
    r = gw.post("/v1/rollouts", json={"manifest_sha256": msha, "stages": [
        {"percent": 50}, {"name": "late", "percent": 60, "mode": "shadow"}, {"percent": 100}]})
    assert r.status_code == 422, r.text
    assert "stages[1] ('late')" in r.json()["detail"]
    assert gw.get("/v1/rollouts").json() == []
