"""Retention and erasure as Dagster ops; their jobs are in ``jobs``, the daily schedule in
``schedules.retention`` (docs/retention.md).

Local copies (frame store, FiftyOne review samples) are deleted here through
``roadloop.retention``; the gateway's rows through its admin routes (``FleetResource``),
never by touching its database.

Retention journals the frames it expires in the privacy ledger (``expiry_pending.json``)
before deleting any, and clears them only once the gateway confirms deleting their rows: a
run that fails or is cut off between its local deletion and the gateway's raises, and every
later run sends those frames again (``gateway_frames_pending_from_earlier_runs``). One
protected since is kept only while the store still holds it; if that run had deleted its
files, its gateway row goes too (``gateway_frames_protected_but_gone``).
"""

from datetime import UTC, datetime

import dagster as dg

from resources import FiftyOneResource, FleetResource, FrameStoreResource
from roadloop.data.frame_records import FrameStorage
from roadloop.errors import InvalidInputError
from roadloop.retention.erasure import erase, make_request, resume_pending
from roadloop.retention.ledger import PrivacyLedger
from roadloop.retention.policy import (
    ExpiredFrame,
    expire_frames,
    expired_frames,
    policy_from_settings,
)
from roadloop.settings import get_settings


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(get_settings().privacy_dir)


def _still_stored(store: FrameStorage, camera_id: str, frame_id: str) -> bool:
    """Whether the store still holds the frame whole (its record and image)."""
    try:
        return store.read_record(camera_id, frame_id) is not None
    except InvalidInputError:  # not a frame id: no frame of the store can have it
        return False


@dg.op(description="Delete what the retention policy (ROADLOOP_RETENTION_*) says has expired.")
def enforce_retention(
    context: dg.OpExecutionContext,
    frame_store: FrameStoreResource,
    fiftyone: FiftyOneResource,
    fleet: FleetResource,
) -> dg.Output[dict]:
    policy = policy_from_settings()
    now = datetime.now(UTC)
    cut = policy.cutoffs(now)
    store = frame_store.store()
    ledger = _ledger()
    # Frames an earlier run deleted (or journalled) whose gateway rows it never saw deleted:
    # that run failed or was cut off. They are sent again below, until the gateway confirms.
    pending = ledger.pending_expired_frames()
    versioned = set(ledger.versioned_frame_keys())
    # One listing of the store (no image read): the review store is opened only when
    # something expires, and the frames it reviewed are then spared from this same list.
    candidates, spared = expired_frames(store, cut.frames_before, versioned)
    review = fiftyone.store() if candidates or pending else None
    # Labelled frames are kept with their dataset version; reviewed ones will be in the next.
    reviewed = review.reviewed_frame_keys() if review is not None else set()
    protected = versioned | reviewed
    chosen = [f for f in candidates if f.frame_key not in reviewed]
    spared += len(candidates) - len(chosen)
    # Protected since an earlier run journalled it: kept, gateway row included, when its
    # frame is still in the store. When that run had already deleted its files, it cannot be
    # kept: its gateway row (which would serve a preview and metadata of a frame whose bytes
    # are gone) is sent for deletion with the others.
    kept = [p for p in pending if f"{p[0]}/{p[1]}" in protected and _still_stored(store, *p)]
    protected_but_gone = sum(1 for p in pending if f"{p[0]}/{p[1]}" in protected) - len(kept)
    if kept:
        ledger.confirm_expired(kept)
        pending = [p for p in pending if p not in set(kept)]
    if protected_but_gone:
        context.log.warning(
            "retention: %d frames protected since an earlier run journalled them had their "
            "files deleted by that run; their gateway rows are deleted too",
            protected_but_gone)
    removed_samples = 0
    if pending:
        context.log.warning(
            "retention: %d frames expired by an earlier run still have gateway rows (that "
            "run failed before the gateway confirmed); sending them again", len(pending))
        if review is not None:  # that run may have stopped before their samples went too
            removed_samples += review.delete_frames([f"{c}/{f}" for c, f in pending])

    def journal(frames: list[ExpiredFrame]) -> None:
        # Before the first file goes: a run cut off after deleting still leaves the keys.
        ledger.add_pending_expired((f.camera_id, f.frame_id) for f in frames)

    def drop_samples(frames: list[ExpiredFrame]) -> None:
        nonlocal removed_samples
        if review is not None:
            removed_samples += review.delete_frames(f.frame_key for f in frames)

    expiry = expire_frames(store, cut.frames_before, protected, on_planned=journal,
                           on_deleted=drop_samples, chosen=(chosen, spared))
    to_gateway = sorted(set(pending) | {(f.camera_id, f.frame_id) for f in expiry.deleted})
    try:
        gateway = fleet.expire(to_gateway, heartbeats_before=cut.heartbeats_before,
                               traffic_before=cut.traffic_before)
    except Exception:
        context.log.error(
            "retention: the gateway did not confirm deleting %d expired frames (%d deleted "
            "locally by this run); they stay journalled in %s and the next run sends them "
            "again", len(to_gateway), len(expiry.deleted), ledger.expiry_pending_path)
        raise
    still_pending = ledger.confirm_expired(to_gateway)
    report = {
        "frames_deleted": len(expiry.deleted),
        "frame_bytes_deleted": expiry.bytes_deleted,
        "frames_kept_with_dataset_versions": expiry.kept_protected,
        "review_samples_deleted": removed_samples,
        "gateway_frames_pending_from_earlier_runs": len(pending),
        "gateway_frames_protected_but_gone": protected_but_gone,
        "gateway_frames_still_pending": still_pending,
        "gateway_frame_rows_deleted": gateway["frames_deleted"],
        "gateway_frame_bytes_deleted": gateway["bytes_deleted"],
        "heartbeats_deleted": gateway["heartbeats_deleted"],
        "traffic_records_deleted": gateway["traffic_records_deleted"],
    }
    context.log.info("retention: %s", report)
    return dg.Output(report, metadata={
        **report,
        "frames_deleted_per_camera": dg.MetadataValue.json(expiry.per_camera),
        "policy_days": dg.MetadataValue.json(policy.model_dump()),
        "cutoffs": dg.MetadataValue.json({k: v.isoformat() for k, v in cut}),
    })


class ErasureConfig(dg.Config):
    camera_id: str
    since: str  # ISO 8601 with a time zone
    until: str
    requested_by: str
    reason: str = ""


@dg.op(description="Erase one camera's frames in [since, until) everywhere (audited).")
def erase_camera_frames(
    context: dg.OpExecutionContext,
    config: ErasureConfig,
    frame_store: FrameStoreResource,
    fiftyone: FiftyOneResource,
    fleet: FleetResource,
) -> dg.Output[dict]:
    request = make_request(config.camera_id, datetime.fromisoformat(config.since),
                           datetime.fromisoformat(config.until), config.requested_by,
                           config.reason)
    store = frame_store.store()
    ledger = _ledger()
    review = fiftyone.store()
    resumed = resume_pending(store=store, ledger=ledger, review=review, gateway=fleet)
    result = erase(request, store=store, ledger=ledger,
                   known_cameras=set(store.cameras()) | fleet.cameras(),
                   review=review, gateway=fleet)
    context.log.info("erasure %s: %d frames deleted (%d unfinished erasures resumed first)",
                     result.request_id, result.frames_deleted, len(resumed))
    out = result.model_dump(mode="json")
    return dg.Output(out, metadata={
        "request_id": result.request_id,
        "frames_deleted": result.frames_deleted,
        "bytes_deleted": result.bytes_deleted,
        "review_samples_deleted": result.review_samples_deleted or 0,
        "gateway_rows_deleted": result.gateway_rows_deleted or 0,
        "not_removable": dg.MetadataValue.json(out["not_removable"]),
        "resumed_erasures": len(resumed),
    })
