"""``/metrics`` with ``--workers N``: prometheus_client's multiprocess mode sums every worker's
counters (fleet/metrics.py). Worker processes are forks of one subprocess (the mode is chosen
when prometheus_client is imported, so it cannot be switched on inside the test process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fleet.metrics import MULTIPROC_ENV, GatewayMetrics, prepare_multiprocess_dir

REPO = Path(__file__).resolve().parents[1]
# Two "workers" answer 1 and 2 requests, store a frame and count an event each; then the
# parent (a third worker, which did nothing) renders the scrape.
WORKERS = """
import os, sys
from fleet.metrics import GatewayMetrics
from fleet.runtime import Stats
m, stats = GatewayMetrics(), Stats()
if m.multiprocess:
    stats.listener = m.count_event
pids = []
for worker in range(2):
    pid = os.fork()
    if pid == 0:
        for _ in range(worker + 1):
            m.observe("GET", "/healthz", 200, 0.01)
        m.frame_stored(100)
        stats.count("frames_duplicate")
        os._exit(0)
    pids.append(pid)
for pid in pids:
    assert os.waitpid(pid, 0)[1] == 0
sys.stdout.write(m.render().decode())
"""


def scrape(env: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    run = subprocess.run([sys.executable, "-c", WORKERS], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False,
                         env={**env, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(run.stdout) for s in family.samples}


def test_a_scrape_sums_every_worker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    folder = tmp_path / "multiproc"
    folder.mkdir()  # serve makes it (prepare_multiprocess_dir)
    found = scrape({**env, MULTIPROC_ENV: str(folder)})
    route = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    assert found[("roadloop_gateway_requests_total", route)] == 3.0
    assert found[("roadloop_gateway_request_duration_seconds_count", route[:2])] == 3.0
    assert found[("roadloop_gateway_intake_frames_total", ())] == 2.0
    assert found[("roadloop_gateway_intake_bytes_total", ())] == 200.0
    assert found[("roadloop_gateway_events_total", (("event", "frames_duplicate"),))] == 2.0
    assert list(folder.glob("*.db"))  # the workers' files
    # without the variable (this test process) the mode is off: one process's own counters
    assert GatewayMetrics().multiprocess is False


def test_serve_prepares_an_empty_folder_named_in_the_environment(
        tmp_path: Path, monkeypatch: object) -> None:
    mp = monkeypatch  # pytest.MonkeyPatch
    # setenv first, so that monkeypatch restores the variable's original absence at teardown:
    # prepare_multiprocess_dir sets it in os.environ, and a leaked value would put every later
    # gateway subprocess of this test process into one shared multiprocess folder.
    mp.setenv(MULTIPROC_ENV, "unset-below")  # type: ignore[attr-defined]
    mp.delenv(MULTIPROC_ENV)  # type: ignore[attr-defined]
    default = tmp_path / "fleet" / "prometheus-multiproc"
    assert prepare_multiprocess_dir(default) == str(default)
    assert os.environ[MULTIPROC_ENV] == str(default) and default.is_dir()
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "counter_123.db").write_bytes(b"stale")  # an earlier run's worker
    (chosen / "keep.txt").write_text("not ours")
    mp.setenv(MULTIPROC_ENV, str(chosen))  # type: ignore[attr-defined]
    assert prepare_multiprocess_dir(default) == str(chosen)
    assert sorted(p.name for p in chosen.iterdir()) == ["keep.txt"]
