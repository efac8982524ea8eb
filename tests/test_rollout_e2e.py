"""Staged rollouts end to end: a real gateway process, three real agents on loopback.

1. A new model is published (signed by the platform key, ``FleetResource``) and rolled out
   through every stage (shadow → canary 5 → 10 → 25 → 50 → 100, hold 2 s) with ``/evaluate``
   driven from the test; every agent ends up serving it (heartbeat ``model_version``).
2. Bad updates, each its own rollout: a model that does not load, a model with the wrong
   input size, a stored file whose bytes changed at rest (hash mismatch), a truncated stored
   file, a manifest altered after signing, a manifest signed by another key (the last four
   tamper with the gateway's files/DB, as a compromised or corrupted gateway would). Each is
   rejected or rolled back by the agent, the reason is reported, the gateway rolls the
   rollout back, and the previous model keeps serving.
3. A slow model (``EDGE_AGENT_FAULT_MODEL_DELAY_MS``) goes to a canary and is rolled back
   automatically; the timeline publish → rollback → agents back on the previous model is
   written as JSON to ``$ROADLOOP_ROLLBACK_TIMELINE`` when set (``make bench`` points it at
   ``benchmarks/results/rollback_timeline.json``), else under the test's temp folder.

Skips when the shared video/model are absent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from launch.localfleet import GatewayProcess, child_env
from roadloop.fsutil import sha256_file
from roadloop.release.signing import (
    build_manifest,
    load_or_create_signing_key,
    manifest_sha256,
    sign_manifest,
)

from .helpers import SHARED_DIR, require_shared

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
VIDEO = SHARED_DIR / "videos" / "cctv_street.mp4"
MODEL = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"
MODEL_480 = SHARED_DIR / "models" / "atl_v2_yolo11n_480.onnx"
N_AGENTS = 3
SLOW_DELAY_MS = 2500
P95_BUDGET_MS = 1200.0

require_shared(VIDEO, MODEL, MODEL_480)


def _env(**extra: str) -> dict[str, str]:
    return child_env(OMP_NUM_THREADS="1", **extra)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _variant(src: Path, dst: Path, tag: str) -> Path:
    """The same network with one more metadata entry: a new model file (new SHA-256)."""
    import onnx

    model = onnx.load(str(src))
    entry = model.metadata_props.add()
    entry.key, entry.value = "roadloop_variant", tag
    onnx.save(model, str(dst))
    return dst


def _class_names(path: Path) -> list[str]:
    from roadloop.models.export import load_onnx_metadata

    return load_onnx_metadata(path).class_names


class Fleet:
    """Gateway process + agent processes + admin calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gateway = GatewayProcess(
            root / "home", log_path=root / "gateway.log",
            env={"ROADLOOP_GATEWAY_ROLLOUT_MIN_FRAMES": "3",
                 "ROADLOOP_GATEWAY_ROLLOUT_MIN_REPORTING_FRACTION": "1.0",
                 "ROADLOOP_GATEWAY_ROLLOUT_P95_LATENCY_BUDGET_MS": str(P95_BUDGET_MS)})
        self.home, self.url = self.gateway.home, self.gateway.url
        self.agents: list[subprocess.Popen] = []
        self.admin = ""

    def cli(self, *args: str) -> str:
        return self.gateway.cli(*args)

    def start_gateway(self) -> None:
        self.gateway.start()

    def start_agent(self, i: int, env: dict[str, str]) -> None:
        token = self.cli("token", "create")
        log = open(self.root / f"agent-{i}.log", "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "edge_agent", "run", "--gateway", self.url,
               "--camera-id", f"cam-{i}", "--enroll-token", token,
               "--state-dir", str(self.root / f"agent-{i}"), "--source", str(VIDEO),
               "--model", str(MODEL), "--loop", "--realtime", "--max-fps", "8", "--threads", "1",
               "--heartbeat-interval", "1", "--update-interval", "0.5",
               "--base-rate", "0", "--no-condition-samplers", "--hourly-budget", "1",
               "--latency-budget-ms", str(P95_BUDGET_MS), "--rollback-after", "2",
               "--shadow-rate", "0.5"]
        self.agents.append(subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=log,
                                            stderr=subprocess.STDOUT))

    def stop(self) -> None:
        for p in self.agents:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.agents:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.gateway.stop()

    # ---- admin API
    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(method, self.url + path, timeout=60,
                          headers={"Authorization": f"Bearer {self.admin}"}, **kw)
        assert r.status_code < 400, (path, r.status_code, r.text)
        return r.json()

    def latest_heartbeats(self) -> dict[str, dict[str, Any]]:
        """Newest heartbeat payload per device."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(N_AGENTS):
            rows = self.call("GET", f"/v1/cameras/cam-{i}/heartbeats", params={"limit": 1})
            if rows:
                out[rows[-1]["device_id"]] = rows[-1]["payload"]
        return out

    def wait_for(self, what: str, cond: Callable[[], Any], timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, a in enumerate(self.agents):
                assert a.poll() is None, (self.root / f"agent-{i}.log").read_text()[-3000:]
            value = cond()
            if value:
                return value
            time.sleep(0.5)
        logs = "\n".join((self.root / f"agent-{i}.log").read_text()[-1500:]
                         for i in range(len(self.agents)))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def all_serving(self, sha: str) -> bool:
        hbs = self.latest_heartbeats()
        return len(hbs) == N_AGENTS and all(p.get("model_version") == sha for p in hbs.values())

    def drive(self, rollout_id: str, timeline: list[dict[str, Any]] | None = None,
              timeout: float = 300) -> dict[str, Any]:
        """Call /evaluate every 0.5 s until the rollout is complete or rolled back."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            out = self.call("POST", f"/v1/rollouts/{rollout_id}/evaluate")
            key = (out["decision"], out["stage"])
            if timeline is not None and key != last:
                timeline.append({"at": _now(), "event": f"evaluate:{out['decision']}",
                                 "stage": out["stage"], "status": out["status"],
                                 "reasons": (out.get("health") or {}).get("reasons")})
            last = key
            if out["status"] in ("complete", "rolled_back"):
                return out
            time.sleep(0.5)
        raise AssertionError(f"rollout {rollout_id} neither completed nor rolled back: {out}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("rollout-e2e")
    f = Fleet(root)
    load_or_create_signing_key(f.home / "keys")  # the platform's key, under the same home
    f.root.joinpath("models").mkdir()
    f.slow = _variant(MODEL, root / "models" / "slow.onnx", "slow")  # type: ignore[attr-defined]
    f.start_gateway()
    f.admin = f.cli("admin-token", "create")
    delay = f"{sha256_file(f.slow)[:16]}={SLOW_DELAY_MS}"  # type: ignore[attr-defined]
    for i in range(N_AGENTS):
        f.start_agent(i, {"EDGE_AGENT_FAULT_MODEL_DELAY_MS": delay})
    try:
        base = sha256_file(MODEL)
        f.wait_for("every agent's first heartbeat", lambda: f.all_serving(base), timeout=240)
        yield f
    finally:
        f.stop()


def _resource(fleet: Fleet) -> Any:
    from resources.fleet_resource import FleetResource

    return FleetResource(gateway_url=fleet.url, admin_token=fleet.admin,
                         key_dir=str(fleet.home / "keys"), hold_seconds=2)


# What the rejected updates left, for the timeline file the slow-canary test writes.
REJECTIONS: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def full_rollout(fleet: Fleet) -> dict[str, Any]:
    """v2 rolled out through every stage until every agent serves it, once per module.

    The bad-update and slow-canary tests start from v2 serving everywhere: when this rollout
    fails, they error with its failure (pytest keeps a module fixture's error), never skip.
    """
    new = _variant(MODEL, fleet.root / "models" / "v2.onnx", "v2")
    pub = _resource(fleet).publish("2", new, 320, _class_names(MODEL), fmt="onnx-fp32")
    ro = _resource(fleet).create_rollout(pub["manifest_sha256"])
    rid = ro["rollout_id"]
    timeline: list[dict[str, Any]] = []
    final = fleet.drive(rid, timeline)
    assert final["status"] == "complete", final
    sha = pub["manifest"]["sha256"]
    fleet.wait_for("every agent serving v2", lambda: fleet.all_serving(sha), timeout=60)
    return {"sha256": sha, "rollout_id": rid, "timeline": timeline, "final": final}


def test_full_rollout_reaches_every_agent_through_every_stage(
    fleet: Fleet, full_rollout: dict[str, Any]
) -> None:
    rid, final = full_rollout["rollout_id"], full_rollout["final"]
    timeline = full_rollout["timeline"]
    stages = [e["stage"] for e in timeline]
    for name in ("shadow", "canary", "10%", "25%", "50%", "100%"):
        assert name in stages, stages
    history = [h["event"] for h in final["rollout"]["history"]]
    assert history == ["created"] + ["advanced"] * 5 + ["completed"], history
    health = final["rollout"]["health"]
    assert health["shadow"]["shadow_f1"] is not None and health["shadow"]["verdict"] == "pass"
    assert health["100%"]["devices_reporting"] == N_AGENTS
    heartbeats = fleet.latest_heartbeats()
    assert len(heartbeats) == N_AGENTS
    for p in heartbeats.values():
        assert p["model_version"] == full_rollout["sha256"]
        assert p["update_status"] == "serving" and p["rollout_id"] == rid


def _tamper_db(fleet: Fleet, msha: str, manifest: dict[str, Any]) -> None:
    db = fleet.home / "fleet" / "fleet.db"
    conn = sqlite3.connect(db, timeout=30)
    try:
        conn.execute("UPDATE model_manifests SET manifest = ? WHERE manifest_sha256 = ?",
                     (json.dumps(manifest), msha))
        conn.commit()
    finally:
        conn.close()


# case -> (the agent's update_status, what its update_reason says), as the gateway's
# rollback reason quotes them: "device <id> reported <status>: <reason>" (fleet/rollouts.py
# stage_health; the reasons are edge_agent/updater.py's).
BAD_CASES = {
    "does_not_load": ("rolled_back", "does not load"),
    "wrong_input_size": ("rolled_back", "has input size 480, the manifest says 320"),
    "hash_mismatch_at_rest": ("rejected", "sha256 mismatch"),
    "truncated_file": ("rejected", "size mismatch"),
    "manifest_altered": ("rejected", "bad manifest signature"),
    "signed_by_other_key": ("rejected", "manifest signed by another key"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_update_is_refused_and_rolled_back(
    fleet: Fleet, full_rollout: dict[str, Any], case: str
) -> None:
    v2 = full_rollout["sha256"]
    names = _class_names(MODEL)
    src = fleet.root / "models" / f"{case}.onnx"
    if case == "does_not_load":
        src.write_bytes(b"this is not an onnx model " * 200)
    elif case == "wrong_input_size":
        _variant(MODEL_480, src, case)  # a 480 px network announced as 320
    else:
        _variant(MODEL, src, case)
    t_publish = _now()
    pub = _resource(fleet).publish(f"bad-{case}", src, 320, names, fmt="onnx-fp32")
    sha, msha = pub["manifest"]["sha256"], pub["manifest_sha256"]
    stored = fleet.home / "fleet" / "models" / f"{sha}.onnx"
    if case == "hash_mismatch_at_rest":
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    elif case == "truncated_file":
        stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])
    elif case == "manifest_altered":
        _tamper_db(fleet, msha, {**pub["manifest"], "input_size": 480})
    elif case == "signed_by_other_key":
        other = load_or_create_signing_key(fleet.root / "other-keys")
        _tamper_db(fleet, msha, sign_manifest(
            build_manifest(f"bad-{case}", src, 320, names, pub["manifest"]["rollout_id"],
                           "onnx-fp32"), other))
    ro = _resource(fleet).create_rollout(msha)
    final = fleet.drive(ro["rollout_id"], timeout=150)
    assert final["status"] == "rolled_back", final
    reason = final["rollout"]["reason"]
    status, because = BAD_CASES[case]
    assert re.match(r"device \S+ reported ", reason), reason
    assert f" reported {status}: " in reason and because in reason, reason
    # The previous model (v2) keeps serving on every agent.
    assert fleet.all_serving(v2) or fleet.wait_for(
        "agents back on v2", lambda: fleet.all_serving(v2), timeout=30)
    reports = [p for p in fleet.latest_heartbeats().values()
               if p.get("rollout_id") == ro["rollout_id"]]
    REJECTIONS.append({
        "case": case, "rollout_id": ro["rollout_id"], "published_at": t_publish,
        "rolled_back_at": final["rollout"]["finished_at"], "gateway_reason": reason,
        "agent_status": sorted({p.get("update_status") for p in reports}),
    })


def test_slow_canary_rolls_back_automatically_with_timeline(
    fleet: Fleet, full_rollout: dict[str, Any], tmp_path: Path
) -> None:
    v2 = full_rollout["sha256"]
    timeline: list[dict[str, Any]] = [{"at": _now(), "event": "publish_started"}]
    slow: Path = fleet.slow  # type: ignore[attr-defined]
    pub = _resource(fleet).publish("3-slow", slow, 320, _class_names(MODEL), fmt="onnx-fp32")
    timeline.append({"at": _now(), "event": "published", "manifest_sha256": pub["manifest_sha256"]})
    ro = _resource(fleet).create_rollout(
        pub["manifest_sha256"],
        stages=[{"name": "canary", "percent": 5, "mode": "serve"},
                {"name": "100%", "percent": 100, "mode": "serve"}])
    timeline.append({"at": _now(), "event": "rollout_created", "stage": ro["stage"],
                     "cohort_size": ro["cohort_size"]})
    canary = fleet.wait_for("the canary serving the slow model", lambda: [
        d for d, p in fleet.latest_heartbeats().items()
        if p.get("model_version") == pub["manifest"]["sha256"]], timeout=60)
    timeline.append({"at": _now(), "event": "canary_serving_new_model", "devices": canary})
    final = fleet.drive(ro["rollout_id"], timeline, timeout=180)
    assert final["status"] == "rolled_back", final
    assert final["stage"] == "canary", final  # never got past the canary
    reason = final["rollout"]["reason"]
    # Either the gateway saw the canary's P95 over budget first ("P95 latency 2568.5 ms >
    # budget 1200 ms"), or the canary's own guard rolled it back and reported it ("device ..
    # reported rolled_back: model .. rolled back to ..: latency P95 2568.5 ms > budget 1200.0
    # ms for 2 consecutive heartbeat windows"): both name the latency against its budget.
    assert re.search(r"(P95 latency|latency P95) [\d.]+ ms > budget [\d.]+ ms", reason), reason
    timeline.append({"at": final["rollout"]["finished_at"], "event": "gateway_rolled_back",
                     "reason": reason})
    fleet.wait_for("every agent back on v2", lambda: fleet.all_serving(v2), timeout=60)
    timeline.append({"at": _now(), "event": "all_agents_serving_previous_model",
                     "model_sha256": v2})
    audit = fleet.call("GET", "/v1/audit", params={"action": "rollout_rolled_back", "limit": 50})
    assert any(e["detail"]["rollout_id"] == ro["rollout_id"] and e["detail"]["how"] == "automatic"
               for e in audit)
    t0 = datetime.fromisoformat(timeline[0]["at"])
    for e in timeline:
        e["t_s"] = round((datetime.fromisoformat(e["at"]) - t0).total_seconds(), 3)
    target = Path(os.environ.get("ROADLOOP_ROLLBACK_TIMELINE") or tmp_path / "rollback_timeline.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "generated_at": _now(),
        "setup": {"agents": N_AGENTS, "hold_seconds": 2, "heartbeat_interval_s": 1,
                  "update_interval_s": 0.5, "slow_model_delay_ms": SLOW_DELAY_MS,
                  "p95_budget_ms": P95_BUDGET_MS, "video": VIDEO.name, "model": MODEL.name},
        "slow_canary_rollback": {"rollout_id": ro["rollout_id"], "timeline": timeline},
        "full_rollout": {k: full_rollout[k] for k in ("rollout_id", "timeline")},
        "rejected_updates": REJECTIONS,
    }
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, target)
    assert json.loads(target.read_text())["slow_canary_rollback"]["timeline"][-1]["event"] == (
        "all_agents_serving_previous_model")
    assert manifest_sha256(pub["manifest"]) == pub["manifest_sha256"]
