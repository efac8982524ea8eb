"""Edge agent ↔ real fleet gateway, end to end, over loopback (processes, not mocks).

* enroll → stream the shared video → sampled frames land in the gateway's frame store
  with reasons, detections and the model version → heartbeats are queryable; short-lived
  access tokens are refreshed on the way;
* the gateway is down for a while (``EDGE_E2E_OUTAGE_S``, 5 s here instead of 60 s; the
  same code path) → the outbox drains when it is back, every sampled frame stored once;
* the agent is SIGKILLed between the gateway's 201 and its local ack → the restart re-sends,
  the 409 is absorbed, no duplicate rows and nothing lost;
* SIGTERM stops the agent gracefully (exit 0, summary printed); bad input exits clearly;
* a camera configuration written while the agent runs (``FleetResource``: rates, then a
  boost merged in) is in force without a restart: a later heartbeat reports its version and
  the boosted sampling.

Skips when the shared video/model are absent. Each scenario is bounded (``--max-frames``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from edge_agent.fsutil import file_sha256
from edge_agent.outbox import OutboxError, read_journal
from launch.localfleet import GatewayProcess, child_env

from .helpers import SHARED_DIR, require_shared

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
VIDEO = SHARED_DIR / "videos" / "cctv_street.mp4"
MODEL = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"
OUTAGE_S = float(os.environ.get("EDGE_E2E_OUTAGE_S", "5"))  # > 2 retries at 2 s max delay

require_shared(VIDEO, MODEL)


def _env(**extra: str) -> dict[str, str]:
    return child_env(OMP_NUM_THREADS="1", **extra)


class Gateway(GatewayProcess):
    """The real gateway process, plus what it stored (read from its database and files)."""

    # ---- what the gateway stored
    def frame_rows(self, camera_id: str) -> list[str]:
        db = self.home / "fleet" / "fleet.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT frame_id FROM frames WHERE camera_id = ?", (camera_id,))
            return [r[0] for r in rows]
        finally:
            conn.close()

    def sidecars(self, camera_id: str) -> dict[str, dict]:
        root = self.home / "frames" / camera_id
        return {
            p.stem: json.loads(p.read_text())
            for p in root.glob("*/*.json")
            if (p.with_suffix(".jpg")).is_file()
        }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(
        tmp_path_factory.mktemp("gw") / "home", env={"ROADLOOP_GATEWAY_ACCESS_TOKEN_TTL_S": "4"}
    ).start()
    yield gw
    gw.stop()


def _agent_cmd(
    gw_url: str, camera: str, state: Path, *extra: str, token: str | None = None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "edge_agent",
        "run",
        "--gateway",
        gw_url,
        "--camera-id",
        camera,
        "--source",
        str(VIDEO),
        "--model",
        str(MODEL),
        "--state-dir",
        str(state),
        "--threads",
        "1",
        "--heartbeat-interval",
        "1",
        "--retry-base",
        "0.2",
        "--retry-max-delay",
        "2",
        "--status-interval",
        "1",
    ]
    if token:
        cmd += ["--enroll-token", token]
    return cmd + list(extra)


def _run_agent(cmd: list[str], timeout: float = 180, **env: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )
    summary = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    return proc.returncode, summary, proc.stderr


def _spawn(cmd: list[str], where: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start the agent with stdout/stderr in files (a full pipe would block it)."""
    out, err = where / "agent.out", where / "agent.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fo, stderr=fe)
    return proc, out, err


def _summary(agent: subprocess.Popen, out: Path, err: Path) -> tuple[dict, str]:
    """A spawned agent that has exited 0: its JSON summary (last stdout line) and stderr."""
    log = err.read_text()
    assert agent.returncode == 0, log[-3000:]
    return json.loads(out.read_text().strip().splitlines()[-1]), log


def _assert_stored_exactly_once(gw: Gateway, camera: str, frame_ids: set[str]) -> dict[str, dict]:
    rows = gw.frame_rows(camera)
    assert len(rows) == len(set(rows)), "duplicate frame rows in the gateway"
    assert set(rows) == frame_ids
    sidecars = gw.sidecars(camera)
    assert set(sidecars) == frame_ids
    return sidecars


# ---------------------------------------------------------------- happy path
def test_enroll_stream_sample_store_and_heartbeat(gateway: Gateway, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    # Realtime pacing makes 150 frames of the 25 fps video last at least 6 s, so the 4 s
    # access token (refreshed 0.4 s before expiry) must be refreshed on the way, however
    # fast or slow the machine is. (80 frames, 3.2 s, refreshed only when startup was slow.)
    n_frames = 150
    cmd = _agent_cmd(
        gateway.url,
        "cam-e2e",
        state,
        "--max-frames",
        str(n_frames),
        "--realtime",
        "--base-rate",
        "1.0",
        "--hourly-budget",
        "0",
        token=gateway.enrollment_token(),
    )
    rc, summary, log = _run_agent(cmd)
    assert rc == 0, log[-3000:]
    assert summary["stopped_by"] == "max_frames" and summary["frames_processed"] == n_frames
    sampled = set(summary["sampled_frame_ids"])
    assert len(sampled) == summary["frames_sampled"] > 0
    assert summary["outbox_depth"] == 0 and summary["uploads_ok"] == len(sampled)
    assert "access token refreshed" in log

    sidecars = _assert_stored_exactly_once(gateway, "cam-e2e", sampled)
    sha = file_sha256(MODEL)
    for rec in sidecars.values():
        assert rec["model_version"] == sha and rec["camera_id"] == "cam-e2e"
        assert "base_rate" in rec["reasons"] and rec["importance"] >= 1.0
        assert rec["width"] == 640 and rec["height"] == 360
        assert rec["source_ref"].startswith("video:cctv_street.mp4#")
    assert any(rec["detections"] for rec in sidecars.values())
    det = next(d for rec in sidecars.values() for d in rec["detections"])
    assert set(det) >= {"class_id", "class_name", "confidence", "xyxy"}

    ident = state / "identity.json"
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    assert set(read_journal(state / "outbox").values()) == {"acked"}

    resp = httpx.get(
        f"{gateway.url}/v1/cameras/cam-e2e/heartbeats",
        params={"limit": 100},
        headers={"Authorization": f"Bearer {gateway.admin_token()}"},
    )
    assert resp.status_code == 200, resp.text
    beats = [h["payload"] for h in resp.json()]
    assert beats and all(b["schema_version"] == 2 and b["model_version"] == sha for b in beats)
    assert sum(b["frames_processed"] for b in beats) == n_frames
    assert any(b["class_counts"].get("car", 0) > 0 for b in beats)
    assert all(len(b["confidence_histogram"]["counts"]) == 10 for b in beats)

    # a restart reuses the saved identity: no enrollment token needed; this run measures
    # two frames at a time (--workers 2) and still counts every frame once
    cmd = _agent_cmd(gateway.url, "cam-e2e", state, "--max-frames", "12", "--no-realtime",
                     "--workers", "2")
    rc, again, log = _run_agent(cmd)
    assert rc == 0, log[-2000:]
    assert again["device_id"] == summary["device_id"]
    assert again["stopped_by"] == "max_frames" and again["frames_processed"] == 12


# ---------------------------------------------------------------- fault (a): gateway outage
def test_gateway_outage_then_back_loses_nothing(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw").start()
    state = tmp_path / "agent"
    try:
        enroll = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "enroll",
                "--gateway",
                gw.url,
                "--camera-id",
                "cam-outage",
                "--state-dir",
                str(state),
                "--enroll-token",
                gw.enrollment_token(),
            ],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enroll.returncode == 0, enroll.stderr
        gw.stop()  # the gateway goes away before the first frame

        cmd = _agent_cmd(
            gw.url,
            "cam-outage",
            state,
            "--max-frames",
            "20",
            "--no-realtime",
            "--base-rate",
            "1.0",
            "--hourly-budget",
            "0",
            "--drain-timeout",
            str(OUTAGE_S + 60),
        )
        agent, out_path, err_path = _spawn(cmd, tmp_path)
        try:
            deadline = time.monotonic() + 120
            queued: dict[str, str] = {}
            while time.monotonic() < deadline and len(queued) < 20:
                time.sleep(0.5)
                try:  # the agent may be creating its outbox right now
                    queued = read_journal(state / "outbox")
                except OutboxError:
                    queued = {}
                assert agent.poll() is None, err_path.read_text()[-3000:]
            assert len(queued) == 20 and set(queued.values()) == {"queued"}  # all waiting
            time.sleep(OUTAGE_S)
            assert agent.poll() is None  # still retrying, not given up
            gw.start()
            agent.wait(timeout=OUTAGE_S + 90)
        finally:
            if agent.poll() is None:
                agent.kill()
        summary, _ = _summary(agent, out_path, err_path)
        assert summary["upload_failures"] > 0 and summary["outbox_depth"] == 0
        sampled = set(summary["sampled_frame_ids"])
        assert len(sampled) == 20
        _assert_stored_exactly_once(gw, "cam-outage", sampled)
        assert set(read_journal(state / "outbox").values()) == {"acked"}
    finally:
        gw.stop()


# ---------------------------------------------------------------- fault (b): agent SIGKILL
def test_agent_sigkill_mid_upload_restart_has_no_duplicates(
    gateway: Gateway, tmp_path: Path
) -> None:
    state = tmp_path / "agent"
    cmd = _agent_cmd(
        gateway.url,
        "cam-kill",
        state,
        "--max-frames",
        "10",
        "--no-realtime",
        "--base-rate",
        "1.0",
        "--hourly-budget",
        "0",
        token=gateway.enrollment_token(),
    )
    rc, summary, log = _run_agent(cmd, EDGE_AGENT_FAULT_KILL_AFTER_ACKS="3")
    assert rc == -signal.SIGKILL, log[-2000:]
    assert summary is None  # killed: no summary
    before = read_journal(state / "outbox")
    acked_before = {f for f, s in before.items() if s == "acked"}
    assert len(acked_before) == 2  # the 3rd was stored by the gateway but never acked locally
    stored_before = set(gateway.frame_rows("cam-kill"))
    # 3 frames, or more when the 3rd came in a batch: the gateway stored the whole batch
    assert len(stored_before) >= 3 and acked_before < stored_before

    cmd = _agent_cmd(
        gateway.url,
        "cam-kill",
        state,
        "--max-frames",
        "3",
        "--no-realtime",
        "--base-rate",
        "1.0",
        "--hourly-budget",
        "0",
    )
    rc, summary, log = _run_agent(cmd)
    assert rc == 0, log[-3000:]
    assert summary["duplicates_absorbed"] >= 1  # the 409 of the frame stored before the kill
    after = read_journal(state / "outbox")
    assert set(before) <= set(after)  # nothing the first run queued was forgotten
    assert set(after.values()) <= {"acked", "duplicate"} and "duplicate" in after.values()
    _assert_stored_exactly_once(gateway, "cam-kill", set(after))


# ---------------------------------------------------------------- signals and bad input
def test_sigterm_stops_gracefully(gateway: Gateway, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    cmd = _agent_cmd(
        gateway.url,
        "cam-term",
        state,
        "--realtime",
        "--loop",
        "--max-fps",
        "8",
        "--base-rate",
        "1.0",
        "--hourly-budget",
        "0",
        token=gateway.enrollment_token(),
    )
    agent, out_path, err_path = _spawn(cmd, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            assert agent.poll() is None, err_path.read_text()[-3000:]
            try:  # the agent may be creating its outbox right now
                uploaded = "acked" in read_journal(state / "outbox").values()
            except OutboxError:
                uploaded = False
            if uploaded and "fps | frames" in err_path.read_text():  # status line printed
                break
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    summary, err = _summary(agent, out_path, err_path)
    assert summary["stopped_by"] == "signal" and summary["frames_processed"] > 0
    assert "SIGTERM received" in err


def test_bad_input_exits_with_a_clear_message(gateway: Gateway, tmp_path: Path) -> None:
    rc, _, err = _run_agent(
        _agent_cmd(gateway.url, "cam-bad", tmp_path / "a", "--no-realtime", token="not-a-token")
    )
    assert rc == 1 and "enrollment refused" in err
    cmd = _agent_cmd(gateway.url, "cam-bad", tmp_path / "b", token="x")
    cmd[cmd.index("--model") + 1] = str(tmp_path / "missing.onnx")
    rc, _, err = _run_agent(cmd)
    assert rc == 2 and "missing.onnx" in err
    cmd = _agent_cmd(gateway.url, "cam-bad", tmp_path / "c", token="x")
    cmd[cmd.index("--source") + 1] = str(tmp_path / "nope.mp4")
    rc, _, err = _run_agent(cmd)
    assert rc == 2 and "nope.mp4" in err
    rc, _, err = _run_agent(_agent_cmd(gateway.url, "cam-bad", tmp_path / "d"))
    assert rc == 1 and "--enroll-token" in err


# ---------------------------------------------------------------- camera configuration
def test_camera_config_reaches_a_running_agent(gateway: Gateway, tmp_path: Path) -> None:
    """The platform changes a running camera's sampling through the gateway; the agent picks
    it up after a heartbeat, puts it in force without a restart and reports it. The deadline
    is generous: the assertion is on what the heartbeats say, not on how fast."""
    from resources.fleet_resource import FleetResource

    camera, state = "cam-config", tmp_path / "agent"
    admin = gateway.admin_token()
    fleet = FleetResource(gateway_url=gateway.url, admin_token=admin)
    cmd = _agent_cmd(gateway.url, camera, state, "--realtime", "--loop", "--max-fps", "8",
                     "--base-rate", "0.01",
                     "--hourly-budget", "360", token=gateway.enrollment_token())
    agent, out_path, err_path = _spawn(cmd, tmp_path)

    def heartbeat_where(ok: Callable[[dict], bool], what: str) -> dict:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            assert agent.poll() is None, err_path.read_text()[-3000:]
            resp = httpx.get(f"{gateway.url}/v1/cameras/{camera}/heartbeats",
                             params={"limit": 5}, headers={"Authorization": f"Bearer {admin}"})
            assert resp.status_code == 200, resp.text
            found = [h["payload"] for h in resp.json() if ok(h["payload"])]
            if found:
                return found[-1]
            time.sleep(0.5)
        pytest.fail(f"no heartbeat {what} in time; agent log:\n{err_path.read_text()[-3000:]}")

    try:
        first = heartbeat_where(lambda b: True, "at all")
        assert (first["config_version"], first["config_error"]) == (0, None)
        assert (first["sampling_base_rate"], first["sampling_hourly_budget"]) == (0.01, 360.0)

        rates = fleet.put_camera_config(camera, {"sampling": {"base_rate": 0.05,
                                                              "hourly_budget": 720},
                                                 "notes": "e2e"}, 0, "e2e: camera rates")
        assert rates["version"] == 1
        until = datetime.now(UTC) + timedelta(hours=1)  # the agent's clock is the wall clock
        boosted = fleet.boost_sampling(camera, 4.0, until, "e2e: drift")
        assert boosted["version"] == 2 and boosted["config"]["notes"] == "e2e"
        assert boosted["config"]["sampling"]["base_rate"] == 0.05  # merged, not replaced

        hb = heartbeat_where(lambda b: b.get("config_version") == 2, "with config version 2")
        assert hb["config_error"] is None
        assert hb["sampling_base_rate"] == pytest.approx(0.2)
        assert hb["sampling_hourly_budget"] == pytest.approx(2880.0)
        reported = datetime.fromisoformat(hb["sampling_boost_until"])
        assert abs((reported - until).total_seconds()) < 0.01
        kept = json.loads((state / "camera_config.json").read_text())
        assert kept["version"] == 2 and kept["config"] == boosted["config"]
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    summary, log = _summary(agent, out_path, err_path)
    assert summary["stopped_by"] == "signal"
    assert "camera configuration version 2 in force" in log
