"""The ``roadloop`` command line.

Orchestration commands (``demo``, ``serve``) import Dagster lazily, and the gateway and
annotate commands load their modules only when they run: ``roadloop settings`` imports
neither Dagster nor FastAPI nor FiftyOne.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import click
import typer

from roadloop.cli_errors import UserErrorGroup
from roadloop.settings import PROJECT_ROOT, Settings, get_settings


class _LazyCommands(UserErrorGroup):
    """Sub-commands whose modules load only when that command runs (or help lists them):
    ``roadloop settings`` must not import FastAPI, SQLAlchemy or FiftyOne. A user's mistake
    in any command is one ``error:`` line and exit code 2 (``roadloop.cli_errors``)."""

    lazy: ClassVar[dict[str, tuple[str, str, str]]] = {
        # name: (module, attribute, help)
        "gateway": ("fleet.cli", "gateway_app", "Fleet gateway service."),
        "fleet": ("fleet.cli", "fleet_app", "Fleet administration: tokens and devices."),
        "privacy": ("launch.privacy_cli", "privacy_app", "Retention and erasure of camera data."),
        "annotate": (
            "launch.annotate",
            "annotate",
            "Open the FiftyOne App on the review queue (prints its URL).",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, attr, help_text = self.lazy[cmd_name]
        target = getattr(importlib.import_module(module), attr)
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)
        else:
            sub = typer.Typer()
            sub.command(cmd_name, help=help_text)(target)
            command = typer.main.get_command(sub)
        command.name = cmd_name
        return command


app = typer.Typer(
    cls=_LazyCommands,
    help="roadloop: continuous learning for traffic-camera detection.",
    no_args_is_help=True,
)
dataset_app = typer.Typer(help="Curated dataset versions (DVC).", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


def _export_env(settings: Settings, profile: str | None = None) -> dict[str, str]:
    """Environment for child processes so they see the same absolute home and profile."""
    env = dict(os.environ)
    env["ROADLOOP_HOME"] = str(settings.home)
    env["ROADLOOP_SHARED_DIR"] = str(settings.shared_dir)
    env["DAGSTER_HOME"] = str(settings.dagster_home)
    if profile:
        env["ROADLOOP_PROFILE"] = profile
    if profile == "demo":  # 1-min drift windows from today, so one turn fits in the demo
        from launch.drift_turn import DEMO_DRIFT_ENV

        for key, value in {**DEMO_DRIFT_ENV,
                           "ROADLOOP_DRIFT_START": datetime.now(UTC).date().isoformat()}.items():
            env.setdefault(key, value)
            os.environ.setdefault(key, value)
    os.environ.update({k: env[k] for k in ("ROADLOOP_HOME", "ROADLOOP_SHARED_DIR", "DAGSTER_HOME")})
    if profile:
        os.environ["ROADLOOP_PROFILE"] = profile
    get_settings.cache_clear()
    return env


def _write_dagster_yaml(dagster_home: Path) -> None:
    """Local instance: sqlite storage under the home (production: deploy/dagster/dagster.yaml)."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(
            "# Local roadloop instance: sqlite storage under this folder.\n"
            "telemetry:\n  enabled: false\n"
            "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: QueuedRunCoordinator\n"
            "  config:\n    max_concurrent_runs: 1\n"
        )


@app.command()
def settings() -> None:
    """Print the effective settings (after ROADLOOP_* overrides)."""
    typer.echo(get_settings().model_dump_json(indent=2))


@app.command()
def demo(
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Afterwards start the UIs and services of `roadloop serve` (Dagster with its daemon, MLflow, the gateway, the FiftyOne App)."),
    profile: str = typer.Option("demo", help="Resource profile: demo | test | default."),
    frames_per_camera: int = typer.Option(
        40, min=1, help="Frames replayed per labelled-dataset camera."),
    frames_per_agent: int = typer.Option(
        150, min=1, help="Video frames each demo edge agent processes."),
    review_turns: int = typer.Option(
        0, min=0,
        help="Turns that close the loop after the first: simulated reviews → import → retrain.",
    ),
    reviews_per_turn: int = typer.Option(
        20, min=1, help="Frames the simulated annotator reviews per turn."),
    drift_turn: bool = typer.Option(
        True, "--drift-turn/--no-drift-turn",
        help="A camera shifts from day to night and the drift sensors turn the loop by themselves.",
    ),
    federated_turn: bool = typer.Option(
        True, "--federated-turn/--no-federated-turn",
        help="Camera sites train together with Flower (SuperLink + SuperNodes on loopback).",
    ),
) -> None:
    """Run the whole learning loop on the shared data, then serve the UIs."""
    settings = get_settings()
    env = _export_env(settings, profile)
    settings = get_settings()
    settings.ensure_dirs()
    _write_dagster_yaml(settings.dagster_home)
    started = time.monotonic()

    from launch.demo import run_demo_loop  # imports Dagster

    outcome = run_demo_loop(
        frames_per_camera=frames_per_camera,
        frames_per_agent=frames_per_agent,
        review_turns=review_turns,
        reviews_per_turn=reviews_per_turn,
        drift_turn=drift_turn,
        federated_turn=federated_turn,
    )
    minutes = (time.monotonic() - started) / 60
    typer.echo(outcome.summary())
    typer.echo(f"demo loop finished in {minutes:.1f} min (profile={profile}, home={settings.home})")
    if not outcome.success:
        raise typer.Exit(1)
    if serve:
        _serve(settings, env)


@app.command()
def serve() -> None:
    """Start the Dagster UI (with its daemon), MLflow UI, fleet gateway and FiftyOne App.

    All on the local storage; Ctrl-C (or SIGTERM) stops them all; logs under <home>/logs.
    """
    settings = get_settings()
    env = _export_env(settings)
    settings.ensure_dirs()
    _write_dagster_yaml(settings.dagster_home)
    _serve(settings, env)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(settings: Settings, env: dict[str, str]) -> None:
    # SIGTERM (e.g. from a process manager) stops the UIs as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    bin_dir = Path(sys.executable).parent
    artifact_root = settings.mlflow_artifact_root
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        "dagster": [str(bin_dir / "dagster"), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                    "-h", "127.0.0.1", "-p", str(settings.dagster_port)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--backend-store-uri", str(settings.mlflow_tracking_uri),
                   "--default-artifact-root", Path(str(artifact_root)).as_uri(),
                   "--host", "127.0.0.1", "--port", str(settings.mlflow_port), "--workers", "1"],
        "gateway": [sys.executable, "-m", "fleet", "serve", "--port", str(settings.gateway_port),
                    "--home", str(settings.home)],
        "fiftyone": [str(bin_dir / "roadloop"), "annotate", "--port", str(settings.fiftyone_port)],
    }
    procs = {
        # Each service leads its own process group, so stopping it stops its children too.
        name: subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=(logs / f"{name}.log").open("ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
        for name, cmd in commands.items()
    }
    typer.echo(
        "\n".join(
            [
                "",
                f"Dagster UI   : http://127.0.0.1:{settings.dagster_port}",
                f"MLflow UI    : http://127.0.0.1:{settings.mlflow_port}",
                f"FiftyOne App : http://127.0.0.1:{settings.fiftyone_port} (review queue; `roadloop annotate`)",
                f"Fleet gateway: {settings.gateway_url}/docs",
                f"logs in {logs}; Ctrl-C stops them.",
            ]
        )
    )
    reported: set[str] = set()
    try:
        while any(p.poll() is None for p in procs.values()):
            for name, p in procs.items():
                if p.poll() is not None and name not in reported:
                    reported.add(name)
                    typer.echo(f"{name} exited with {p.returncode}; see {logs / (name + '.log')}", err=True)
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_groups(list(procs.values()))


def _stop_groups(procs: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGINT each service's process group (Ctrl-C semantics), SIGKILL what outlives the grace."""
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    time.sleep(1.0)
    for p in procs:  # children (code servers, daemons, mongod) left in the group
        _signal_group(p, signal.SIGKILL)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataset_app.command("restore")
def dataset_restore(
    md5: str, target: Path,
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace TARGET whole if it exists (atomically)."),
) -> None:
    """Restore a curated dataset version (its DVC md5, shown in the asset metadata)."""
    from roadloop.data.versioning import DvcStore

    settings = get_settings()
    store = DvcStore(Path(str(settings.dvc_repo)), str(settings.dvc_remote_url),
                     settings.s3_endpoint_url)
    path = store.restore(md5, target, overwrite=overwrite)
    typer.echo(f"restored {md5} into {path}")


# A settings home that was used holds several of these (``Settings.ensure_dirs`` makes the
# first four): ``clean`` deletes a folder only when it holds at least two, so a mistyped
# ROADLOOP_HOME cannot take a project or a user's folder with it.
HOME_MARKERS = frozenset({"dagster", "mlflow", "frames", "artifacts", "dvc"})


def home_problem(home: Path) -> str | None:
    """Why ``clean`` must not delete ``home``, or None."""
    if not home.exists():
        return None
    if not home.is_dir() or home.is_symlink():
        return f"{home} is not a folder"
    cwd = Path.cwd().resolve()
    resolved = home.resolve()
    if resolved in (Path(resolved.anchor), Path.home().resolve()) or cwd.is_relative_to(resolved):
        return f"{home} is the file system root, your home folder, or holds the current folder"
    markers = sorted(m for m in HOME_MARKERS if (home / m).is_dir())
    if len(markers) < 2:
        return (f"{home} does not look like a roadloop home (a used one holds at least two of "
                f"{', '.join(sorted(HOME_MARKERS))}; it holds {', '.join(markers) or 'none'})")
    return None


@app.command()
def clean(yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Delete the local state folder (settings home)."""
    home = get_settings().home
    problem = home_problem(home)
    if problem is not None:
        typer.echo(f"error: not deleting: {problem}; delete it by hand if you mean it",
                   err=True)
        raise typer.Exit(2)
    if not home.exists():
        typer.echo(f"nothing to remove: {home} does not exist")
        return
    if not yes:
        typer.confirm(f"delete {home}?", abort=True)
    shutil.rmtree(home)
    typer.echo(f"removed {home}")


def main(argv: list[str] | None = None) -> None:  # pragma: no cover
    app(argv)


if __name__ == "__main__":  # pragma: no cover
    app()
