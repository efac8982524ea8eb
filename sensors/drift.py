"""Drift sensors: score every closed window, and act on what the scores say.

``drift_window_sensor`` asks for a ``camera_drift`` run per live camera (an active device on
the gateway) and closed window — closed means its end plus ``drift_grace_s`` (the last
heartbeat of the window arrives after it) has passed. Run keys are ``camera|window``, so a
window is scored once. A camera not heard from since before the previous window is skipped:
its first silent window was scored (and its ``operational_health`` check said "silent"), so
an unplugged camera costs one run, not one per window forever.

``drift_sensor`` reads new ``camera_drift`` materializations:

- **minor** (score ≥ 0.1) or worse: raise the camera's sampling through its configuration
  on the gateway (``drift_boost_factor`` × for ``drift_boost_minutes``); a boost with more than
  half its time left is not renewed, so a persistent drift writes one config, not one per window.
- **significant** (≥ 0.2): also queue the camera's frames for review (``review_queue`` run
  limited to that camera) and mark a ``learning_loop`` run as owed; it starts once a review
  import of the camera's frames after the request has finished (a ``reviewed_labels``
  materialization, written only by ``review_import``, that newly imported frames of that
  camera, and whose run has ended): retraining before the drifted frames are labelled would
  learn nothing new. Another run re-cutting ``curated_dataset`` (a ``learning_loop`` for
  another camera) does not count; once ``drift_cooldown_minutes`` have passed without its
  own reviews, any import finished since the request does. At most one such response per
  camera per ``drift_cooldown_minutes``.

It reads ``camera_accuracy`` materializations the same way: the serving model's measured
mAP50 on a camera's reviewed frames against its benchmark (metric
``reviewed_accuracy_drop``) is on the same scale, so a minor drop raises sampling and a
significant one queues the camera's frames and owes a ``learning_loop``, sharing the cooldown.

Every run it starts carries tags naming the camera, window, metric, score and reference.

Cursors are checked when read (``window_cursor``, ``drift_state``): what does not read, lies
ahead of the clock, or (window cursor) is not a window start of the current
``drift_window_minutes`` is logged and repaired, and expired boosts and cooldowns are
dropped, so the state holds only what still changes a decision.
"""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from assets.active_learning import reviewed_labels
from assets.camera_accuracy import camera_accuracy
from assets.drift import camera_drift
from assets.partitions import camera_partitions
from jobs import camera_drift_job, learning_loop_job, review_queue_job
from resources.fleet_resource import FleetError, FleetResource
from roadloop.monitoring.windows import DRIFT_WINDOW_FORMAT, window_start
from roadloop.settings import get_settings

MAX_WINDOWS_PER_TICK = 8
TAG = "roadloop/drift_"
# How far ahead of the clock a cursor time may lie (clocks of two hosts, a tick's own delay)
# before it is taken as written by a clock that ran ahead, and forgotten.
CLOCK_TOLERANCE = timedelta(minutes=5)


def window_cursor(context: dg.SensorEvaluationContext, now: datetime,
                  minutes: int | None = None) -> datetime | None:
    """``drift_window_sensor``'s cursor: the start of the last window it asked for (a time
    without a zone is taken as UTC). One that does not read as a time, or lies ahead of
    ``now`` (no window would ever close after it), is logged and dropped: the sensor starts
    over from its first-tick backfill, and run keys keep the windows already asked for from
    running twice. One that is not a window start of ``minutes`` (written before
    ``ROADLOOP_DRIFT_WINDOW_MINUTES`` changed) is logged and snapped down to the window of
    that length holding it: counting on from it would name windows that are no partitions
    (every tick would fail); the window after the snapped one is scored next (it may overlap
    the last one scored under a longer old length; after a change to a longer length, less
    than one new window between the two goes unscored)."""
    if not context.cursor:
        return None
    try:
        after = datetime.fromisoformat(context.cursor)
    except ValueError:
        after = None
    if after is not None and after.tzinfo is None:
        after = after.replace(tzinfo=UTC)
    if after is None or after > now:
        context.log.warning(f"drift_window_sensor: cursor {context.cursor[:100]!r} is not a past "
                            "window start; starting over from the last closed windows")
        return None
    if minutes is not None and (snapped := window_start(after, minutes)) != after:
        context.log.warning(f"drift_window_sensor: cursor {context.cursor[:100]!r} is not the "
                            f"start of a {minutes}-minute window (the window length changed?); "
                            f"going on from the window starting {snapped.isoformat()}")
        return snapped
    return after


def closed_windows(now: datetime, after: datetime | None, minutes: int, grace: timedelta,
                   backfill: int = 2) -> list[datetime]:
    """Starts of windows closed by ``now`` (end + grace passed), after ``after`` (exclusive);
    without ``after``, the last ``backfill`` closed windows. Oldest first, capped per tick."""
    length = timedelta(minutes=minutes)
    newest = window_start(now - grace, minutes) - length
    first = after + length if after is not None else newest - (backfill - 1) * length
    out = []
    w = first
    while w <= newest and len(out) < MAX_WINDOWS_PER_TICK:
        out.append(w)
        w += length
    return out


@dg.sensor(
    job=camera_drift_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts camera_drift for each live camera and each drift window that closed.",
)
def drift_window_sensor(context: dg.SensorEvaluationContext, fleet: FleetResource):
    settings = get_settings()
    now = datetime.now(UTC)
    after = window_cursor(context, now, settings.drift_window_minutes)
    windows = closed_windows(now, after, settings.drift_window_minutes,
                             timedelta(seconds=settings.drift_grace_s))
    if not windows:
        return dg.SkipReason("no drift window closed since the last tick")
    try:
        live = fleet.live_cameras()
    except FleetError as exc:
        return dg.SkipReason(f"gateway unavailable, windows wait: {exc}")
    known = set(context.instance.get_dynamic_partitions(camera_partitions.name))
    new = sorted(set(live) - known)
    length = timedelta(minutes=settings.drift_window_minutes)
    requests = [
        dg.RunRequest(
            partition_key=dg.MultiPartitionKey({"camera": c, "window": w.strftime(DRIFT_WINDOW_FORMAT)}),
            run_key=f"{c}|{w.strftime(DRIFT_WINDOW_FORMAT)}",
            tags={f"{TAG}camera": c, f"{TAG}window": w.strftime(DRIFT_WINDOW_FORMAT)},
        )
        for w in windows for c, seen in live.items()
        # a camera silent since before the previous window was reported silent once already
        if seen is not None and seen >= w - length
    ]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[camera_partitions.build_add_request(new)] if new else [],
        cursor=windows[-1].isoformat(),
    )


def _time(value: Any) -> datetime | None:
    """An aware datetime from a cursor's ISO string (naive: UTC); None when it is not one."""
    try:
        t = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


def _storage_id(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def drift_state(context: dg.SensorEvaluationContext,
                now: datetime | None = None) -> dict[str, Any]:
    """``drift_sensor``'s cursor, checked piece by piece. What does not read is logged and
    replaced by a safe default instead of failing every tick: a bad boost or cooldown time is
    forgotten (the next drifting window boosts again; the response may come early), a bad
    owed entry is dropped, and a bad position (``after``, ``accuracy_after``) restarts after
    the newest materialization there is -- not from the start, which would act again on every
    old verdict.

    Times are checked against ``now`` (default: the clock) too. One further ahead than it can
    be (a cooldown start after ``now``, a boost end after ``now`` + the boost length, beyond
    ``CLOCK_TOLERANCE``: written while the clock ran ahead) is unreadable in the same way:
    kept, it would silence the camera's response until the clock caught up; an owed run
    requested in the future is kept, as requested now. Entries that no
    longer change a decision (a boost that has ended, a cooldown that has passed) are
    dropped without a warning, so the cursor does not grow with every camera that ever
    drifted."""
    settings = get_settings()
    now = now or datetime.now(UTC)
    limits = {"boosted": now + timedelta(minutes=settings.drift_boost_minutes),
              "fired": now}
    expired = {"boosted": now,  # the boost is over
               "fired": now - timedelta(minutes=settings.drift_cooldown_minutes)}
    raw = context.cursor
    try:
        state = json.loads(raw) if raw else {}
    except ValueError:
        state = None
    problems: list[str] = []
    if not isinstance(state, dict):  # nothing of it is usable, the position included
        problems.append("not a JSON object")
        state = {"after": "lost", "accuracy_after": "lost"}
    for key in ("boosted", "fired"):
        times = state.get(key, {})
        if not isinstance(times, dict):
            problems.append(key)
            times = {}
        read = {c: _time(t) for c, t in times.items()}
        good = {c: t for c, t in read.items() if t is not None}
        if len(good) != len(times):
            problems.append(key)
        ahead = sorted(c for c, t in good.items() if t > limits[key] + CLOCK_TOLERANCE)
        if ahead:
            problems.append(f"{key} ahead of the clock for {', '.join(ahead)}")
        state[key] = {c: t.isoformat() for c, t in good.items()
                      if c not in ahead and t > expired[key]}
    owed = state.get("owed", {})
    if not isinstance(owed, dict):
        problems.append("owed")
        owed = {}
    good_owed = {c: o for c, o in owed.items() if isinstance(o, dict)
                 and isinstance(o.get("tags"), dict)
                 and isinstance(o.get("requested_at"), (int, float))
                 and not isinstance(o.get("requested_at"), bool)}
    if len(good_owed) != len(owed):
        problems.append("owed")
    # A request time ahead of the clock (written while it ran ahead) would hold the loop
    # until the clock passed it: no import could come after it. The debt stays, from now.
    latest_ok = (now + CLOCK_TOLERANCE).timestamp()
    ahead_owed = sorted(c for c, o in good_owed.items() if o["requested_at"] > latest_ok)
    if ahead_owed:
        problems.append(f"owed ahead of the clock for {', '.join(ahead_owed)}")
    state["owed"] = {c: (o | {"requested_at": now.timestamp()}) if c in ahead_owed else o
                     for c, o in good_owed.items()}
    for key, asset in (("after", camera_drift), ("accuracy_after", camera_accuracy)):
        if not _storage_id(state.get(key)):
            problems.append(key)
            latest = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset.key), limit=1).records
            state[key] = latest[0].storage_id if latest else None
    if problems:
        context.log.warning(f"drift_sensor: cursor {raw[:100]!r} unreadable "  # type: ignore[index]
                            f"({', '.join(dict.fromkeys(problems))}); those parts start over")
    return state


def _meta(record: Any) -> dict[str, Any]:
    mat = record.asset_materialization
    return {k: v.value for k, v in (mat.metadata or {}).items()} | {
        "partition": mat.partition, "timestamp": record.timestamp}


def drift_tags(m: dict[str, Any]) -> dict[str, str]:
    return {
        f"{TAG}camera": str(m.get("camera_id", "")),
        f"{TAG}window": str(m.get("window_start", "")),
        f"{TAG}metric": str(m.get("metric", "")),
        f"{TAG}score": f"{float(m.get('score') or 0):.4f}",
        f"{TAG}threshold": f"{float(m.get('threshold') or 0):.4f}",
        f"{TAG}reference": str(m.get("reference_id", "")),
        f"{TAG}verdict": str(m.get("verdict", "")),
    } | ({f"{TAG}review_export": str(m["review_export_hash"])} if "review_export_hash" in m else {})


def review_imports(context: dg.SensorEvaluationContext,
                   since: float) -> list[tuple[float, dict[str, int] | None]]:
    """The finished review imports recorded after ``since`` (a timestamp), newest first: each
    one's time and how many frames it newly imported per camera (``None`` for an import
    recorded before ``reviewed_labels`` kept that: it counts for every camera).

    A review import is a ``reviewed_labels`` materialization: only ``review_import`` writes
    it, so a ``curated_dataset`` cut by any other run (a ``learning_loop`` for another
    camera, one launched by hand) is not taken for one. It counts once it newly imported
    frames (an import whose every review was rejected brought nothing to learn from) and its
    run has ended (its ``curated_dataset`` step may still be pushing to DVC, as in
    ``camera_accuracy_sensor``)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=reviewed_labels.key, after_timestamp=since),
        limit=50, ascending=False,
    ).records
    imports: list[tuple[float, dict[str, int] | None]] = []
    for record in records:  # newest first
        m = _meta(record)
        newly = m.get("newly_imported")
        if isinstance(newly, (int, float)) and not isinstance(newly, bool) and newly <= 0:
            continue
        run = context.instance.get_run_by_id(record.run_id) if record.run_id else None
        if run is not None and not run.is_finished:
            continue
        per_camera = m.get("newly_imported_per_camera")
        imports.append((record.timestamp, {str(c): n for c, n in per_camera.items()
                                           if isinstance(n, int) and n > 0}
                        if isinstance(per_camera, dict) else None))
    return imports


def owed_release(camera: str, requested_at: float, now: float, patience_s: float,
                 imports: list[tuple[float, dict[str, int] | None]]) -> tuple[float, bool]:
    """When camera's owed ``learning_loop`` may start: (the releasing import's time, whether
    it held the camera's own reviews); (0.0, False) while it waits.

    It waits for an import of the camera's own frames. Its review batch may never be
    reviewed (skipped, deleted from FiftyOne), so after ``patience_s`` any later import
    releases it, as the drift cooldown would let the camera owe a new loop by then anyway."""
    after = [(t, pc) for t, pc in imports if t > requested_at]
    own = [t for t, pc in after if pc is None or pc.get(camera, 0) > 0]
    if own:
        return max(own), True
    if after and now - requested_at >= patience_s:
        return max(t for t, _ in after), False
    return 0.0, False


@dg.sensor(
    jobs=[review_queue_job, learning_loop_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="On drift: raise the camera's sampling (minor), queue its frames for review and "
    "owe a learning_loop run once those reviews are imported (significant).",
)
def drift_sensor(context: dg.SensorEvaluationContext, fleet: FleetResource):
    settings = get_settings()
    now = datetime.now(UTC)
    state = drift_state(context, now)
    after = state.get("after")
    accuracy_after = state.get("accuracy_after")  # camera_accuracy has its own storage ids
    boosted: dict[str, str] = state.get("boosted", {})
    fired: dict[str, str] = state.get("fired", {})
    owed: dict[str, dict[str, Any]] = state.get("owed", {})
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=camera_drift.key, after_storage_id=after),
        limit=200, ascending=True,
    ).records
    accuracy = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=camera_accuracy.key, after_storage_id=accuracy_after),
        limit=200, ascending=True,
    ).records
    accuracy_after = accuracy[-1].storage_id if accuracy else accuracy_after
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    boost = timedelta(minutes=settings.drift_boost_minutes)
    cooldown = timedelta(minutes=settings.drift_cooldown_minutes)
    for record in [*records, *accuracy]:
        if record.asset_key == camera_drift.key:
            after = record.storage_id
        m = _meta(record)
        camera, verdict = str(m.get("camera_id", "")), m.get("verdict")
        if verdict not in ("minor", "significant") or not camera:
            continue
        tags = drift_tags(m)
        # A drift window, or the review export an accuracy measurement used.
        where = m.get("window_start") or f"reviews-{m.get('review_export_hash', '')}"
        until = datetime.fromisoformat(boosted[camera]) if camera in boosted else None
        if until is None or until - now < boost / 2:
            try:
                fleet.boost_sampling(
                    camera, factor=settings.drift_boost_factor, until=now + boost,
                    reason=f"drift {m.get('metric')} {float(m.get('score') or 0):.3f} in {where}",
                )
                boosted[camera] = (now + boost).isoformat()
                notes.append(f"{camera}: sampling ×{settings.drift_boost_factor:g} until "
                             f"{boosted[camera]}")
            except FleetError as exc:  # the next drifting window tries again
                context.log.warning(f"{camera}: sampling boost failed: {exc}")
        if verdict != "significant":
            continue
        last = datetime.fromisoformat(fired[camera]) if camera in fired else None
        if last is not None and now - last < cooldown:
            notes.append(f"{camera}: significant drift, response cooling down until "
                         f"{(last + cooldown).isoformat()}")
            continue
        fired[camera] = now.isoformat()
        owed[camera] = {"tags": tags, "requested_at": now.timestamp()}
        requests.append(dg.RunRequest(
            job_name=review_queue_job.name,
            run_key=f"drift-queue|{camera}|{where}",
            run_config={"ops": {"frame_embeddings": {"config": {"cameras": [camera]}}}},
            tags=tags,
        ))
        notes.append(f"{camera}: significant drift ({m.get('metric')} "
                     f"{float(m.get('score') or 0):.3f}); review queue requested")
    if owed:
        imports = review_imports(context, min(o["requested_at"] for o in owed.values()))
        ready: dict[str, dict[str, Any]] = {}
        imported_at = 0.0
        for camera, o in sorted(owed.items()):
            at, own = owed_release(camera, o["requested_at"], now.timestamp(),
                                   cooldown.total_seconds(), imports)
            if at:
                ready[camera] = o
                imported_at = max(imported_at, at)
                if not own:
                    notes.append(f"{camera}: no import of its own reviews within "
                                 f"{settings.drift_cooldown_minutes} min of the request; "
                                 "the owed learning_loop starts on the reviews there are")
        if ready:
            first = min(ready.values(), key=lambda o: o["requested_at"])
            tags = dict(first["tags"])
            tags[f"{TAG}cameras"] = ",".join(sorted(ready))
            requests.append(dg.RunRequest(
                job_name=learning_loop_job.name,
                run_key=f"drift-loop|{','.join(sorted(ready))}|{imported_at:.0f}",
                tags=tags,
            ))
            notes.append(f"learning_loop for drift on {sorted(ready)}: reviews imported")
            owed = {c: o for c, o in owed.items() if c not in ready}
    for note in notes:
        context.log.info(note)
    state = {"after": after, "boosted": boosted, "fired": fired, "owed": owed}
    if accuracy_after is not None:
        state["accuracy_after"] = accuracy_after
    cursor = json.dumps(state, sort_keys=True)
    if not requests and cursor == context.cursor:
        return dg.SkipReason("no new drift" + (f"; owed learning_loop for {sorted(owed)} waits "
                                              "for their reviews" if owed else ""))
    return dg.SensorResult(run_requests=requests, cursor=cursor)
