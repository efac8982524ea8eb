"""Rollouts in the database: the policy (``fleet.rollout_policy``) applied to ``RolloutRow``.

Stage transitions (enter, advance, complete, roll back) with their history entries, the
cohort and the health read from device and heartbeat rows, and the API view of a row. The
caller owns the session and commits; nothing here knows about HTTP.
"""

from __future__ import annotations

import bisect
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db import Device, DeviceStatus, HeartbeatRow, ModelManifestRow, RolloutRow, RolloutStatus
from fleet.rollout_policy import (
    FAILED_UPDATE_STATUSES,
    LIVE,
    Budgets,
    Stage,
    StageHealth,
    cohort_hash,
    stage_health,
    stage_threshold,
)
from fleet.rollout_schemas import RolloutOut


def active_hashes(session: Session) -> list[float]:
    """Sorted cohort hashes of the devices a rollout counts (active, not revoked)."""
    ids = session.scalars(select(Device.device_id).where(
        Device.revoked_at.is_(None), Device.status == DeviceStatus.active.value))
    return sorted(cohort_hash(d) for d in ids)


def cohort_members(session: Session, threshold: float) -> set[str]:
    """Ids of the counted devices inside ``threshold``."""
    ids = session.scalars(select(Device.device_id).where(
        Device.revoked_at.is_(None), Device.status == DeviceStatus.active.value))
    return {d for d in ids if cohort_hash(d) < threshold}


def record_event(ro: RolloutRow, now: datetime, event: str, **detail: Any) -> None:
    """Append one entry to the rollout's history (at its current stage)."""
    stage = ro.stages[ro.stage_index]
    ro.history = [*ro.history, {"at": now.isoformat(), "event": event, "stage": stage["name"],
                                "percent": stage["percent"], **detail}]
    ro.updated_at = now


def rollout_out(session: Session, ro: RolloutRow, now: datetime) -> RolloutOut:
    """The API view of a rollout row (cohort size counted now)."""
    stage = Stage(**ro.stages[ro.stage_index])
    threshold = 1.0 if ro.status == RolloutStatus.complete.value else ro.cohort_threshold
    hashes = active_hashes(session)
    manifest = session.get(ModelManifestRow, ro.manifest_sha256)
    elapsed = (now - ro.stage_started_at).total_seconds()
    return RolloutOut(
        rollout_id=ro.rollout_id, status=ro.status, model_version=ro.model_version,
        manifest_sha256=ro.manifest_sha256, sha256=manifest.file_sha256 if manifest else "",
        stage=stage.name, stage_index=ro.stage_index, percent=stage.percent, mode=stage.mode,
        stages=[Stage(**s) for s in ro.stages],
        cohort_size=bisect.bisect_left(hashes, threshold) if threshold < 1.0 else len(hashes),
        devices=len(hashes), hold_seconds=ro.hold_seconds, stage_started_at=ro.stage_started_at,
        hold_remaining_s=max(0.0, ro.hold_seconds - elapsed) if ro.status in LIVE else 0.0,
        budgets=Budgets(**ro.budgets), previous_model_version=ro.previous_model_version,
        created_at=ro.created_at, updated_at=ro.updated_at, finished_at=ro.finished_at,
        reason=ro.reason, history=ro.history, health=ro.health,
    )



def enter_stage(session: Session, ro: RolloutRow, index: int, now: datetime) -> None:
    """Start stage ``index``: its clock, and its cohort threshold (which only grows)."""
    ro.stage_index = index
    ro.stage_started_at = now
    stage = ro.stages[index]
    ro.cohort_threshold = stage_threshold(
        ro.cohort_threshold, stage["percent"], active_hashes(session),
        int(ro.budgets["min_cohort_devices"]))


def advance(session: Session, ro: RolloutRow, now: datetime, how: str, actor: str,
             health: StageHealth | None = None) -> str:
    """Move to the next stage, or complete after the last. Returns the audit action."""
    old = ro.stages[ro.stage_index]["name"]
    if ro.stage_index + 1 >= len(ro.stages):
        ro.status = RolloutStatus.complete.value
        ro.finished_at = now
        ro.cohort_threshold = 1.0
        record_event(ro, now, "completed", how=how, actor=actor)
        return "rollout_completed"
    enter_stage(session, ro, ro.stage_index + 1, now)
    record_event(ro, now, "advanced", how=how, actor=actor, **{"from": old},
           health_verdict=health.verdict if health else None)
    return "rollout_advanced"


def roll_back(ro: RolloutRow, now: datetime, reason: str, how: str, actor: str) -> None:
    """Mark the rollout rolled back: every device returns to its previous model."""
    ro.status = RolloutStatus.rolled_back.value
    ro.finished_at = now
    ro.reason = reason
    record_event(ro, now, "rolled_back", how=how, actor=actor, reason=reason)


def compute_health(session: Session, ro: RolloutRow, now: datetime) -> StageHealth:
    """``stage_health`` of the current stage from the heartbeat rows since it began, with
    their receive times (the gateway's clock: what bursts are measured against).

    Failure reports: each cohort device's *latest* heartbeat about this rollout since it was
    created, when that says ``rolled_back``/``rejected``. A device is judged by where it
    stands: one that refused and later serves the model (an older agent reported a corrupt
    transfer it then retried as ``rejected``) is healthy; one that refused for good keeps
    saying so in every heartbeat."""
    stage = Stage(**ro.stages[ro.stage_index])
    manifest = session.get(ModelManifestRow, ro.manifest_sha256)
    model_ids = {ro.model_version, manifest.file_sha256 if manifest else ""}
    cohort = cohort_members(session, ro.cohort_threshold)
    rows = session.execute(
        select(HeartbeatRow.device_id, HeartbeatRow.payload, HeartbeatRow.received_at)
        .where(HeartbeatRow.received_at > ro.stage_started_at)
        .order_by(HeartbeatRow.received_at, HeartbeatRow.id)).all()
    latest: dict[str, dict[str, Any]] = {}
    for d, p in session.execute(
            select(HeartbeatRow.device_id, HeartbeatRow.payload)
            .where(HeartbeatRow.received_at >= ro.created_at)
            .order_by(HeartbeatRow.received_at, HeartbeatRow.id)).all():
        if d in cohort and isinstance(p, dict) and p.get("rollout_id") == ro.rollout_id:
            latest[d] = p  # received later: replaces what the device said before
    failures = [(d, p) for d, p in latest.items()
                if p.get("update_status") in FAILED_UPDATE_STATUSES]
    return stage_health(
        rollout_id=ro.rollout_id, model_ids=model_ids, stage=stage, since=ro.stage_started_at,
        now=now, cohort=cohort, heartbeats=[(d, p, at) for d, p, at in rows],
        failure_reports=failures, budgets=Budgets(**ro.budgets),
    )
