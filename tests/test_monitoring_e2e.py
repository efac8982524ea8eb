"""Monitoring for real: Debian's ``prometheus``, ``promtool`` and ``prometheus-alertmanager``.

``promtool`` checks and unit-tests deploy/prometheus/; then one test starts a gateway, a real
Prometheus (loopback, temp dir, 1 s scrape and evaluation) scraping it and an agent metrics
endpoint, and a real Alertmanager whose webhook receiver is a tiny HTTP server here. A camera
heartbeats once and goes silent; the production ``CameraSilent`` rule, rendered with a 2 s
threshold instead of 300 s, fires and the webhook receives it. Skipped when the binaries are
absent (``make install`` installs them best-effort).
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from edge_agent.heartbeat import TelemetryWindow
from edge_agent.metrics import MetricsServer
from launch.localfleet import GatewayProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "prometheus"
BINARIES = ("prometheus", "promtool", "prometheus-alertmanager", "amtool")

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in BINARIES),
    reason="Prometheus binaries not installed (apt-get install prometheus "
    "prometheus-alertmanager; make install tries)",
)


def run(*cmd: str, cwd: Path = DEPLOY) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_promtool_and_amtool_accept_the_deploy_files() -> None:
    assert "SUCCESS: 12 rules found" in run("promtool", "check", "rules", "rules.yml")
    run("promtool", "check", "config", "prometheus.yml")
    run("amtool", "check-config", "alertmanager.yml")
    # The thresholds themselves: synthetic series -> expected alerts (rules_test.yml).
    assert "SUCCESS" in run("promtool", "test", "rules", "rules_test.yml")


class Webhook:
    """Alertmanager's webhook receiver: each POST body (JSON) goes into ``received``."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.put(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Service:
    """A child process with its log in a file; stopped with SIGTERM then SIGKILL."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def wait_for(what: str, probe: Any, timeout_s: float, *logs: Service) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = probe()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen in {timeout_s} s\n" +
                         "\n".join(f"--- {s.log.name}\n{s.tail()}" for s in logs))


def test_rules_for_the_e2e_render() -> None:
    """The rendering below changes the production rule (and nothing else)."""
    rules = render_rules(yaml.safe_load((DEPLOY / "rules.yml").read_text()))
    silent = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "CameraSilent"]
    assert silent[0]["expr"].endswith("> 2") and silent[0]["for"] == "0s"


def render_rules(rules: dict[str, Any]) -> dict[str, Any]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "CameraSilent":
                assert rule["expr"].rstrip().endswith("> 300"), rule["expr"]
                rule["expr"] = rule["expr"].rstrip()[: -len("300")] + "2"
                rule["for"] = "0s"
    return rules


@pytest.fixture()
def services(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.stop()


@pytest.mark.e2e
def test_prometheus_scrapes_and_a_silent_camera_reaches_the_webhook(
    tmp_path: Path, services: list[Service]
) -> None:
    webhook = Webhook()
    # A stand-in agent's metrics endpoint (edge_agent.metrics over a real TelemetryWindow).
    telemetry = TelemetryWindow("cam-m", "m1", ["car"])
    telemetry.record_frame(latency_ms=50.0, inference_ms=42.0, class_counts={"car": 1},
                           confidences=[0.9], brightness=0.5, sharpness=100.0, occupancy=0.1,
                           density_state="normal")
    agent = SimpleNamespace(config=SimpleNamespace(camera_id="cam-m"), telemetry=telemetry)
    agent_metrics = MetricsServer(agent, 0)
    try:
        with GatewayProcess(tmp_path / "home") as gateway:
            token = gateway.enrollment_token("cam-m")
            r = httpx.post(f"{gateway.url}/v1/enroll", json={
                "enrollment_token": token, "camera_id": "cam-m", "agent_version": "0.1.0",
                "hardware": {"cpu": "test"}})
            assert r.status_code == 201, r.text
            access = r.json()["access_token"]
            r = httpx.post(f"{gateway.url}/v1/heartbeats", headers={
                "Authorization": f"Bearer {access}"}, json={
                "schema_version": 1, "camera_id": "cam-m",
                "sent_at": datetime.now(UTC).isoformat(), "model_version": "m1", "fps": 9.0,
                "latency_p95_ms": 80.0})
            assert r.status_code == 202, r.text

            am_port, am_cluster, prom_port = free_port(), free_port(), free_port()
            am_dir = tmp_path / "alertmanager"
            am_dir.mkdir()
            am_config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
            am_config["receivers"][0]["webhook_configs"][0]["url"] = webhook.url
            am_config["route"].update(group_wait="0s", group_interval="1s")
            (am_dir / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
            services.append(Service([
                "prometheus-alertmanager", f"--config.file={am_dir / 'alertmanager.yml'}",
                f"--storage.path={am_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                f"--cluster.listen-address=127.0.0.1:{am_cluster}",
            ], tmp_path / "alertmanager.log"))

            prom_dir = tmp_path / "prometheus"
            prom_dir.mkdir()
            (prom_dir / "rules.yml").write_text(yaml.safe_dump(
                render_rules(yaml.safe_load((DEPLOY / "rules.yml").read_text()))))
            config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
            config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
                f"127.0.0.1:{am_port}"]
            jobs = {j["job_name"]: j for j in config["scrape_configs"]}
            jobs["roadloop-gateway"]["static_configs"][0]["targets"] = [
                f"127.0.0.1:{gateway.port}"]
            jobs["roadloop-agent"]["static_configs"][0]["targets"] = [
                f"127.0.0.1:{agent_metrics.port}"]
            (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
            prometheus = Service([
                "prometheus", f"--config.file={prom_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ], tmp_path / "prometheus.log")
            services.append(prometheus)
            api = f"http://127.0.0.1:{prom_port}/api/v1"

            def query(expr: str) -> list[dict[str, Any]]:
                r = httpx.get(f"{api}/query", params={"query": expr}, timeout=2)
                if r.status_code != 200:  # 503 "Service Unavailable" until the TSDB is up
                    return []
                body = r.json()
                return body["data"]["result"] if body.get("status") == "success" else []

            # Prometheus answers 503 on its API until it has opened its storage.
            wait_for("Prometheus ready",
                     lambda: httpx.get(f"http://127.0.0.1:{prom_port}/-/ready",
                                       timeout=2).status_code == 200, 20, prometheus)

            fps = wait_for("the gateway's cam-m fps in Prometheus",
                           lambda: query('roadloop_camera_fps{camera_id="cam-m"}'), 20,
                           prometheus)
            assert float(fps[0]["value"][1]) == 9.0
            assert fps[0]["metric"]["job"] == "roadloop-gateway"
            hb = query('roadloop_gateway_requests_total{route="/v1/heartbeats",status="202"}')
            assert float(hb[0]["value"][1]) == 1.0
            agent_hist = wait_for(
                "the agent's latency histogram in Prometheus",
                lambda: query('roadloop_agent_detector_latency_seconds_count{camera_id="cam-m"}'),
                10, prometheus)
            assert float(agent_hist[0]["value"][1]) == 1.0

            # No second heartbeat: the camera is silent, the rendered rule fires (> 2 s).
            def camera_silent() -> dict[str, Any] | None:
                try:
                    msg = webhook.received.get(timeout=0.5)
                except queue.Empty:
                    return None
                alerts = [a for a in msg["alerts"] if a["labels"]["alertname"] == "CameraSilent"]
                return alerts[0] if alerts else None

            alert = wait_for("CameraSilent at the Alertmanager webhook", camera_silent, 25,
                             prometheus, services[0])
            assert alert["status"] == "firing"
            assert alert["labels"]["camera_id"] == "cam-m"
            assert alert["labels"]["severity"] == "critical"
            assert "no heartbeat for" in alert["annotations"]["summary"]
    finally:
        agent_metrics.close()
        webhook.close()
