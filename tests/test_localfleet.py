"""``LocalFleet`` (what ``roadloop demo`` runs): a real gateway and a real agent on loopback."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from launch.localfleet import GatewayProcess, GatewayStartError, LocalFleet, free_port

from .helpers import SHARED_DIR, needs_shared

VIDEO = SHARED_DIR / "videos" / "cctv_street.mp4"
MODEL = SHARED_DIR / "models" / "atl_v2_yolo11n_320.onnx"


@needs_shared(VIDEO, MODEL)
def test_local_fleet_runs_an_agent_to_completion(tmp_path: Path) -> None:
    with LocalFleet(tmp_path / "home", free_port()) as fleet:
        fleet.start_gateway()
        token_file = fleet.write_admin_token()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        admin = token_file.read_text().strip()
        fleet.start_agent("cam-lf", VIDEO, MODEL, ["--max-frames", "12", "--no-realtime",
                                                    "--heartbeat-interval", "1", "--threads", "1"])
        codes = fleet.wait_agents(timeout_s=120)
        assert codes == {"cam-lf": 0}, (tmp_path / "home" / "logs" / "agent-cam-lf.log").read_text()
        beat = fleet.latest_heartbeat("cam-lf", admin)
        assert beat is not None and beat["camera_id"] == "cam-lf"
        assert (tmp_path / "home" / "agents" / "cam-lf" / "identity.json").is_file()
        gateway = fleet.gateway
        assert gateway is not None and gateway.running
    assert not gateway.running  # leaving the block stops the gateway


def test_gateway_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A bad setting makes the server exit at start-up: the error carries its log."""
    gateway = GatewayProcess(tmp_path / "home", env={"ROADLOOP_GATEWAY_RATE_LIMIT_PER_S": "nope"})
    with pytest.raises(GatewayStartError, match="gateway exited") as err:
        gateway.start(timeout_s=60)
    assert "RATE_LIMIT" in str(err.value) or "rate_limit" in str(err.value)
    assert not gateway.running
