"""A/B of FrameStore.find_frame for a new frame id, by date folders in the camera's folder:
the pathlib version (roadloop/data/frames.py at 006c1b0, loaded from git) against the current
one, alternating in one process. Run from the repository root:

    python benchmarks/results/find-frame-lookup/ab_find_frame.py

Writes ab_find_frame.json beside this file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
import uuid
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from roadloop.data.frames import FrameStore  # noqa: E402

old_src = subprocess.run(["git", "show", "006c1b0:roadloop/data/frames.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
old = types.ModuleType("frames_006c1b0")
old.__dict__["__name__"] = "frames_006c1b0"
sys.modules["frames_006c1b0"] = old
exec(compile(old_src, "frames_006c1b0.py", "exec"), old.__dict__)


def cpu_us(fn, number: int = 200, repeat: int = 15) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        runs.append((time.process_time() - t0) / number)
    return min(runs) * 1e6


results = {}
with tempfile.TemporaryDirectory(dir=REPO) as tmp:
    for n in (1, 7, 30):
        root = Path(tmp) / f"days{n}"
        cam = root / "cam-lookup"
        for d in range(n):
            folder = cam / f"2026-10-{d + 1:02d}"
            folder.mkdir(parents=True)
            for j in range(50):
                (folder / f"f{j:04d}.jpg").write_bytes(b"\xff\xd8")
                (folder / f"f{j:04d}.json").write_bytes(b"{}")
        missing = uuid.uuid4().hex
        stores = {"pathlib (006c1b0)": old.FrameStore(root), "dir fd (now)": FrameStore(root)}
        row = {k: [] for k in stores}
        for _ in range(3):  # alternate
            for k, s in stores.items():
                assert s.find_frame("cam-lookup", missing) is None
                assert s.find_frame("cam-lookup", "f0007") is not None
                row[k].append(cpu_us(lambda s=s: s.find_frame("cam-lookup", missing)))
        results[str(n)] = {k: min(v) for k, v in row.items()}

doc = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "load_average": os.getloadavg(),
       "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
       "what": "CPU µs per find_frame of an id not stored (least of 15×200 calls, 3 alternations)",
       "us_by_day_folders": results}
(HERE / "ab_find_frame.json").write_text(json.dumps(doc, indent=2) + "\n")
print(json.dumps(doc, indent=2))
