"""A/B, same run: ``write_bytes_atomic`` as it was (``Path`` objects, a UUID per temporary
name) against the one now in ``roadloop.fsutil`` (``str`` paths, ``os.urandom`` for the
name), writing a frame's two files (45 KB JPEG, 400 B sidecar) as the frame store does,
alternating in rounds. CPU time of this process per frame (the files' own cost included).

    python benchmarks/results/atomic-write-python/ab_atomic_write.py FOLDER OUT.json

FOLDER on tmpfs (/dev/shm) keeps the disk's write-back out of the comparison.
"""
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from roadloop.fsutil import write_bytes_atomic as now  # noqa: E402


def before(path, data):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


root, out = Path(sys.argv[1]), Path(sys.argv[2])
jpeg, sidecar, frames, rounds = os.urandom(45_000), os.urandom(400), 3000, 6
cpu = {"before": [], "now": []}
for r in range(rounds):
    for name, write in (("before", before), ("now", now))[:: 1 if r % 2 == 0 else -1]:
        folder = root / f"{name}-{r}" / "cam" / "2026-11-28"
        folder.mkdir(parents=True)
        t = time.process_time()
        for i in range(frames):
            target = folder / f"{i:08x}deadbeefcafe.jpg"
            write(target, jpeg)
            write(target.with_suffix(".json"), sidecar)
        cpu[name].append((time.process_time() - t) / frames * 1e6)
doc = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "folder": str(root),
       "load_average": os.getloadavg(), "frames_per_round": frames,
       "us_cpu_per_frame": cpu}
out.write_text(json.dumps(doc, indent=1))
print(json.dumps(doc))
