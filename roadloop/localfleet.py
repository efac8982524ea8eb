"""A local fleet for the demo: the real gateway process and real edge-agent processes.

Everything is started the way an operator would start it — ``python -m fleet serve``,
``python -m fleet token create``, ``python -m edge_agent run`` — on loopback, with the agents'
state under ``<home>/agents/<camera_id>``. Used by ``roadloop demo``; framework-free.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


@dataclass
class AgentProcess:
    camera_id: str
    source: Path
    process: subprocess.Popen
    log_path: Path


@dataclass
class LocalFleet:
    home: Path
    port: int
    python: str = sys.executable
    agents: list[AgentProcess] = field(default_factory=list)
    gateway: subprocess.Popen | None = None
    gateway_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ROADLOOP_HOME"] = str(self.home)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start_gateway(self, timeout_s: float = 60.0) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / "gateway.log").open("ab")
        self.gateway = subprocess.Popen(
            [self.python, "-m", "fleet", "serve", "--port", str(self.port), "--home", str(self.home)],
            stdout=out, stderr=subprocess.STDOUT, env={**self._env(), **self.gateway_env},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.gateway.returncode}; see {logs / 'gateway.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    log.info("fleet gateway up at %s", self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"gateway did not answer on {self.url} within {timeout_s:.0f} s")

    def enrollment_token(self, camera_id: str) -> str:
        result = subprocess.run(
            [self.python, "-m", "fleet", "token", "create", "--camera-id", camera_id, "--home", str(self.home)],
            capture_output=True, text=True, env=self._env(), check=True,
        )
        return result.stdout.strip().splitlines()[-1]

    def admin_token(self) -> str:
        result = subprocess.run(
            [self.python, "-m", "fleet", "admin-token", "create", "--home", str(self.home)],
            capture_output=True, text=True, env=self._env(), check=True,
        )
        return result.stdout.strip().splitlines()[-1]

    def write_admin_token(self) -> Path:
        """An operator token for the platform's FleetResource, at ``<home>/fleet/admin-token``."""
        path = self.home / "fleet" / "admin-token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(self.admin_token() + "\n")
            tmp.chmod(0o600)
            os.replace(tmp, path)
        return path

    def latest_heartbeat(self, camera_id: str, admin_token: str) -> dict | None:
        rows = httpx.get(
            f"{self.url}/v1/cameras/{camera_id}/heartbeats", params={"limit": 1},
            headers={"Authorization": f"Bearer {admin_token}"}, timeout=10,
        ).json()
        return rows[-1]["payload"] if rows else None

    def start_agent(self, camera_id: str, source: Path, model: Path, extra_args: list[str] = ()) -> AgentProcess:
        state = self.home / "agents" / camera_id
        state.mkdir(parents=True, exist_ok=True)
        args = [
            self.python, "-m", "edge_agent", "run", "--gateway", self.url, "--camera-id", camera_id,
            "--source", str(source), "--model", str(model), "--state-dir", str(state), *extra_args,
        ]
        if not (state / "identity.json").exists():
            args.append(f"--enroll-token={self.enrollment_token(camera_id)}")
        log_path = self.home / "logs" / f"agent-{camera_id}.log"
        out = log_path.open("ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self._env())
        agent = AgentProcess(camera_id, source, proc, log_path)
        self.agents.append(agent)
        log.info("agent %s streaming %s", camera_id, source.name)
        return agent

    def wait_agents(self, timeout_s: float = 600.0) -> dict[str, int]:
        """Wait for agents that stop by themselves (``--max-frames``); returns exit codes."""
        codes: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        for agent in self.agents:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                codes[agent.camera_id] = agent.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                agent.process.send_signal(signal.SIGTERM)
                codes[agent.camera_id] = agent.process.wait(timeout=30)
        self.agents = [a for a in self.agents if a.process.poll() is None]
        return codes

    def stop_agents(self) -> None:
        for agent in self.agents:
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.process.kill()
        self.agents = []

    def stop(self) -> None:
        self.stop_agents()
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
        self.gateway = None

    def __enter__(self) -> "LocalFleet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
