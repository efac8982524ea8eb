"""``roadloop privacy``: erasure on request (docs/retention.md)."""

from __future__ import annotations

import json
from datetime import datetime

import typer

from roadloop.data.frames import FrameStore
from roadloop.errors import RoadloopError
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
        store = FrameStore(settings.frame_store)
        ledger = PrivacyLedger(settings.privacy_dir)
        known = set(store.cameras())
        fleet = None
        if gateway:
            from resources.fleet_resource import FleetResource

            fleet = FleetResource(gateway_url=str(settings.gateway_url))
            known |= fleet.cameras()
        sink = None
        if review:
            from roadloop.labeling.review_store import ReviewStore

            sink = ReviewStore(database_dir=settings.home / "fiftyone")
        resumed = resume_pending(store=store, ledger=ledger, review=sink, gateway=fleet)
        result = erase(request, store=store, ledger=ledger, known_cameras=known,
                       review=sink, gateway=fleet)
    except (RoadloopError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    out = result.model_dump(mode="json")
    out["resumed_earlier_erasures"] = [r.request_id for r in resumed]
    typer.echo(json.dumps(out, indent=2))
