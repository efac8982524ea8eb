"""Strings and shapes a device can send that the gateway once stored and then could not
serve (found by a black-box audit): NUL (PostgreSQL refuses it at insert, so the frame's
files stayed without a row and the start-up reconcile failed at every start), lone UTF-16
surrogates (stored, then every answer including them was a 500), a record id that names
another camera's id space, a list where rollout health expects a model version, and the
messages of a few refusals."""

from __future__ import annotations

import asyncio
import json
import struct
from datetime import timedelta
from typing import Any

import pytest

from fleet import intake, intake_batch
from fleet.auth import create_admin_token
from fleet.bounds import check_json_value, text_problem
from fleet.heartbeat_plausibility import heartbeat_problems
from fleet.intake_batch import BATCH_CONTENT_TYPE
from fleet.reconcile import reconcile_frame_store
from fleet.rollout_policy import Stage, _sample
from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import FrameStore
from tests import test_fleet_hostile_uploads as uploads
from tests.test_fleet_hostile_uploads import T0, Env, assert_4xx, meta

# The upload tests' fixtures: a gateway with one enrolled device (camera "cam-a"), a JPEG.
make_env, env, good = uploads.make_env, uploads.env, uploads.good

NUL_BODY = '"m\\u0000"'  # JSON text of a string holding NUL
SURROGATE = '"\\ud800"'  # JSON text of a lone high surrogate


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_token(env: Env, ttl_s: int = 86400) -> str:
    with env.gw.db.write() as session:
        token, _ = create_admin_token(session, T0, ttl_s=ttl_s, actor="test")
        session.commit()
    return token


def heartbeat(**extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "camera_id": "cam-a", "model_version": None,
            "sent_at": T0.isoformat(), **extra}


def post_json_text(env: Env, path: str, text: str, token: str) -> Any:
    return env.client.post(path, content=text.encode(),
                           headers={**auth(token), "Content-Type": "application/json"})


def test_text_problem_names_nul_and_lone_surrogates() -> None:
    assert text_problem("car") is None and text_problem("voiture ↔ 車 😀") is None
    assert "NUL" in (text_problem("a\x00b") or "")
    assert "surrogate" in (text_problem("\ud800") or "")
    with pytest.raises(ValueError, match=r"\$\.cpu.*NUL"):
        check_json_value({"cpu": "x\x00"})
    with pytest.raises(ValueError, match="object key.*surrogate"):
        check_json_value({"\udfff": 1})


def test_nul_in_frame_metadata_is_a_422_and_nothing_is_stored(env: Env, good: bytes) -> None:
    text = json.dumps(meta("f-nul")).replace('"sha256:abc"', NUL_BODY)
    assert_4xx(env.post(text, good), 422, "model_version", "NUL")
    reasons = json.dumps(meta("f-nul2")).replace('"base_rate"', SURROGATE)
    assert_4xx(env.post(reasons, good), 422, "reasons", "surrogate")
    env.assert_nothing_stored()


def test_one_nul_frame_in_a_batch_does_not_sink_the_others(env: Env, good: bytes) -> None:
    metas = [meta("b-ok-1"), meta("b-nul"), meta("b-ok-2")]
    manifest = json.dumps({"frames": [{"metadata": m, "image_bytes": len(good)}
                                      for m in metas]})
    manifest = manifest.replace('"frame_id": "b-nul", "camera_id": "cam-a", "captured_at": '
                                f'"{T0.isoformat()}", "reasons": ["base_rate"]',
                                '"frame_id": "b-nul", "camera_id": "cam-a", "captured_at": '
                                f'"{T0.isoformat()}", "reasons": ["x\\u0000"]')
    assert "\\u0000" in manifest
    body = struct.pack(">I", len(manifest)) + manifest.encode() + good * 3
    r = env.client.post("/v1/frames/batch", content=body,
                        headers={**auth(env.token), "Content-Type": BATCH_CONTENT_TYPE})
    assert r.status_code == 200, r.text
    statuses = [x["status"] for x in r.json()["results"]]
    assert statuses == [201, 422, 201], r.json()
    assert "NUL" in r.json()["results"][1]["detail"]
    assert sorted(row.frame_id for row in env.rows()) == ["b-ok-1", "b-ok-2"]


def test_nul_and_surrogates_in_json_bodies_are_refused(env: Env) -> None:
    admin = admin_token(env)
    # free-form heartbeat payload: a key and a value
    hb = json.dumps(heartbeat())[:-1]
    assert_4xx(post_json_text(env, "/v1/heartbeats", hb + f', "note": {SURROGATE}}}',
                              env.token), 422, "$.note", "surrogate")
    assert_4xx(post_json_text(env, "/v1/heartbeats", hb + f', {NUL_BODY}: 1}}', env.token),
               422, "NUL")
    # a typed field
    typed = json.dumps(heartbeat()).replace('"model_version": null',
                                            f'"model_version": {NUL_BODY}')
    assert_4xx(post_json_text(env, "/v1/heartbeats", typed, env.token), 422, "NUL")
    # enrollment's free-form hardware
    tok = env.client.post("/v1/enrollment-tokens", json={},
                          headers=auth(admin)).json()["enrollment_token"]
    enroll = json.dumps({"enrollment_token": tok, "camera_id": "cam-b",
                         "agent_version": "0.1.0", "hardware": {"cpu": "x"}})
    r = post_json_text(env, "/v1/enroll", enroll.replace('"x"', SURROGATE), "")
    assert_4xx(r, 422, "surrogate")
    # nothing was stored that the listings could not serve
    assert env.client.get("/v1/devices", headers=auth(admin)).status_code == 200
    r = env.client.get("/v1/cameras/cam-a/heartbeats", headers=auth(admin))
    assert r.status_code == 200 and r.json() == [] or r.json().get("items", []) == []


def test_a_record_id_cannot_reach_into_a_dotted_camera_ids_space(env: Env) -> None:
    start = T0.replace(second=0, microsecond=0) - timedelta(minutes=5)
    record = {"record_id": f"cam-a.b.{int(start.timestamp())}.1", "camera_id": "cam-a",
              "interval_start": start.isoformat(), "interval_s": 60, "covered_s": 60.0,
              "frames": 1, "config_version": 1, "model_version": "m", "lines": [],
              "zones": [], "events": []}
    r = env.client.post("/v1/traffic/intervals", json=record, headers=auth(env.token))
    assert_4xx(r, 422, "record_id", "cam-a.<interval start")
    record["record_id"] = f"cam-a.{int(start.timestamp())}.1"
    assert env.client.post("/v1/traffic/intervals", json=record,
                           headers=auth(env.token)).status_code == 201


def test_rollout_health_reads_only_strings_from_a_payload() -> None:
    assert any("shadow.model_version" in p for p in heartbeat_problems(
        {"shadow": {"model_version": ["x"], "frames": 5}}))
    assert any("update_status" in p for p in heartbeat_problems({"update_status": {"a": 1}}))
    shadow = Stage(name="shadow", mode="shadow", percent=100.0)
    stored = {"rollout_id": "other", "shadow": {"model_version": ["x"], "frames": 5}}
    assert _sample(stored, shadow, "ro-1", {"v2"}) is None  # once: TypeError, unhashable
    serve = Stage(name="canary", mode="serve", percent=10.0)
    assert _sample({"model_version": ["v2"], "frames_processed": 3}, serve, "ro-1",
                   {"v2"}) is None


def test_reconcile_drops_a_frame_whose_record_cannot_become_a_row(env: Env,
                                                                  good: bytes) -> None:
    """A frame written by a gateway that let NUL through, whose insert then failed: never
    acknowledged; on PostgreSQL its recovered row failed the start-up at every start."""
    store = FrameStore(env.settings.frame_store)
    record = FrameRecord.model_validate({**meta("orphan"), "source": "agent:dev",
                                         "model_version": "m\x00", "quality": None})
    written = store.write_frame(record, good)
    report = reconcile_frame_store(env.gw.db, store, env.gw.now, full=True)
    assert report.recovered_rows == 0 and report.unreadable_sidecars == 1
    assert not written.path.exists() and not env.rows()


def test_a_refused_insert_leaves_no_files(env: Env, good: bytes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An insert the database refuses for its values (not a database that is down) is the
    500 it is, and the files the upload wrote go: the reconcile would make rows of them."""

    def refuse(session: Any, rows: Any) -> Any:
        raise ValueError("A string literal cannot contain NUL (0x00) characters.")

    monkeypatch.setattr(intake, "insert_new_frames", refuse)
    with pytest.raises(ValueError, match="NUL"):
        env.post(meta("f-refused"), good)
    env.assert_nothing_stored()


def test_batch_manifest_is_parsed_off_the_event_loop(env: Env, good: bytes,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    where: list[bool] = []
    real = intake_batch.split_batch

    def recording(body: bytes, settings: Any) -> Any:
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:
            where.append(False)
        return real(body, settings)

    monkeypatch.setattr(intake_batch, "split_batch", recording)
    manifest = json.dumps({"frames": [{"metadata": meta("b1"), "image_bytes": len(good)}]})
    body = struct.pack(">I", len(manifest)) + manifest.encode() + good
    r = env.client.post("/v1/frames/batch", content=body,
                        headers={**auth(env.token), "Content-Type": BATCH_CONTENT_TYPE})
    assert r.status_code == 200 and where == [False], (r.text, where)


def test_413_names_the_limit_of_the_route(env: Env) -> None:
    r = env.client.post("/v1/heartbeats", content=b"{}",
                        headers={**auth(env.token), "Content-Type": "application/json",
                                 "Content-Length": str(100 * 1024 * 1024)})
    assert_4xx(r, 413, "ROADLOOP_GATEWAY_MAX_JSON_BYTES", "JSON body")
    assert "image" not in r.json()["detail"]


def test_an_expired_admin_token_says_how_to_get_a_new_one(env: Env) -> None:
    token = admin_token(env, ttl_s=1)
    env.gw.clock = lambda: T0 + timedelta(seconds=5)
    r = env.client.get("/v1/devices", headers=auth(token))
    assert_4xx(r, 401, "admin token expired", "roadloop fleet admin-token create")
    assert "refresh" not in r.json()["detail"]


def test_a_large_manifest_pays_for_its_size_before_it_is_parsed(
        make_env: Any, good: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token buys at most one metadata's worth of parsing: a 1-frame batch whose
    manifest is 3 metadata limits long costs 3 tokens, refused as a whole (429) when the
    device's bucket holds fewer; an agent's small manifest costs one token a frame."""
    env = make_env(max_metadata_bytes=4000, rate_limit_burst=4, rate_limit_per_s=0.001)
    parsed: list[int] = []
    real = intake_batch.split_batch
    monkeypatch.setattr(intake_batch, "split_batch",
                        lambda body, settings: parsed.append(len(body)) or real(body, settings))

    def batch(metas: list[dict[str, Any]]) -> Any:
        manifest = json.dumps({"frames": [{"metadata": m, "image_bytes": len(good)}
                                          for m in metas]})
        body = struct.pack(">I", len(manifest)) + manifest.encode() + good * len(metas)
        return env.client.post("/v1/frames/batch", content=body,
                               headers={**auth(env.token), "Content-Type": BATCH_CONTENT_TYPE})

    padded = meta("big") | {"padding": ["y" * 4000] * 2}
    assert 8000 < len(json.dumps({"frames": [{"metadata": padded, "image_bytes": 1}]})) <= 12000
    assert batch([meta("small")]).status_code == 200  # 1 token: 3 left
    r = batch([padded])  # 3 tokens: 1 for the request, 2 for its manifest -> none left
    assert r.status_code == 200 and r.json()["results"][0]["status"] == 413  # metadata too large
    r = batch([meta("after")])
    assert_4xx(r, 429, "rate limit")
    assert len(parsed) == 2  # the refused request was not parsed
