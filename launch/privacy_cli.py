"""``roadloop privacy``: erasure on request (docs/retention.md).

The frame store is the one the platform's Dagster resource opens (``open_frame_store`` on
``ROADLOOP_FRAME_STORE_URL``, else the folder ``ROADLOOP_FRAME_STORE``): on an object-store
deployment the bucket, not the local image cache. The gateway is called through
``roadloop.fleet_admin`` (what ``resources.FleetResource`` calls too): importing the Dagster
resources would load Dagster and MLflow (seconds), which an erasure from the command line
does not need.
"""

from __future__ import annotations

import json
from datetime import datetime

import typer

from roadloop.data.object_frames import platform_frame_store
from roadloop.errors import RoadloopError
from roadloop.fleet_admin import FleetAdmin
from roadloop.retention.erasure import erase, make_request, resume_pending
from roadloop.retention.ledger import PrivacyLedger
from roadloop.settings import get_settings

privacy_app = typer.Typer(help="Retention and erasure of camera data.", no_args_is_help=True)


def _when(value: str, name: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 time", param_hint=name) from None


@privacy_app.command("erase")
def erase_command(
    camera: str = typer.Option(..., "--camera", help="Camera id."),
    since: str = typer.Option(..., help="Start, ISO 8601 with a time zone (inclusive)."),
    until: str = typer.Option(..., help="End, ISO 8601 with a time zone (exclusive)."),
    requested_by: str = typer.Option(..., "--by", help="Who asks (recorded in the audit)."),
    reason: str = typer.Option("", help="Why (recorded in the audit)."),
    gateway: bool = typer.Option(True, help="Also delete the gateway's rows and files."),
    review: bool = typer.Option(True, help="Also delete the FiftyOne review samples."),
) -> None:
    """Erase one camera's frames captured in [since, until) from the frame store, the
    review dataset and the gateway; prints what was done as JSON."""
    settings = get_settings()
    try:
        request = make_request(camera, _when(since, "--since"), _when(until, "--until"),
                               requested_by, reason)
        store = platform_frame_store(settings)
        ledger = PrivacyLedger(settings.privacy_dir)
        known = set(store.cameras())
        fleet = None
        if gateway:
            fleet = FleetAdmin(gateway_url=str(settings.gateway_url))
            known |= fleet.cameras()
        sink = None
        if review:
            from launch.annotate import review_store  # bound to the review export, as in
            # Dagster: a missing review dataset is an error, never a new empty one

            sink = review_store()
        resumed = resume_pending(store=store, ledger=ledger, review=sink, gateway=fleet)
        result = erase(request, store=store, ledger=ledger, known_cameras=known,
                       review=sink, gateway=fleet)
    except (RoadloopError, RuntimeError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    out = result.model_dump(mode="json")
    out["resumed_earlier_erasures"] = [r.request_id for r in resumed]
    typer.echo(json.dumps(out, indent=2))
