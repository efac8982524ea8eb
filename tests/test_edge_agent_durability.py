"""Edge agent durability over long runs: a token pair whose save failed, renames that survive a
power cut, clock steps during the uploader's pause and in the outboxes' schedules, a full
disk under SQLite, leftovers of interrupted model copies, journals that stay bounded in a
run, and traffic records dropped from the full record outbox reported in the heartbeat."""

from __future__ import annotations

import collections
import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

import edge_agent.agent as agent_mod
import edge_agent.identity as identity_mod
from edge_agent import fsutil
from edge_agent.agent import EdgeAgent
from edge_agent.client import GatewayClient, UploadOutcome
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.identity import DeviceIdentity
from edge_agent.model_store import ModelStore, UpdaterState
from edge_agent.outbox import MAX_RETRY_AFTER_S, BackoffPolicy, Outbox, OutboxError
from edge_agent.record_outbox import JOURNAL_KEEP_S, RecordOutbox

REPO = Path(__file__).resolve().parents[1]
YEAR = 365 * 86400.0


# --------------------------------------------------------------------------- 1. tokens
class RotatingGateway:
    """Refresh tokens rotate; a rotated-away one is refused (reuse)."""

    def __init__(self) -> None:
        self.n = 0
        self.refresh, self.access = "r0", "a0"

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/token/refresh":
            if json.loads(req.content)["refresh_token"] != self.refresh:
                return httpx.Response(401, json={"detail": "refresh token was already used"})
            self.n += 1
            self.refresh, self.access = f"r{self.n}", f"a{self.n}"
            return httpx.Response(200, json={"access_token": self.access,
                                             "refresh_token": self.refresh,
                                             "expires_in": 3600})
        if req.headers.get("authorization") != f"Bearer {self.access}":
            return httpx.Response(401, json={"detail": "unknown access token"})
        return httpx.Response(202, json={})


def test_rotated_pair_whose_save_failed_is_saved_before_the_next_request(tmp_path, monkeypatch,
                                                                          caplog):
    DeviceIdentity(device_id="d1", camera_id="cam", gateway_url="http://gw", access_token="a0",
                   refresh_token="r0", expires_at=time.time() - 10).save(tmp_path)
    gw = RotatingGateway()
    c = GatewayClient("http://gw", tmp_path, transport=httpx.MockTransport(gw))
    real = identity_mod.write_text_atomic

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(identity_mod, "write_text_atomic", enospc)
    with caplog.at_level("ERROR", logger="edge_agent.client"):
        # the refresh succeeds at the gateway; the save fails: reported, not raised, and the
        # request goes on with the new (only valid) pair
        assert c.post_heartbeat("{}").acknowledged
        assert c.post_heartbeat("{}").acknowledged  # the retried save fails again
    assert gw.n == 1
    assert "No space left" in (c.identity_save_error or "")
    assert sum("cannot save the rotated token pair" in r.message for r in caplog.records) == 1
    assert DeviceIdentity.load(tmp_path).refresh_token == "r0"  # stale on disk, for now

    monkeypatch.setattr(identity_mod, "write_text_atomic", real)  # room again
    assert c.post_heartbeat("{}").acknowledged
    assert c.identity_save_error is None
    c.close()
    # a restart now presents the live refresh token
    assert DeviceIdentity.load(tmp_path).refresh_token == gw.refresh == "r1"
    c2 = GatewayClient("http://gw", tmp_path, transport=httpx.MockTransport(gw))
    c2.refresh()
    assert gw.n == 2 and DeviceIdentity.load(tmp_path).refresh_token == "r2"
    c2.close()


def test_identity_and_updater_state_renames_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: (synced.append(str(p)), real(p)))
    DeviceIdentity(device_id="d", camera_id="c", gateway_url="http://gw", access_token="a",
                   refresh_token="r", expires_at=time.time() + 3600).save(tmp_path / "id")
    UpdaterState(status="idle").save(tmp_path / "up" / "updater.json")
    assert str(tmp_path / "id") in synced
    assert str(tmp_path / "up") in synced
    assert (tmp_path / "id" / "identity.json").stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- 2. uploader pause
class SteppingClock:
    """The wall clock a year fast until ``stepped``; monotonic and sleep are real."""

    def __init__(self) -> None:
        self.stepped = False

    def time(self) -> float:
        return time.time() + (0 if self.stepped else YEAR)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, s: float) -> None:
        time.sleep(s)


def test_uploader_pause_is_not_stretched_by_a_wall_clock_step_back(monkeypatch):
    clock = SteppingClock()
    monkeypatch.setattr(agent_mod, "time", clock)
    a = EdgeAgent.__new__(EdgeAgent)
    a._uploads_stop = threading.Event()
    a._wake_uploader = threading.Event()
    a._kill_after = 0
    a.client = None
    a.outbox = type("O", (), {"backoff": BackoffPolicy(1.0, 2.0)})()
    a.config = type("C", (), {"upload_batch_max": 4})()
    rounds: list[float] = []
    second = threading.Event()

    def fake_round(uploader, now):
        rounds.append(now)
        if len(rounds) == 1:
            # NTP steps the clock back a year 0.1 s into the pause
            threading.Timer(0.1, lambda: setattr(clock, "stepped", True)).start()
            return 0.5
        second.set()
        a._uploads_stop.set()
        return None

    a._upload_round = fake_round
    t = threading.Thread(target=a._upload_loop, daemon=True)
    t.start()
    try:
        assert second.wait(10.0), "no second upload round 10 s after a 0.5 s pause"
    finally:
        a._uploads_stop.set()
        a._wake_uploader.set()
        t.join(5)
    # the rounds are still handed wall-clock time (the outbox schedules on it)
    assert rounds[1] < rounds[0] - YEAR / 2


# --------------------------------------------------------------------------- 3. schedules
def test_items_failed_while_the_clock_was_fast_are_due_after_the_step_back(tmp_path):
    t = time.time()
    later = t + 2 * MAX_RETRY_AFTER_S
    with Outbox(tmp_path / "o", backoff=BackoffPolicy(1.0, 60.0), seed=1) as ob, \
            RecordOutbox(tmp_path / "r", backoff=BackoffPolicy(1.0, 60.0)) as rb:
        ob.put("fast", b"\xff\xd8a", {}, 0.5, now=t + YEAR)
        ob.fail("fast", "gateway down", now=t + YEAR, retry_after=30)
        ob.put("normal", b"\xff\xd8b", {}, 0.5, now=later)
        ob.fail("normal", "gateway down", now=later, retry_after=MAX_RETRY_AFTER_S)
        assert [i.frame_id for i in ob.due(now=later)] == ["fast"]
        assert ob.next_due_at(now=later) == later
        rb.put("cam.1.0", {"n": 1}, now=t + YEAR)
        rb.fail("cam.1.0", "gateway down", now=t + YEAR)
        rb.put("cam.2.0", {"n": 2}, now=later)
        rb.fail("cam.2.0", "gateway down", now=later, retry_after=MAX_RETRY_AFTER_S)
        assert [r.record_id for r in rb.due(now=later)] == ["cam.1.0"]
        assert rb.next_due_at(now=later) == later
        # the ordinary backoff (within the horizon) is kept
        ob.ack("fast", now=later)
        rb.ack("cam.1.0", now=later)
        assert ob.due(now=later) == [] and rb.due(now=later) == []
        assert ob.next_due_at(now=later) == pytest.approx(later + MAX_RETRY_AFTER_S)
        assert rb.next_due_at(now=later) == pytest.approx(later + MAX_RETRY_AFTER_S)


# --------------------------------------------------------------------------- 4. full disk
def test_put_on_a_full_database_leaves_no_spool_file_and_names_the_error(tmp_path):
    ob = Outbox(tmp_path / "o", max_bytes=10**9)
    pages = ob._db.execute("PRAGMA page_count").fetchone()[0]
    ob._db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's disk is full
    errors = []
    for i in range(20):
        try:
            ob.put(f"f{i}", b"\xff\xd8" + b"x" * 4000, {"pad": "y" * 3000}, 0.5)
        except OutboxError as exc:
            errors.append(str(exc))
    assert errors, "SQLite never filled up"
    assert all("full" in e and "cannot rollback" not in e for e in errors), errors
    referenced = {f"{r[0]}.jpg" for r in ob._db.execute("SELECT frame_id FROM outbox")}
    assert set(os.listdir(ob.spool)) == referenced
    assert not ob._db.in_transaction
    ob._db.execute("PRAGMA max_page_count=1000000")  # room again: the outbox works on
    assert ob.put("after", b"\xff\xd8z", {}, 0.5).queued
    ob.close()

    rb = RecordOutbox(tmp_path / "r")
    pages = rb._db.execute("PRAGMA page_count").fetchone()[0]
    rb._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(Exception) as info:
        for i in range(200):
            rb.put(f"cam.{i}.0", {"pad": "z" * 2000})
    assert "full" in str(info.value) and "cannot rollback" not in str(info.value)
    assert not rb._db.in_transaction
    rb._db.execute("PRAGMA max_page_count=1000000")
    assert rb.put("cam.after.0", {"n": 1})
    rb.close()


# --------------------------------------------------------------------------- 5. model store
CRASHING_ADOPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    import edge_agent.fsutil as fsutil
    from edge_agent.model_slot import LoadedModel
    from edge_agent.model_store import ModelStore
    src, models = Path(sys.argv[1]), Path(sys.argv[2])
    def crash(*a, **k):  # power cut after the copy, before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    fsutil.os.replace = crash
    ModelStore(models, client=None).adopt(LoadedModel(None, "a" * 64, src))
""")


def test_interrupted_model_copy_is_removed_at_start_up(tmp_path):
    src = tmp_path / "started_with.onnx"
    src.write_bytes(os.urandom(64 * 1024))
    models = tmp_path / "models"
    models.mkdir()
    r = subprocess.run([sys.executable, "-c", CRASHING_ADOPT, str(src), str(models), str(REPO)],
                       check=False, timeout=60)
    assert r.returncode == -9
    assert [p for p in models.iterdir() if ".tmp-" in p.name]
    (models / ("b" * 64 + ".onnx")).write_bytes(b"model")
    ModelStore(models, client=None)  # the restarted agent's updater creates its store
    assert sorted(p.name for p in models.iterdir()) == ["b" * 64 + ".onnx"]


def test_prune_removes_stale_temp_files_but_not_a_copy_in_progress(tmp_path):
    models = tmp_path / "models"
    store = ModelStore(models, client=None)
    models.mkdir()
    live = models / f".{'c' * 64}.onnx.tmp-0123456789ab"  # another thread is writing it
    live.write_bytes(b"half a model")
    stale = models / f".{'d' * 64}.onnx.tmp-ba9876543210"  # a copy cut off long ago
    stale.write_bytes(b"half a model")
    old = time.time() - 86400  # well past model_store.TMP_LEFTOVER_AGE_S
    os.utime(stale, (old, old))
    keep = models / ("e" * 64 + ".onnx")
    keep.write_bytes(b"model")
    store.prune(keep=["e" * 64])
    assert sorted(p.name for p in models.iterdir()) == sorted([live.name, keep.name])


# --------------------------------------------------------------------------- 6. journals
def test_journals_are_pruned_during_a_long_run(tmp_path):
    with Outbox(tmp_path / "o", journal_max_rows=20) as ob:
        for i in range(300):
            ob.put(f"f{i}", b"\xff\xd8", {}, 0.5)
            ob.ack(f"f{i}")
        assert len(ob.journal()) <= 20 + 2  # a tenth over the bound at most
        assert "f299" in ob.journal()  # the newest are remembered
    t0 = time.time() - 60 * 86400
    with RecordOutbox(tmp_path / "r") as rb:
        for hour in range(60 * 24):  # one record an hour for 60 days, in one run
            now = t0 + hour * 3600
            rb.put(f"cam.{hour}.0", {"n": hour}, now=now)
            rb.ack(f"cam.{hour}.0", now=now)
        last = t0 + (60 * 24 - 1) * 3600
        kept = [int(r.split(".")[1]) for r in rb.journal()]
        assert min(kept) * 3600 + t0 >= last - JOURNAL_KEEP_S - 3600
        assert len(kept) <= JOURNAL_KEEP_S // 3600 + 2


# --------------------------------------------------------------------------- 7. heartbeat
class HeartbeatSink:
    identity = None

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def post_heartbeat(self, body: str) -> UploadOutcome:
        self.sent.append(json.loads(body))
        return UploadOutcome("stored", 202)


def test_heartbeat_reports_the_record_outbox_and_the_gateway_accepts_it(tmp_path):
    from fleet.schemas import HeartbeatIn

    a = EdgeAgent.__new__(EdgeAgent)
    a.outbox = Outbox(tmp_path / "outbox")
    a.records = RecordOutbox(tmp_path / "outbox", max_records=3)
    for i in range(10):  # the gateway is down: 7 records dropped
        a.records.put(f"cam.{i}.0", {"n": i}, now=1000.0 + i)
    a.client = HeartbeatSink()
    a.telemetry = TelemetryWindow("cam", "m" * 64, ["car"])
    a.slot = type("S", (), {"sha256": "m" * 64, "detector": None})()
    a.updater = a.camera_config = a.summary = a.traffic = a.redactor = None
    a.redaction_error, a._logged_gaps = None, None
    a._hb_lock = threading.Lock()
    a._pending_heartbeats = collections.deque(maxlen=20)
    a._send_heartbeat()
    hb = a.client.sent[-1]
    assert hb["record_outbox_depth"] == 3
    assert hb["record_outbox_evicted_total"] == 7
    accepted = HeartbeatIn.model_validate(hb)
    assert accepted.record_outbox_evicted_total == 7
    old_agent = {k: v for k, v in hb.items() if not k.startswith("record_outbox")}
    assert HeartbeatIn.model_validate(old_agent).record_outbox_evicted_total is None
    a.outbox.close()
    a.records.close()
