"""Drift reports: the platform tells the gateway each camera's latest drift verdict, so
``/metrics`` exports it (``roadloop_camera_drift_score``, ``roadloop_camera_drifted``).

Drift is computed by the Dagster asset ``camera_drift`` (``docs/drift.md``); after each
window it ``PUT``s the verdict here (``camera:admin``). The gateway keeps one row per camera:
the report of the newest window. A report of an older window than the stored one (a backfill)
is accepted and changes nothing (``current: false``), so windows materialized out of order
never move the exported state backwards. Scores are named from a fixed set
(``roadloop.monitoring.models.SCORE_NAMES``), which bounds the metric's labels.

A window lies at most ``CLOCK_SKEW`` (1 day) past the gateway's clock: a report of a window
ending in 2099 would otherwise stay "newest" for good and every real verdict after it would
be ``current: false``. A stored row beyond that bound (written before it existed) is replaced
by the next report. Scores and ``drifted`` are JSON numbers and a JSON boolean (``strict``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from fleet.auth import AdminPrincipal
from fleet.auth_first import AuthFirstRoute
from fleet.bounds import CLOCK_SKEW, Id, Name, ReportedTime
from fleet.db import CameraDriftRow, Device
from fleet.runtime import GatewayDep
from fleet.schemas import ErrorOut
from roadloop.data.frame_records import FrameId
from roadloop.monitoring.models import SCORE_NAMES

router = APIRouter(tags=["drift"], route_class=AuthFirstRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}
DRIFTED = ("minor", "significant")
DriftVerdictName = Literal["ok", "minor", "significant", "not_enough_data", "no_reference"]
ScoreName = Literal[SCORE_NAMES]  # type: ignore[valid-type]
# Every score is a distance or share difference in [-1, 1] (unit Wasserstein, Jensen-Shannon,
# share increase, 2·AUC − 1).
Score = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False, strict=True)]
CameraIdPath = Annotated[FrameId, Path(description="The camera's id (as enrolled).")]


class DriftReportIn(BaseModel):
    """One window's drift verdict for one camera (``roadloop.monitoring.models.gateway_report``)."""

    model_config = ConfigDict(extra="forbid")

    window_start: ReportedTime
    window_end: ReportedTime
    verdict: DriftVerdictName
    drifted: bool = Field(strict=True,
                          description="True exactly when the verdict is minor or significant.")
    scores: dict[ScoreName, Score] = Field(
        default_factory=dict, max_length=len(SCORE_NAMES),
        description=f"Scores by metric; names from {', '.join(SCORE_NAMES)}. A metric the "
        "window could not judge is left out.")
    model_version: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DriftReportIn:
        if self.window_end <= self.window_start:
            raise ValueError("window_end must be after window_start")
        if self.drifted != (self.verdict in DRIFTED):
            raise ValueError(f"drifted={self.drifted} contradicts verdict {self.verdict!r} "
                             f"(drifted means {' or '.join(DRIFTED)})")
        return self


class DriftReportOut(BaseModel):
    camera_id: Id
    window_start: datetime
    window_end: datetime
    verdict: str
    drifted: bool
    scores: dict[str, float]
    model_version: str | None
    reported_at: datetime
    current: bool = Field(description="False when a newer window's report was already stored "
                          "(this one changed nothing).")


def _out(row: CameraDriftRow, current: bool) -> DriftReportOut:
    return DriftReportOut(camera_id=row.camera_id, window_start=row.window_start,
                          window_end=row.window_end, verdict=row.verdict, drifted=row.drifted,
                          scores=dict(row.scores), model_version=row.model_version,
                          reported_at=row.reported_at, current=current)


@router.put("/v1/cameras/{camera_id}/drift", response_model=DriftReportOut, responses=_ERRORS)
def report_drift(camera_id: CameraIdPath, body: DriftReportIn, principal: AdminPrincipal,
                 gw: GatewayDep) -> DriftReportOut:
    """Store the camera's drift verdict for a window unless a newer window's is stored.
    404 when no device was ever enrolled for the camera."""
    now = gw.now()
    with gw.db.write() as session:
        if session.scalar(select(Device.device_id).where(Device.camera_id == camera_id)
                          .limit(1)) is None:
            raise HTTPException(404, f"unknown camera {camera_id!r}: no device was ever "
                                "enrolled for it (GET /v1/devices lists them)")
        row = session.get(CameraDriftRow, camera_id)
        # A stored window past the bound (kept from before it) does not outrank real ones.
        ceiling = max(now, datetime.now(UTC)) + CLOCK_SKEW
        if row is not None and body.window_end < row.window_end <= ceiling:
            return _out(row, current=False)
        if row is None:
            row = CameraDriftRow(camera_id=camera_id)
            session.add(row)
        row.window_start, row.window_end = body.window_start, body.window_end
        row.verdict, row.drifted = body.verdict, body.drifted
        row.scores = {name: float(v) for name, v in sorted(body.scores.items())}
        row.model_version = body.model_version
        row.reported_at, row.reported_by = now, principal.actor
        session.commit()
        out = _out(row, current=True)
    gw.stats.count("drift_reports")
    return out
