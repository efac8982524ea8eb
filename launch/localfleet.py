"""A local fleet: the real gateway process and real edge-agent processes on loopback.

Everything is started the way an operator would start it — ``python -m fleet serve``,
``python -m fleet token create``, ``python -m edge_agent run`` — with the agents' state under
``<home>/agents/<camera_id>``. :class:`GatewayProcess` is the one way this repository starts
a gateway child process (demo, end-to-end tests, benchmarks); :class:`LocalFleet` adds the
demo's agents. Framework-free.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from roadloop.fsutil import write_text_atomic

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, unbuffered, with ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


class GatewayStartError(RuntimeError):
    """The gateway process exited or did not answer ``/healthz`` in time (log tail attached)."""


@dataclass
class GatewayProcess:
    """``python -m fleet serve`` as a child process; it can be stopped and started again.

    ``env`` is layered over this process's environment for the server and its admin CLI
    calls; the log (appended across restarts) defaults to ``<home>/logs/gateway.log``.
    """

    home: Path
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.log_path = self.log_path or self.home / "logs" / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def start(self, timeout_s: float = 90.0) -> GatewayProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "-m", "fleet", "serve", "--port", str(self.port),
               "--home", str(self.home), *self.extra_args]
        with open(self.log_path, "ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                            env=child_env(ROADLOOP_HOME=str(self.home), **self.env))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayStartError(
                    f"gateway exited with {self.process.returncode}; {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    log.info("fleet gateway up at %s", self.url)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise GatewayStartError(
            f"gateway did not answer on {self.url} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (uvicorn finishes in-flight requests), SIGKILL if it does not exit."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def cli(self, *args: str) -> str:
        """``python -m fleet ARGS --home HOME``; returns the last line it printed."""
        result = subprocess.run(
            [self.python, "-m", "fleet", *args, "--home", str(self.home)],
            capture_output=True, text=True, timeout=120, check=False,
            env=child_env(ROADLOOP_HOME=str(self.home), **self.env),
        )
        if result.returncode != 0:
            raise RuntimeError(f"fleet {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr[-2000:]}")
        return result.stdout.strip().splitlines()[-1]

    def enrollment_token(self, camera_id: str | None = None) -> str:
        return self.cli("token", "create", *(["--camera-id", camera_id] if camera_id else []))

    def admin_token(self) -> str:
        return self.cli("admin-token", "create")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    gateway_env: dict[str, str] = field(default_factory=dict)
    gateway: GatewayProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        return child_env(ROADLOOP_HOME=str(self.home))

    def start_gateway(self, timeout_s: float = 60.0) -> None:
        self.gateway = GatewayProcess(self.home, self.port, env=self.gateway_env, python=self.python)
        self.gateway.start(timeout_s)

    def _admin_cli(self) -> GatewayProcess:
        return self.gateway or GatewayProcess(self.home, self.port, env=self.gateway_env,
                                              python=self.python)

    def enrollment_token(self, camera_id: str) -> str:
        return self._admin_cli().enrollment_token(camera_id)

    def admin_token(self) -> str:
        return self._admin_cli().admin_token()

    def write_admin_token(self) -> Path:
        """An operator token for the platform's FleetResource, at ``<home>/fleet/admin-token``."""
        path = self.home / "fleet" / "admin-token"
        if not path.exists():
            write_text_atomic(path, self.admin_token() + "\n", parents=True, mode=0o600)
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

    def wait_agents(
        self, timeout_s: float = 600.0, agents: list[AgentProcess] | None = None
    ) -> dict[str, int]:
        """Wait for agents that stop by themselves (``--max-frames``): all of them, or only
        ``agents`` (others, e.g. a looping camera, keep running); returns exit codes."""
        codes: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        for agent in self.agents if agents is None else agents:
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
        if self.gateway is not None:
            self.gateway.stop()
        self.gateway = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
