"""Retention cut off between its local deletion and the gateway's: the expired frames are
journalled in the privacy ledger before any is deleted, the failed run fails visibly, and the
next run sends them to the gateway again until it confirms (``ops.retention``,
``roadloop.retention.ledger``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import FrameStore
from roadloop.errors import RoadloopError
from roadloop.retention.ledger import PrivacyLedger
from roadloop.retention.policy import expire_frames

from .helpers import synthetic_jpeg

JPEG = synthetic_jpeg(0, (32, 24))


def _put(store: FrameStore, camera: str, frame_id: str, at: datetime) -> Path:
    rec = FrameRecord(frame_id=frame_id, camera_id=camera, captured_at=at, source="test",
                      width=32, height=24)
    return store.write_frame(rec, JPEG).path


def _ids(store: FrameStore) -> set[str]:
    return {r.frame_id for c in store.cameras() for r, _ in store.iter_frames(c)}


# --------------------------------------------------------------------------- the ledger
def test_ledger_journals_pending_expired_frames_until_confirmed(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy")
    assert ledger.pending_expired_frames() == []
    assert ledger.add_pending_expired([("cam-b", "f1"), ("cam-a", "f2")]) == 2
    assert ledger.add_pending_expired([("cam-a", "f2"), ("cam-a", "f3")]) == 1
    # Another ledger object on the same folder (the next run) sees them.
    again = PrivacyLedger(tmp_path / "privacy")
    assert again.pending_expired_frames() == [("cam-a", "f2"), ("cam-a", "f3"), ("cam-b", "f1")]
    assert again.confirm_expired([("cam-a", "f2"), ("cam-x", "nope")]) == 2
    assert ledger.pending_expired_frames() == [("cam-a", "f3"), ("cam-b", "f1")]
    assert ledger.confirm_expired([("cam-a", "f3"), ("cam-b", "f1")]) == 0
    assert ledger.pending_expired_frames() == [] and not ledger.expiry_pending_path.exists()


def test_a_damaged_pending_journal_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy")
    ledger.add_pending_expired([("cam-a", "f1")])
    ledger.expiry_pending_path.write_text("{not json")
    with pytest.raises(RoadloopError, match="expiry_pending.json is unreadable"):
        ledger.pending_expired_frames()


def test_expire_frames_announces_the_frames_before_deleting_any(tmp_path: Path) -> None:
    store = FrameStore(tmp_path / "frames")
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    for d in (1, 40, 45):
        _put(store, "cam-a", f"d{d}", now - timedelta(days=d))
    seen: list[tuple[str, set[str]]] = []

    def planned(frames: list) -> None:  # every frame is still there when it is called
        seen.append(("planned", {f.frame_id for f in frames}))
        assert _ids(store) == {"d1", "d40", "d45"}

    report = expire_frames(store, now - timedelta(days=30), on_planned=planned,
                           artifacts_dir=tmp_path / "artifacts")
    assert seen == [("planned", {"d40", "d45"})]
    assert {f.frame_id for f in report.deleted} == {"d40", "d45"}

    _put(store, "cam-a", "d50", now - timedelta(days=50))

    def refuse(frames: list) -> None:
        raise OSError("ledger disk full")

    with pytest.raises(OSError, match="disk full"):
        expire_frames(store, now - timedelta(days=30), on_planned=refuse,
                      artifacts_dir=tmp_path / "artifacts")
    assert "d50" in _ids(store)  # nothing deleted when the journal could not be written


# --------------------------------------------------------------------------- the op
class _Review:
    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.fail = False

    def reviewed_frame_keys(self) -> set[str]:
        return set()

    def delete_frames(self, keys: Any) -> int:
        keys = list(keys)
        if self.fail:
            raise RuntimeError("review store went away")
        self.deleted += keys
        return len(keys)


class _Gateway:
    """What the gateway holds and whether it answers."""

    def __init__(self, rows: set[tuple[str, str]]) -> None:
        self.rows = set(rows)
        self.up = True
        self.calls: list[list[tuple[str, str]]] = []

    def expire(self, frames: list[tuple[str, str]]) -> dict[str, int]:
        """``POST /v1/privacy/expire`` as the fake answers it: the rows it holds go."""
        if not self.up:
            from resources.fleet_resource import FleetUnavailable

            raise FleetUnavailable("fleet gateway unreachable (test)")
        self.calls.append(sorted(frames))
        hit = self.rows & set(frames)
        self.rows -= hit
        return {"frames_deleted": len(hit), "bytes_deleted": 0, "heartbeats_deleted": 0,
                "traffic_records_deleted": 0}


@pytest.fixture()
def op_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import ops.retention as retention_ops
    from resources import FiftyOneResource, FleetResource, FrameStoreResource
    from resources.fleet_resource import FleetUnavailable

    ledger = PrivacyLedger(tmp_path / "privacy")
    monkeypatch.setattr(retention_ops, "_ledger", lambda: ledger)
    review = _Review()
    gateway = _Gateway(set())

    class Review(FiftyOneResource):
        def store(self) -> Any:
            return review

    class Fleet(FleetResource):
        def expire(self, frames: list[tuple[str, str]], heartbeats_before: Any,
                   traffic_before: Any, batch: int = 1000) -> dict[str, int]:
            return gateway.expire(frames)

    store = FrameStore(tmp_path / "frames")
    now = datetime.now(UTC)
    for i, days in enumerate((40, 41, 1)):
        _put(store, "cam-a", f"f{i}", now - timedelta(days=days))
    gateway.rows = {("cam-a", "f0"), ("cam-a", "f1"), ("cam-a", "f2")}
    resources = {"frame_store": FrameStoreResource(root=str(tmp_path / "frames")),
                 "fiftyone": Review(), "fleet": Fleet(gateway_url="http://gateway.invalid",
                                                      admin_token="t")}
    return {"resources": resources, "store": store, "gateway": gateway, "review": review,
            "ledger": ledger, "unavailable": FleetUnavailable}


def _run(resources: dict[str, Any]) -> dict[str, Any]:
    import dagster as dg

    from ops.retention import enforce_retention

    return enforce_retention(dg.build_op_context(resources=resources)).value


def test_gateway_down_then_the_next_run_deletes_the_gateway_rows(op_env: dict[str, Any]) -> None:
    gw, store, ledger = op_env["gateway"], op_env["store"], op_env["ledger"]
    gw.up = False
    with pytest.raises(op_env["unavailable"]):  # the failed run fails visibly
        _run(op_env["resources"])
    assert _ids(store) == {"f2"}  # local copies went
    assert gw.rows == {("cam-a", "f0"), ("cam-a", "f1"), ("cam-a", "f2")}
    assert ledger.pending_expired_frames() == [("cam-a", "f0"), ("cam-a", "f1")]

    gw.up = True
    out = _run(op_env["resources"])
    assert gw.calls[-1] == [("cam-a", "f0"), ("cam-a", "f1")]
    assert gw.rows == {("cam-a", "f2")}
    assert out["frames_deleted"] == 0  # nothing new locally
    assert out["gateway_frames_pending_from_earlier_runs"] == 2
    assert out["gateway_frame_rows_deleted"] == 2
    assert out["gateway_frames_still_pending"] == 0
    assert ledger.pending_expired_frames() == []

    out = _run(op_env["resources"])  # confirmed: not sent again
    assert gw.calls[-1] == [] and out["gateway_frames_pending_from_earlier_runs"] == 0


def test_cut_off_after_the_local_deletion_the_next_run_finishes(op_env: dict[str, Any]) -> None:
    """The run dies after deleting the files, before the review samples and the gateway
    (here: the review store fails); the next run does both."""
    gw, review, store = op_env["gateway"], op_env["review"], op_env["store"]
    review.fail = True
    with pytest.raises(RuntimeError, match="review store went away"):
        _run(op_env["resources"])
    assert _ids(store) == {"f2"} and gw.calls == []
    review.fail = False
    out = _run(op_env["resources"])
    assert sorted(review.deleted) == ["cam-a/f0", "cam-a/f1"]
    assert gw.rows == {("cam-a", "f2")}
    assert out["gateway_frames_pending_from_earlier_runs"] == 2
    assert out["review_samples_deleted"] == 2


def test_a_normal_run_sends_this_runs_frames_and_leaves_nothing_pending(
    op_env: dict[str, Any],
) -> None:
    out = _run(op_env["resources"])
    assert op_env["gateway"].calls == [[("cam-a", "f0"), ("cam-a", "f1")]]
    assert out["frames_deleted"] == 2 and out["gateway_frame_rows_deleted"] == 2
    assert out["gateway_frames_pending_from_earlier_runs"] == 0
    assert op_env["ledger"].pending_expired_frames() == []


def test_a_pending_frame_protected_since_is_kept_not_sent(op_env: dict[str, Any]) -> None:
    """A frame journalled by a failed run, then taken into a curated dataset version before
    the next run: retention never expires a protected frame, so it leaves the journal
    without a gateway call (its row stays with the version)."""
    gw, ledger = op_env["gateway"], op_env["ledger"]
    ledger.add_pending_expired([("cam-a", "f0"), ("cam-a", "gone")])
    ledger.record_version_frames("abc123", ["cam-a/f0", "cam-a/f1"])
    out = _run(op_env["resources"])
    assert gw.calls == [[("cam-a", "gone")]]
    assert out["gateway_frames_pending_from_earlier_runs"] == 1
    assert ledger.pending_expired_frames() == [] and ("cam-a", "f0") in gw.rows
