"""Loop sensor faults (audit 7): what the drift and review sensors did wrong, and now do.

1. drift_sensor's owed learning_loop waits for a finished review import (``reviewed_labels``
   that newly imported frames), not for any run that re-cuts ``curated_dataset``;
2. reviews_finished_sensor imports a review set again when it is pending again after a
   successful import (rejected, fixed, finished again), under a new deterministic run key;
3. drift_window_sensor snaps a cursor written under another window length to a window start;
4. drift_sensor forgets boost/cooldown times that lie ahead of the clock;
5. drift_sensor drops boosts that ended and cooldowns that passed from its cursor.

No postponed annotations: Dagster resolves types at definition time.
"""

import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from resources import ArtifactStoreResource
from resources.fiftyone_resource import FiftyOneResource
from roadloop.labeling.review_items import ReviewBox
from roadloop.labeling.review_store import pending_key
from roadloop.settings import get_settings
from sensors.drift import closed_windows, drift_state, window_cursor
from tests import test_drift_sensors, test_review_audit
from tests.test_drift_sensors import (
    Clock,
    StubFleet,
    Ticker,
    W,
    at,
    boosts,
    drift_tick,
    report_drift,
    window_tick,
)
from tests.test_review_audit import _items

# The fixtures those tests use: an ephemeral instance, the sensors' clock, a stub fleet's
# probe name; a review dataset in the session's throw-away FiftyOne database, artifacts.
instance = test_drift_sensors.instance
clock = test_drift_sensors.clock
probe = test_drift_sensors.probe
fiftyone = test_review_audit.fiftyone
artifacts = test_review_audit.artifacts

LOG = logging.getLogger("test_loop_sensor_faults")


def _ctx(instance: dg.DagsterInstance, cursor: str) -> SimpleNamespace:
    """What window_cursor and drift_state read of a sensor context, with a logger caplog
    sees (build_sensor_context's log does not reach it)."""
    return SimpleNamespace(instance=instance, cursor=cursor, log=LOG)


# --------------------------------------------------------------------------- 1. owed loop


def _report_in_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus,
                   newly_imported: int, per_camera: dict[str, int] | None = None) -> dg.DagsterRun:
    """A review_import run (in ``status``) that materialized reviewed_labels (with its
    per-camera counts when given; older imports recorded none)."""
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.test_utils import create_run_for_test

    run = create_run_for_test(instance, job_name="review_import", status=status)
    metadata: dict = {"newly_imported": newly_imported}
    if per_camera is not None:
        metadata["newly_imported_per_camera"] = dg.MetadataValue.json(per_camera)
    mat = dg.AssetMaterialization("reviewed_labels", metadata=metadata)
    instance.report_dagster_event(
        DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, job_name="review_import",
                     event_specific_data=StepMaterializationData(mat)),
        run_id=run.run_id,
    )
    return run


def test_owed_learning_loop_waits_for_a_finished_review_import(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    tick = Ticker(instance, StubFleet(probe=probe))
    report_drift(instance, "cam-a", W[0], "significant", 0.5, reference_id="refA")
    assert [r.job_name for r in tick()] == ["review_queue"]
    assert set(tick.state["owed"]) == {"cam-a"}

    def still_owed() -> None:
        waiting = drift_tick(instance, tick.fleet, tick.cursor)
        assert isinstance(waiting, dg.SkipReason), waiting
        assert "owed learning_loop for ['cam-a']" in waiting.skip_message

    # another run re-cuts curated_dataset (a learning_loop for another camera): no import
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="curated_dataset"))
    still_owed()
    # an import whose every review was rejected brought nothing new
    instance.report_runless_asset_event(
        dg.AssetMaterialization("reviewed_labels", metadata={"newly_imported": 0}))
    still_owed()
    # an import still running (its curated_dataset step may be pushing to DVC)
    running = _report_in_run(instance, dg.DagsterRunStatus.STARTED, newly_imported=3)
    still_owed()
    # once it has ended the loop starts, once, keyed on that import's time
    instance.report_run_failed(instance.get_run_by_id(running.run_id))  # the curation failed:
    (loop,) = tick()  # the reviews were imported all the same, the loop cuts its own dataset
    assert loop.job_name == "learning_loop" and loop.run_key.startswith("drift-loop|cam-a|")
    assert loop.tags["roadloop/drift_reference"] == "refA"
    assert tick.state["owed"] == {}
    assert tick() == []


def test_a_review_import_before_the_drift_does_not_release_its_loop(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization("reviewed_labels", metadata={"newly_imported": 5}))
    clock.advance(seconds=5)  # the drift comes after that import
    tick = Ticker(instance, StubFleet(probe=probe))
    report_drift(instance, "cam-a", W[0], "significant", 0.5)
    assert [r.job_name for r in tick()] == ["review_queue"]
    assert tick() == [] and set(tick.state["owed"]) == {"cam-a"}


def test_an_import_of_other_cameras_reviews_does_not_release_the_loop(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    tick = Ticker(instance, StubFleet(probe=probe))
    report_drift(instance, "cam-a", W[0], "significant", 0.5)
    report_drift(instance, "cam-b", W[0], "significant", 0.5)
    assert sorted(r.job_name for r in tick()) == ["review_queue", "review_queue"]
    _report_in_run(instance, dg.DagsterRunStatus.SUCCESS, 4, {"cam-c": 4})
    assert tick() == [] and set(tick.state["owed"]) == {"cam-a", "cam-b"}
    # cam-b's reviews arrive: its loop starts; cam-a still waits for its own
    _report_in_run(instance, dg.DagsterRunStatus.SUCCESS, 2, {"cam-b": 1, "cam-c": 1})
    (loop,) = tick()
    assert loop.job_name == "learning_loop" and loop.tags["roadloop/drift_cameras"] == "cam-b"
    assert set(tick.state["owed"]) == {"cam-a"}
    _report_in_run(instance, dg.DagsterRunStatus.SUCCESS, 3, {"cam-a": 3})
    (loop,) = tick()
    assert loop.tags["roadloop/drift_cameras"] == "cam-a" and tick.state["owed"] == {}


def test_an_owed_loop_whose_reviews_never_come_starts_after_the_cooldown(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    tick = Ticker(instance, StubFleet(probe=probe))
    report_drift(instance, "cam-a", W[0], "significant", 0.5)
    assert [r.job_name for r in tick()] == ["review_queue"]
    _report_in_run(instance, dg.DagsterRunStatus.SUCCESS, 4, {"cam-c": 4})
    clock.advance(minutes=get_settings().drift_cooldown_minutes - 1)
    assert tick() == [] and set(tick.state["owed"]) == {"cam-a"}
    clock.advance(minutes=1)  # its batch was never reviewed: the reviews there are will do
    (loop,) = tick()
    assert loop.job_name == "learning_loop" and loop.tags["roadloop/drift_cameras"] == "cam-a"
    assert tick.state["owed"] == {}


# --------------------------------------------------------------------------- 3. window length


def test_a_window_cursor_of_another_length_is_snapped_to_a_window_start(
        instance: dg.DagsterInstance, clock: Clock, probe: str,
        caplog: pytest.LogCaptureFixture) -> None:
    from assets.partitions import drift_window_partitions

    s = get_settings()
    minutes, grace = s.drift_window_minutes, timedelta(seconds=s.drift_grace_s)
    length = timedelta(minutes=minutes)
    clock.now = at(5, 20) + grace + 3 * length
    snapped = at(5, 0) - length  # a window start of the current length
    odd = snapped + timedelta(minutes=7)  # a start under another length (e.g. 7 or 21 min)
    assert (odd - at(0, 0)) % length != timedelta(0)

    instance.add_dynamic_partitions("cameras", ["cam-a"])
    result = window_tick(instance, StubFleet(probe=probe, cameras=["cam-a"]), odd.isoformat())
    assert isinstance(result, dg.SensorResult), result
    windows = [r.partition_key.keys_by_dimension["window"] for r in result.run_requests]
    assert windows and all(drift_window_partitions.has_partition_key(w) for w in windows)
    expected = closed_windows(clock.now, snapped, minutes, grace)
    assert windows == [w.strftime("%Y-%m-%d-%H:%M") for w in expected]
    assert result.cursor == expected[-1].isoformat()  # the sensor moves on

    with caplog.at_level("WARNING", logger=LOG.name):
        assert window_cursor(_ctx(instance, odd.isoformat()), clock.now, minutes) == snapped
    assert "window length changed" in caplog.text
    assert window_cursor(_ctx(instance, snapped.isoformat()), clock.now, minutes) == snapped


# --------------------------------------------------------------------------- 4. future times


def test_boost_and_cooldown_times_ahead_of_the_clock_are_forgotten(
        instance: dg.DagsterInstance, clock: Clock, probe: str,
        caplog: pytest.LogCaptureFixture) -> None:
    s = get_settings()
    boost = timedelta(minutes=s.drift_boost_minutes)
    ahead = (clock.now + timedelta(days=30)).isoformat()  # the clock once ran 30 days ahead
    live = (clock.now + boost - timedelta(minutes=10)).isoformat()  # a boost that still runs
    recent = (clock.now - timedelta(minutes=10)).isoformat()  # a cooldown that still runs
    cursor = json.dumps({"after": None, "owed": {},
                         "boosted": {"cam-a": ahead, "cam-b": live},
                         "fired": {"cam-a": ahead, "cam-b": recent}})
    report_drift(instance, "cam-a", W[0], "significant", 0.6)
    report_drift(instance, "cam-b", W[0], "significant", 0.6)
    result = drift_tick(instance, StubFleet(probe=probe), cursor)
    assert [(r.job_name, r.tags["roadloop/drift_camera"]) for r in result.run_requests] == [
        ("review_queue", "cam-a")]  # cam-b still cools down, as its times say
    assert [b["camera"] for b in boosts(probe)] == ["cam-a"]  # cam-b's boost is still on
    after = json.loads(result.cursor)
    assert after["fired"] == {"cam-a": clock.now.isoformat(), "cam-b": recent}
    assert after["boosted"] == {"cam-a": (clock.now + boost).isoformat(), "cam-b": live}

    with caplog.at_level("WARNING", logger=LOG.name):
        state = drift_state(_ctx(instance, cursor), clock.now)
    assert state["boosted"] == {"cam-b": live} and state["fired"] == {"cam-b": recent}
    assert "ahead of the clock for cam-a" in caplog.text


def test_an_owed_loop_requested_ahead_of_the_clock_waits_for_an_import_from_now(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    """The debt was recorded while the clock ran 30 days ahead: an import from now on
    releases it (it waited for the clock to pass the 30 days)."""
    tick = Ticker(instance, StubFleet(probe=probe))
    report_drift(instance, "cam-a", W[0], "significant", 0.5)
    assert [r.job_name for r in tick()] == ["review_queue"]
    state = tick.state
    state["owed"]["cam-a"]["requested_at"] = (clock.now + timedelta(days=30)).timestamp()
    tick.cursor = json.dumps(state)
    assert tick() == []  # no import yet: still owed
    instance.report_runless_asset_event(  # stamped by the instance after the sensor's now
        dg.AssetMaterialization("reviewed_labels", metadata={"newly_imported": 3}))
    (loop,) = tick()
    assert loop.job_name == "learning_loop" and loop.run_key.startswith("drift-loop|cam-a|")
    assert tick.state["owed"] == {}


# --------------------------------------------------------------------------- 5. pruning


def test_ended_boosts_and_passed_cooldowns_leave_the_drift_cursor(
        instance: dg.DagsterInstance, clock: Clock, probe: str) -> None:
    s = get_settings()
    boost, cooldown = (timedelta(minutes=s.drift_boost_minutes),
                       timedelta(minutes=s.drift_cooldown_minutes))
    assert boost < cooldown
    tick = Ticker(instance, StubFleet(probe=probe))
    for i in range(5):
        report_drift(instance, f"cam-{i}", W[0], "significant", 0.5)
    assert len(tick()) == 5
    assert len(tick.state["boosted"]) == len(tick.state["fired"]) == 5

    clock.advance(minutes=s.drift_boost_minutes + 1)  # boosts over, cooldowns not
    report_drift(instance, "cam-new", W[1], "minor", 0.15)
    assert tick() == []
    assert sorted(tick.state["boosted"]) == ["cam-new"]
    assert len(tick.state["fired"]) == 5
    # a cooling camera still cools down
    report_drift(instance, "cam-0", W[2], "significant", 0.5)
    assert tick() == []

    clock.now += cooldown  # every cooldown has passed, cam-new's boost is over
    quiet = drift_tick(instance, tick.fleet, tick.cursor)  # read-only tick: pruned once
    assert isinstance(quiet, dg.SensorResult) and not quiet.run_requests
    state = json.loads(quiet.cursor)
    assert state["boosted"] == {} and state["fired"] == {}
    assert len(quiet.cursor) < len(tick.cursor)
    again = drift_tick(instance, tick.fleet, quiet.cursor)
    assert isinstance(again, dg.SkipReason)  # nothing to rewrite after that
    tick.cursor = quiet.cursor
    report_drift(instance, "cam-0", W[3], "significant", 0.5)  # responded to again
    assert [r.job_name for r in tick()] == ["review_queue"]


# --------------------------------------------------------------------------- 2. re-reviews


def test_a_review_set_pending_again_after_its_import_is_imported_again(
        fiftyone: FiftyOneResource, artifacts: ArtifactStoreResource,
        tmp_path: Path) -> None:
    from dagster._core.test_utils import create_run_for_test

    from jobs import review_import_job
    from sensors import reviews

    store = fiftyone.store()
    store.push_queue(_items(tmp_path, 2), "b1")
    ids = sorted(store.dataset().values("id"))
    bad, good = ids
    store.set_ground_truth(bad, [ReviewBox(label="not-a-class", box=(0.1, 0.1, 0.3, 0.3))])
    store.tag_reviewed(ids)
    key = pending_key(ids)

    with dg.instance_for_test() as dagster:
        def tick(cursor: str | None):
            ctx = dg.build_sensor_context(instance=dagster, cursor=cursor,
                                          resources={"fiftyone": fiftyone,
                                                     "artifacts": artifacts})
            return reviews.reviews_finished_sensor(ctx)

        def run(req: dg.RunRequest, status: dg.DagsterRunStatus) -> dg.DagsterRun:
            return create_run_for_test(dagster, job_name=review_import_job.name, status=status,
                                       tags={**req.tags, "dagster/run_key": req.run_key})

        first = tick(None)
        (req,) = first.run_requests
        assert req.run_key == f"reviews-{key}" and first.cursor == key
        # what reviewed_labels does: the bad review goes back to the queue, the good one is
        # imported; the run succeeds
        export = store.export_reviewed(artifacts.review_export_path())
        store.mark_imported(export.new_sample_ids)
        assert [r.sample_id for r in export.rejected] == [bad]
        run(req, dg.DagsterRunStatus.SUCCESS)

        # fixed and finished again; the good one is sent back by a label-quality flag and
        # re-reviewed: the same ids are pending as before
        store.set_ground_truth(bad, [ReviewBox(label="car", box=(0.1, 0.1, 0.3, 0.3))])
        store.dataset().select([good]).untag_samples("imported")
        store.tag_reviewed(ids)
        assert store.pending_reviews() == ids

        in_flight = run(req, dg.DagsterRunStatus.STARTED)  # not while an import runs
        busy = tick(first.cursor)
        assert isinstance(busy, dg.SkipReason) and "in flight" in busy.skip_message
        dagster.delete_run(in_flight.run_id)

        again = tick(first.cursor)
        assert isinstance(again, dg.SensorResult), getattr(again, "skip_message", None)
        (req2,) = again.run_requests
        mark2 = req2.tags[reviews.TAG_REVIEW_MARK]
        assert mark2 != req.tags[reviews.TAG_REVIEW_MARK] and req2.run_key == f"reviews-{key}-m{mark2}"
        assert again.cursor == f"{key}#1"
        assert [r.run_key for r in tick(first.cursor).run_requests] == [req2.run_key]  # same

        # that import succeeds but (somehow) leaves the set pending, unchanged: not again
        run(req2, dg.DagsterRunStatus.SUCCESS)
        done = tick(again.cursor)
        assert isinstance(done, dg.SkipReason) and "already launched" in done.skip_message

        # a run launched before the mark tag existed: a sample modified after it ended counts
        legacy = {k: v for k, v in req2.tags.items() if k != reviews.TAG_REVIEW_MARK}
        create_run_for_test(dagster, job_name=review_import_job.name,
                            status=dg.DagsterRunStatus.SUCCESS, tags=legacy)
        unchanged = tick(again.cursor)
        assert isinstance(unchanged, dg.SkipReason) and "already launched" in unchanged.skip_message
        time.sleep(0.05)
        store.set_ground_truth(good, [ReviewBox(label="car", box=(0.2, 0.2, 0.3, 0.3))])
        legacy_again = tick(again.cursor)
        assert isinstance(legacy_again, dg.SensorResult)
        assert legacy_again.run_requests[0].run_key not in (req.run_key, req2.run_key)
