"""A real Flower deployment on loopback: one SuperLink, one SuperNode per site, as processes.

The SuperLink runs with SuperNode authentication on, which in Flower 1.42 requires TLS: a
throwaway CA and a server certificate for 127.0.0.1/localhost are written under the work
directory, and each site gets its own EC (P-384) key pair, registered through the Control
API (``flwr supernode register``) before its SuperNode starts. A SuperNode whose key was
not registered is refused at activation and exits.

Everything Flower reads or writes lives under ``work_dir`` (``FLWR_HOME`` per process, the
SuperLink's sqlite state, certificates, keys, process logs); nothing touches ``~/.flwr``.
Apps run with their dependencies already installed (runtime ``uv sync`` is disabled): the
ServerApp and ClientApps are subprocesses of the SuperLink/SuperNodes, with this process's
environment (plus ``extra_env``), so ``PYTHONPATH`` decides which ``roadloop`` they import.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, Self

import psutil
from pydantic import BaseModel

from roadloop.errors import RoadloopError
from roadloop.federation.flower_config import (
    ConfigValue,
    InvalidConfigError,
    format_run_config,
)
from roadloop.federation.models import SiteSpec
from roadloop.federation.pki import NodeKeys, TlsFiles, write_node_keys, write_tls_files

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

RunStatus = Literal["completed", "failed", "stopped"]

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_STOP_GRACE_S = 10.0


class DeploymentError(RoadloopError):
    """The deployment could not start, a command failed, or a run did not finish in time."""


class RunOutcome(BaseModel):
    """What ``flwr`` reported about one finished run."""

    run_id: int
    status: RunStatus
    status_text: str  # Flower's own, e.g. "finished:completed"
    status_details: str = ""
    log: str  # the run's ServerApp log (``flwr log --show``)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "completed"


# --- processes -------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self, chars: int = 4000) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return text[-chars:]


def _stop_tree(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a process and every descendant (detached ones included), SIGKILL leftovers."""
    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class _Node:
    site: SiteSpec
    keys: NodeKeys
    port: int
    work_dir: Path
    node_id: int | None = None
    process: _Process | None = None


@dataclass
class LocalFederation:
    """SuperLink + one SuperNode per site on loopback; use as a context manager.

    ``bin_dir`` holds ``flower-superlink``, ``flower-supernode``, ``flwr`` and the
    ``flower-superexec``/``flwr-serverapp``/``flwr-clientapp`` they spawn (it is put first
    on their ``PATH``); its Python must be able to import the app being run. ``node_auth``
    needs ``tls`` (Flower 1.42 refuses SuperNode authentication over plain HTTP).
    """

    work_dir: Path
    sites: Sequence[SiteSpec]
    node_auth: bool = True
    tls: bool = True
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    command_timeout_s: float = 120.0
    # Extra node-config keys per site name (e.g. a red-team ``attack`` for drills).
    node_overrides: Mapping[str, Mapping[str, ConfigValue]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"site names must be unique, got {names}")
        if self.node_auth and not self.tls:
            raise InvalidConfigError("SuperNode authentication needs TLS in Flower 1.42")
        unknown = sorted(set(self.node_overrides) - set(names))
        if unknown:
            raise InvalidConfigError(f"node overrides for unknown sites {unknown}")
        self.logs_dir = self.work_dir / "logs"
        self.port: int | None = None
        self.tls_files: TlsFiles | None = None
        self._superlink: _Process | None = None
        self._nodes: dict[str, _Node] = {}
        self._extra_processes: list[_Process] = []
        self._control: ControlHttpClient | None = None  # made at the first status poll

    # -- public API ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        if self.port is None:
            raise DeploymentError("the SuperLink is not started")
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> float:
        """Start SuperLink and SuperNodes; return once every site is online (seconds taken)."""
        if self._superlink is not None:
            raise DeploymentError("this federation is already started")
        started = time.monotonic()
        deadline = started + timeout_s
        try:
            self._start_superlink(deadline)
            for site in self.sites:
                node = self._prepare_node(site)
                if self.node_auth:
                    node.node_id = self.register_key(node.keys.public_key)
                self._nodes[site.name] = node
                node.process = self._spawn_supernode(site.name, node)
            self._wait_nodes_online(deadline)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def register_key(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink; its node id."""
        out = self._flwr(["supernode", "register", str(public_key), "--format", "json"])
        return int(_json_from(out)["node-id"])

    def list_nodes(self) -> list[dict]:
        """The SuperLink's node table (``flwr supernode list``): node-id, status, ..."""
        return list(_json_from(self._flwr(["supernode", "list", "--format", "json"]))["nodes"])

    def node_ids(self) -> dict[str, int | None]:
        """Each site's SuperNode id (None without node auth: nodes self-register)."""
        return {name: node.node_id for name, node in self._nodes.items()}

    def process_ids(self) -> set[int]:
        """Every live process of the deployment: the ones started here and their children."""
        pids: set[int] = set()
        for process in self._processes():
            try:
                root = psutil.Process(process.popen.pid)
                pids.add(root.pid)
                pids.update(child.pid for child in root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return pids

    def start_unregistered_node(
        self, site: SiteSpec, timeout_s: float = 60.0
    ) -> tuple[int | None, str]:
        """Start a SuperNode whose key was never registered; wait for it to exit.

        Returns its exit code (None if it was still running at the timeout, then it is
        stopped) and its log. With node auth on, the SuperLink refuses it at activation.
        """
        node = self._prepare_node(site)
        process = self._spawn_supernode(f"unregistered-{site.name}", node)
        self._extra_processes.append(process)
        try:
            code = process.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
            _stop_tree(process.popen, _STOP_GRACE_S)
        return code, process.log_tail(20_000)

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout_s: float = 600.0,
        poll_s: float = 1.0,
    ) -> RunOutcome:
        """``flwr run`` the app, wait until Flower reports the run finished, fetch its log.

        Every ``run_config`` key must be declared in the app's ``[tool.flwr.app.config]``
        (Flower refuses unknown keys). A run still going at ``timeout_s`` is stopped.
        """
        if self._superlink is None:
            raise DeploymentError("start() the federation before run()")
        app_dir = Path(app_dir).resolve()
        if not (app_dir / "pyproject.toml").is_file():
            raise DeploymentError(f"{app_dir} has no pyproject.toml: not a Flower app")
        started = time.monotonic()
        args = ["run", str(app_dir), "--format", "json"]
        if run_config:
            args += ["--run-config", format_run_config(run_config)]
        reply = _json_from(self._flwr(args))
        if not reply.get("success") or reply.get("run-id") is None:
            raise DeploymentError(f"flwr run did not start a run: {reply}")
        run_id = int(reply["run-id"])
        deadline = started + timeout_s
        while True:
            self._check_alive()
            row = self._run_row(run_id)
            status_text = str(row["status"])
            if status_text.startswith("finished"):
                break
            if time.monotonic() > deadline:
                self._flwr(["stop", str(run_id)], check=False)
                raise DeploymentError(
                    f"run {run_id} still {status_text!r} after {timeout_s:.0f} s; stopped it"
                )
            time.sleep(poll_s)
        sub_status = status_text.rsplit(":", 1)[-1]
        status: RunStatus = sub_status if sub_status in ("completed", "stopped") else "failed"
        log_text = _ANSI_ESCAPE.sub("", self._flwr(["log", str(run_id), "--show"], check=False))
        return RunOutcome(
            run_id=run_id,
            status=status,
            status_text=status_text,
            status_details=str(row.get("status-details") or ""),
            log=log_text,
            seconds=time.monotonic() - started,
        )

    def stop(self) -> None:
        """Stop every process this federation started (SuperNodes first), always."""
        if self._control is not None:
            self._control.close()
            self._control = None
        for process in self._processes():
            try:
                _stop_tree(process.popen, _STOP_GRACE_S)
            finally:
                process.log_file.close()
        for node in self._nodes.values():
            node.process = None
        self._extra_processes = []
        self._superlink = None

    # -- internals ----------------------------------------------------------------------

    def _processes(self) -> list[_Process]:
        """Started processes in stopping order: SuperNodes, then the SuperLink."""
        processes = [n.process for n in self._nodes.values() if n.process is not None]
        processes += self._extra_processes
        if self._superlink is not None:
            processes.append(self._superlink)
        return processes

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.work_dir / "flwr_home" / name)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        env["COLUMNS"] = "200"
        return env

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        log_file = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                argv,
                cwd=self.work_dir,
                env=self._env(name),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            log_file.close()
            raise
        return _Process(name=name, popen=popen, log_path=log_path, log_file=log_file)

    def _start_superlink(self, deadline: float) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            str(self.bin_dir / "flower-superlink"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--database", str(self.work_dir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            self.tls_files = write_tls_files(self.work_dir / "tls")
            argv += [
                "--ssl-ca-certfile", str(self.tls_files.ca_cert),
                "--ssl-certfile", str(self.tls_files.server_cert),
                "--ssl-keyfile", str(self.tls_files.server_key),
            ]
        else:
            argv.append("--insecure")
        if self.node_auth:
            argv.append("--enable-supernode-auth")
        self._write_cli_config()
        self._superlink = self._spawn("superlink", argv)
        # Ready when the HTTP API answers its health check (cheap to poll, unlike `flwr`).
        while not self._superlink_healthy():
            self._check_alive()
            if time.monotonic() > deadline:
                raise DeploymentError(
                    "SuperLink did not answer in time:\n" + self._superlink.log_tail()
                )
            time.sleep(0.1)

    def _superlink_healthy(self) -> bool:
        scheme = "https" if self.tls_files is not None else "http"
        context = None
        if self.tls_files is not None:
            context = ssl.create_default_context(cafile=str(self.tls_files.ca_cert))
        try:
            with urllib.request.urlopen(
                f"{scheme}://{self.address}/health", timeout=2, context=context
            ) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _write_cli_config(self) -> None:
        home = self.work_dir / "flwr_home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]"]
        lines.append(f'address = "{self.address}"')
        if self.tls_files is not None:
            lines.append(f"root-certificates = {json.dumps(str(self.tls_files.ca_cert))}")
        else:
            lines.append("insecure = true")
        (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _prepare_node(self, site: SiteSpec) -> _Node:
        work_dir = self.work_dir / "nodes" / site.name
        work_dir.mkdir(parents=True, exist_ok=True)
        keys = write_node_keys(self.work_dir / "keys", site.name)
        return _Node(site=site, keys=keys, port=free_port(), work_dir=work_dir)

    def _spawn_supernode(self, name: str, node: _Node) -> _Process:
        node_config = format_run_config(
            {
                "site": node.site.name,
                "data-yaml": str(node.site.data_yaml),
                "frames": node.site.frames,
                "quality": float(node.site.quality),
                "work-dir": str(node.work_dir),
                **self.node_overrides.get(node.site.name, {}),
            }
        )
        argv = [
            str(self.bin_dir / "flower-supernode"),
            "--superlink", self.address,
            "--host", "127.0.0.1",
            "--port", str(node.port),
            "--node-config", node_config,
        ]
        if self.tls_files is not None:  # without node auth the node self-registers this key
            argv += [
                "--root-certificates", str(self.tls_files.ca_cert),
                "--auth-supernode-private-key", str(node.keys.private_key),
            ]
        else:
            argv.append("--insecure")
        return self._spawn(f"supernode-{name}", argv)

    def _wait_nodes_online(self, deadline: float) -> None:
        while True:
            self._check_alive()
            rows = self.list_nodes()
            online = {int(row["node-id"]) for row in rows if row.get("status") == "online"}
            if self.node_auth:
                missing = [n for n, node in self._nodes.items() if node.node_id not in online]
            else:  # self-registered nodes: which id is which site is not known here
                missing = ["?"] * max(0, len(self._nodes) - len(online))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNodes not online in time: {missing}; nodes: {rows}")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        processes = [("superlink", self._superlink)]
        processes += [(name, node.process) for name, node in self._nodes.items()]
        for name, process in processes:
            if process is not None and process.popen.poll() is not None:
                raise DeploymentError(
                    f"{name} exited with code {process.popen.returncode}:\n"
                    + process.log_tail()
                )

    def _run_row(self, run_id: int) -> dict:
        """The run's row as ``flwr ls --run-id`` reports it: run-id, status, status-details.

        Asked of the SuperLink's Control API in this process, through Flower's own client:
        the poll runs every second for the whole run, and each ``flwr ls`` is a fresh
        interpreter (about 1.5 s of CPU) competing with the sites' training for the cores.
        """
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

        try:
            reply = self._control_client().ListRuns(ListRunsRequest(run_id=run_id))
        except Exception as exc:  # an HTTP or protocol error from the Control API
            raise DeploymentError(f"the Control API cannot list run {run_id}: {exc}") from exc
        if run_id not in reply.run_dict:
            raise DeploymentError(f"the Control API does not know run {run_id}")
        run = run_from_proto(reply.run_dict[run_id])
        status = run.status.status
        if run.status.sub_status:
            status = f"{status}:{run.status.sub_status}"
        return {"run-id": run.run_id, "status": status, "status-details": run.status.details}

    def _control_client(self) -> ControlHttpClient:
        """One Control API client for this SuperLink, as the ``flwr`` CLI builds it
        (client and runtime-version headers), without account login: none is configured."""
        if self._control is None:
            from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors.http.runtime_version import (
                RuntimeVersionHttpInterceptor,
            )

            self._control = ControlHttpClient.from_server_address(
                server_address=self.address,
                insecure=self.tls_files is None,
                root_certificates=(self.tls_files.ca_cert.read_bytes()
                                   if self.tls_files is not None else None),
                interceptors=[CliClientHttpInterceptor(),
                              RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
            )
        return self._control

    def _flwr(self, args: list[str], check: bool = True) -> str:
        """Run the ``flwr`` CLI against this SuperLink; its stdout."""
        argv = [str(self.bin_dir / "flwr"), *args]
        try:
            result = subprocess.run(
                argv,
                check=False,
                cwd=self.work_dir,
                env=self._env("cli"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.command_timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"{' '.join(argv)} timed out") from exc
        if check and result.returncode != 0:
            raise DeploymentError(
                f"{' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        return result.stdout


def _json_or_none(text: str) -> dict | None:
    """The JSON object ``flwr --format json`` prints (after any human-readable lines)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def _json_from(text: str) -> dict:
    value = _json_or_none(text)
    if value is None or value.get("success") is False:
        raise DeploymentError(f"flwr did not answer with JSON success: {text[-2000:]}")
    return value
