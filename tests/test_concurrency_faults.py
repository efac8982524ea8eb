"""Concurrency faults: two of one thing at once on one piece of state.

* two edge agents on one ``--state-dir`` (``edge_agent.fsutil.StateDirLock``);
* two ``swap_dir_into_place`` into one folder (``roadloop.fsutil.sibling_lock``);
* two ``DvcStore.add_and_push`` on one DVC repo (DVC's ``--wait-for-lock``);
* two retention runs updating ``expiry_pending.json`` (``PrivacyLedger``).

The interleavings are forced with events and paused calls, not left to timing: the first party
is paused inside its critical section until the second one has reached the lock (fixed code)
or has finished its own update (the unfixed code, which takes no lock). Names added by the fix
are imported inside the tests, so on a tree without it each test fails on its own assertion.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import edge_agent.agent as agent_mod
from edge_agent.agent import AgentConfig, AgentSummary, EdgeAgent
from edge_agent.client import GatewayClient
from roadloop import fsutil
from roadloop.data.datasets import SourceSpec, Taxonomy, build_curated_dataset
from roadloop.retention.ledger import PrivacyLedger
from tests import test_fleet_gateway as gwt
from tests.helpers import synthetic_jpeg
from tests.test_datasets import make_source

make_env = gwt.make_env  # fixture: an in-process gateway

REPO = Path(__file__).resolve().parents[1]
WAIT = 30  # an upper bound for events that must come; never reached when the code is right


# --------------------------------------------------------------------------- helpers
def _agent(state: Path) -> EdgeAgent:
    cfg = AgentConfig(gateway_url="http://testserver", camera_id="cam-a", source="x",
                      model_path=state / "m.onnx", state_dir=state)
    return EdgeAgent(cfg, status_stream=io.StringIO())


def _summary() -> AgentSummary:
    return AgentSummary(camera_id="cam-a", device_id="", model_version="", stopped_by="test")


class _FlockSpy:
    """Stands in for ``roadloop.fsutil``'s ``fcntl``: counts each thread's ``flock`` calls and
    sets ``at_lock[thread name]`` just before the call (the lock file is open by then)."""

    def __init__(self, *names: str) -> None:
        import fcntl

        self._fcntl = fcntl
        self.at_lock = {n: threading.Event() for n in names}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fcntl, name)

    def flock(self, fd: int, op: int) -> None:
        me = threading.current_thread().name
        self.calls[me] = self.calls.get(me, 0) + 1
        if me in self.at_lock:
            self.at_lock[me].set()
        self._fcntl.flock(fd, op)


def _wait_any(*events: threading.Event, timeout: float = WAIT) -> bool:
    """Wait until one of ``events`` is set (woken by whichever comes first)."""
    woke = threading.Event()
    for ev in events:  # cheap polling-free fan-in: each waiter thread sets ``woke``
        threading.Thread(target=lambda e=ev: e.wait(timeout) and woke.set(), daemon=True).start()
    return woke.wait(timeout)


# --------------------------------------------------------------------------- 1+2. agents
def test_second_agent_on_one_state_dir_is_refused_and_first_agents_frame_survives(
        tmp_path, monkeypatch):
    state = tmp_path / "state"
    a, b = _agent(state), _agent(state)
    file_written, b_done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def run_a(self):  # A's frame loop spools one frame, paused between file and row
        orig = self.outbox._insert

        def paused_insert(*args):
            file_written.set()
            assert b_done.wait(WAIT)
            return orig(*args)

        self.outbox._insert = paused_insert
        self.outbox.put("f-0001", b"\xff\xd8jpeg\xff\xd9", {"frame_id": "f-0001"}, 1.0)
        result["a_items"] = [i.frame_id for i in self.outbox.due(float("inf"))]
        return _summary()

    def run_b(self):
        result["b_ran"] = True
        return _summary()

    monkeypatch.setattr(EdgeAgent, "_run", lambda self: run_a(self) if self is a else run_b(self))
    ta = threading.Thread(target=a.run, daemon=True)
    ta.start()
    assert file_written.wait(WAIT)
    try:
        b.run()  # a supervisor's restart while A still runs
    except Exception as exc:  # noqa: BLE001 - the refusal is what we check
        result["b_error"] = exc
    finally:
        b_done.set()
    ta.join(WAIT)
    assert (state / "outbox" / "spool" / "f-0001.jpg").exists(), f"A's frame lost: {result}"
    assert result.get("a_items") == ["f-0001"], result
    assert not result.get("b_ran"), "the second agent on the state dir ran"
    from edge_agent.fsutil import StateDirLocked

    err = result.get("b_error")
    assert isinstance(err, StateDirLocked), result
    assert err.pid == os.getpid()
    assert str(state) in str(err) and str(os.getpid()) in str(err)


def test_second_agent_cannot_rotate_the_first_agents_tokens(tmp_path, monkeypatch, make_env):
    env = make_env()
    state = tmp_path / "state"
    transport = env.client._transport
    real = GatewayClient

    def client_factory(url, state_dir, **kw):
        kw["transport"] = transport
        return real(url, state_dir, **kw)

    monkeypatch.setattr(agent_mod, "GatewayClient", client_factory)
    c = real("http://testserver", state, transport=transport)
    dev = c.enroll(env.enrollment_token(), "cam-a", "0.1.0")
    c.close()

    a, b = _agent(state), _agent(state)
    a_up, b_done = threading.Event(), threading.Event()
    b_clients: list[GatewayClient] = []
    result: dict[str, Any] = {}

    def run_a(self):  # A rotates its tokens after B started
        a_up.set()
        assert b_done.wait(WAIT)
        self.client.refresh()
        return _summary()

    def run_b(self):
        b_clients.append(self.client)
        return _summary()

    monkeypatch.setattr(EdgeAgent, "_run", lambda self: run_a(self) if self is a else run_b(self))
    monkeypatch.setattr(real, "close", lambda self: None)  # B's client lives on, to refresh
    ta = threading.Thread(target=a.run, daemon=True)
    ta.start()
    assert a_up.wait(WAIT)
    try:
        b.run()
    except Exception as exc:  # noqa: BLE001
        result["b_error"] = exc
    finally:
        b_done.set()
    ta.join(WAIT)
    for client in b_clients:  # B's later refresh presents the token A rotated away
        try:
            client.refresh()
        except Exception as exc:  # noqa: BLE001
            result["b_refresh"] = repr(exc)
    devices = env.client.get("/v1/devices", headers=gwt.bearer(env.admin)).json()
    status = {d["device_id"]: (d["status"], d.get("revoked_at")) for d in devices}
    assert status[dev.device_id][1] is None, f"device revoked: {status}, {result}"
    assert not b_clients, "the second agent got a client on the first one's identity"


def test_agents_one_after_another_on_one_state_dir_in_one_process(tmp_path, monkeypatch):
    """The lock goes when run() returns, also when it raises."""
    state = tmp_path / "state"
    calls: list[str] = []

    def fake_run(self):
        calls.append("run")
        if len(calls) == 2:
            raise RuntimeError("source failed")
        return _summary()

    monkeypatch.setattr(EdgeAgent, "_run", fake_run)
    _agent(state).run()
    with pytest.raises(RuntimeError):
        _agent(state).run()
    _agent(state).run()
    assert calls == ["run"] * 3
    from edge_agent.fsutil import StateDirLock

    with StateDirLock(state) as lock:  # free again
        assert lock.held
        assert (state / "agent.lock").read_text().strip() == str(os.getpid())


_HOLDER = """
import sys
from edge_agent.fsutil import StateDirLock
StateDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setattr(EdgeAgent, "_run", lambda self: _summary())
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(state)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        from edge_agent.fsutil import StateDirLocked

        with pytest.raises(StateDirLocked) as info:
            _agent(state).run()
        assert info.value.pid == proc.pid
        assert f"process {proc.pid}" in str(info.value) and str(state) in str(info.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        proc.wait(WAIT)
    assert isinstance(_agent(state).run(), AgentSummary)


def test_cli_enroll_and_run_refuse_a_locked_state_dir_with_exit_1(tmp_path, monkeypatch, capsys):
    from edge_agent import cli
    from edge_agent import client as client_mod

    state = tmp_path / "state"

    def no_client(*a, **kw):
        raise AssertionError("the gateway was contacted for a state dir in use")

    monkeypatch.setattr(client_mod, "GatewayClient", no_client)
    monkeypatch.setattr(agent_mod, "GatewayClient", no_client)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")  # run must stop before loading it
    from edge_agent.fsutil import StateDirLock

    common = ["--gateway", "http://127.0.0.1:9", "--enroll-token", "t", "--camera-id", "cam-a",
              "--state-dir", str(state)]
    with StateDirLock(state):
        rc_enroll = cli.main(["enroll", *common])
        err_enroll = capsys.readouterr().err
        rc_run = cli.main(["run", *common, "--source", "x", "--model", str(model)])
        err_run = capsys.readouterr().err
    for rc, err in ((rc_enroll, err_enroll), (rc_run, err_run)):
        assert rc == 1, err
        assert "in use" in err and str(state) in err and str(os.getpid()) in err, err


# --------------------------------------------------------------------------- 3. swaps
class _PausingOs:
    """``roadloop.fsutil``'s ``os`` with ``replace`` paused in thread ``swap-A`` right after
    it moved the old folder aside, until ``resume`` is set."""

    def __init__(self, aside: threading.Event, resume: threading.Event) -> None:
        self.aside, self.resume = aside, resume

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src, dst) -> None:
        os.replace(src, dst)
        if threading.current_thread().name == "swap-A" and Path(dst).name.startswith(".old-"):
            self.aside.set()
            assert self.resume.wait(WAIT)


def _a_then_b(a: tuple[str, Callable[[], Any]], b: tuple[str, Callable[[], Any]],
              a_paused: threading.Event, b_at_lock: threading.Event,
              resume: threading.Event) -> dict[str, BaseException]:
    """Run ``a`` in a thread until it pauses (``a_paused``), then ``b``; let ``a`` go on once
    ``b`` waits for the lock (``b_at_lock``) or, without one, has finished. The errors each
    raised, by thread name."""
    errors: dict[str, BaseException] = {}
    b_done = threading.Event()

    def call(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            errors[name] = exc
        finally:
            if name == b[0]:
                b_done.set()

    ta = threading.Thread(target=call, args=a, name=a[0])
    tb = threading.Thread(target=call, args=b, name=b[0])
    ta.start()
    assert a_paused.wait(WAIT)
    tb.start()
    assert _wait_any(b_at_lock, b_done)
    resume.set()
    ta.join(WAIT)
    tb.join(WAIT)
    assert not ta.is_alive() and not tb.is_alive()
    return errors


def _race_swaps(monkeypatch, swap_a, swap_b) -> dict[str, BaseException]:
    """A pauses between moving the old folder aside and renaming its own in; B starts then,
    and A resumes once B waits for the lock (or, without one, has finished its swap)."""
    a_aside, resume = threading.Event(), threading.Event()
    spy = _FlockSpy("swap-B")
    monkeypatch.setattr(fsutil, "os", _PausingOs(a_aside, resume))
    monkeypatch.setattr(fsutil, "fcntl", spy, raising=False)
    return _a_then_b(("swap-A", swap_a), ("swap-B", swap_b), a_aside, spy.at_lock["swap-B"],
                     resume)


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "content.txt").write_text(text)
    return path


def test_two_swaps_into_one_folder_both_succeed_last_wins_nothing_left(tmp_path, monkeypatch):
    final = _folder(tmp_path / "out" / "reports", "old")
    tmp_a = _folder(tmp_path / "out" / ".tmp-reports-a", "A")
    tmp_b = _folder(tmp_path / "out" / ".tmp-reports-b", "B")
    errors = _race_swaps(monkeypatch,
                         lambda: fsutil.swap_dir_into_place(tmp_a, final),
                         lambda: fsutil.swap_dir_into_place(tmp_b, final))
    left = sorted(p.name for p in final.parent.iterdir() if p != final)
    assert not errors, f"a swap failed: {errors!r}; beside it: {left}"
    assert not left, f"left beside the folder: {left}"
    assert (final / "content.txt").read_text() == "B"  # B took its turn after A


def test_two_builds_of_one_curated_dataset_at_once(tmp_path, monkeypatch):
    tax = Taxonomy(classes=["car", "truck"], sources={"cam": {"car": "car", "lorry": "truck"}})
    src = make_source(tmp_path / "src", {0: "car", 1: "lorry"}, {
        "train": [(f"t{i}", synthetic_jpeg(i), "0 0.5 0.5 0.1 0.1") for i in range(3)],
        "val": [("v", synthetic_jpeg(9), "1 0.5 0.5 0.2 0.2")],
    })
    out = tmp_path / "dvc" / "curated"
    spec = [SourceSpec(name="cam", root=src)]
    build_curated_dataset(spec, out, tax, 0.0, progress=False)  # yesterday's version

    def build() -> None:
        build_curated_dataset(spec, out, tax, 0.0, progress=False)

    errors = _race_swaps(monkeypatch, build, build)
    left = sorted(p.name for p in out.parent.iterdir() if p != out)
    assert not errors, f"a run failed: {errors!r}; beside it: {left}"
    assert not left, f"left beside the dataset: {left}"
    assert (out / "manifest.jsonl").is_file()


def test_sibling_lock_waiter_on_a_removed_lock_file_takes_the_new_one(tmp_path, monkeypatch):
    """The holder removes the lock file as it leaves; a waiter that had it open must not hold
    the removed file's lock while a newcomer locks the new file."""
    target = tmp_path / "x"
    spy = _FlockSpy("waiter")
    monkeypatch.setattr(fsutil, "fcntl", spy, raising=False)
    inside: list[str] = []
    with fsutil.sibling_lock(target) as lock_file:
        assert lock_file == tmp_path / ".x.lock" and lock_file.exists()

        def waiter() -> None:
            with fsutil.sibling_lock(target):
                inside.append("waiter")

        t = threading.Thread(target=waiter, name="waiter")
        t.start()
        assert spy.at_lock["waiter"].wait(WAIT)  # it has the current lock file open
        inside.append("holder")
    t.join(WAIT)
    assert inside == ["holder", "waiter"]
    assert spy.calls["waiter"] == 2  # locked the removed file, saw it, took the new one
    assert not (tmp_path / ".x.lock").exists()


# --------------------------------------------------------------------------- 4. DVC
def test_dvc_commands_that_take_the_repo_lock_wait_for_it(tmp_path, monkeypatch):
    from roadloop.data import versioning

    seen: list[list[str]] = []

    def fake_run(cmd, **kw):
        seen.append(cmd[3:])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(versioning.subprocess, "run", fake_run)
    store = versioning.DvcStore(tmp_path / "dvc", str(tmp_path / "remote"))
    for args in (("add", "data/curated"), ("push", "data/curated.dvc"), ("pull", "x.dvc")):
        seen.clear()
        store._dvc(*args, wait_for_lock=True)
        assert seen == [["--wait-for-lock", *args]], seen  # a global option: before the command
    seen.clear()
    store._dvc("config", "core.analytics", "false")
    assert seen == [["config", "core.analytics", "false"]]


def test_add_and_push_waits_while_another_run_holds_the_dvc_lock(tmp_path, monkeypatch):
    """Another run's long ``dvc push`` holds DVC's repo lock; without ``--wait-for-lock`` DVC
    retries for 3 s and fails. The lock is held 8 s after the ``dvc add`` process starts."""
    from dvc.lock import make_lock

    from roadloop.data import versioning

    store = versioning.DvcStore(tmp_path / "dvc", str(tmp_path / "remote"))
    store.ensure()
    data = tmp_path / "dvc" / "data" / "curated"
    data.mkdir(parents=True)
    (data / "manifest.jsonl").write_text("{}\n")
    started = threading.Event()
    real_run = subprocess.run

    def run(cmd, **kw):
        if "add" in cmd:
            started.set()
        return real_run(cmd, **kw)

    monkeypatch.setattr(versioning.subprocess, "run", run)
    tmp_dir = tmp_path / "dvc" / ".dvc" / "tmp"
    lock = make_lock(str(tmp_dir / "lock"), tmp_dir=str(tmp_dir))
    lock.lock()
    outcome: dict[str, Any] = {}

    def second_run() -> None:
        try:
            outcome["version"] = store.add_and_push(data)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    t = threading.Thread(target=second_run)
    try:
        t.start()
        assert started.wait(WAIT)
        t.join(8)  # > DVC's 3 s retry plus its start-up
        assert "error" not in outcome, f"failed instead of waiting: {outcome['error']}"
        assert t.is_alive()
    finally:
        lock.unlock()  # the other run's push is done
    t.join(120)
    assert "version" in outcome, outcome


# --------------------------------------------------------------------------- 5. retention
def _race_ledger(tmp_path, monkeypatch, first, second) -> list[tuple[str, str]]:
    """A runs ``first`` and pauses right before its write; B runs ``second`` then, and A
    resumes once B waits for the lock (or, without one, has written its own update)."""
    ledger_a, ledger_b = PrivacyLedger(tmp_path / "privacy"), PrivacyLedger(tmp_path / "privacy")
    a_read, resume = threading.Event(), threading.Event()
    spy = _FlockSpy("run-B")
    monkeypatch.setattr(fsutil, "fcntl", spy, raising=False)
    orig_write = ledger_a._write_pending

    def paused_write(pairs):
        a_read.set()
        assert resume.wait(WAIT)
        orig_write(pairs)

    ledger_a._write_pending = paused_write  # type: ignore[method-assign]
    errors = _a_then_b(("run-A", lambda: first(ledger_a)), ("run-B", lambda: second(ledger_b)),
                       a_read, spy.at_lock["run-B"], resume)
    assert not errors, errors
    return PrivacyLedger(tmp_path / "privacy").pending_expired_frames()


def test_two_retention_runs_journalling_at_once_keep_both_runs_frames(tmp_path, monkeypatch):
    pending = _race_ledger(tmp_path, monkeypatch,
                           lambda led: led.add_pending_expired([("cam-a", "f-run-a")]),
                           lambda led: led.add_pending_expired([("cam-b", "f-run-b")]))
    assert pending == [("cam-a", "f-run-a"), ("cam-b", "f-run-b")]
    assert sorted(p.name for p in (tmp_path / "privacy").iterdir()) == ["expiry_pending.json"]


def test_a_confirm_does_not_drop_frames_another_run_just_journalled(tmp_path, monkeypatch):
    PrivacyLedger(tmp_path / "privacy").add_pending_expired([("cam-a", "x1"), ("cam-a", "x2")])
    pending = _race_ledger(tmp_path, monkeypatch,
                           lambda led: led.confirm_expired([("cam-a", "x1")]),
                           lambda led: led.add_pending_expired([("cam-b", "y1")]))
    assert pending == [("cam-a", "x2"), ("cam-b", "y1")]


def test_confirm_without_a_privacy_folder_creates_nothing(tmp_path):
    assert PrivacyLedger(tmp_path / "privacy").confirm_expired([("cam-a", "x")]) == 0
    assert not (tmp_path / "privacy").exists()
