"""Synthetic traffic interval records (the spec's record format) for the traffic tests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np

DAY = date(2026, 11, 20)  # a closed day of the traffic partitions


def synthetic_records(day: date = DAY, minutes: int = 90, seed: int = 0,
                      camera: str = "cam-1") -> list[dict]:
    """One camera, one line both ways, one zone; a jam in the middle and one event."""
    rng = np.random.default_rng(seed)
    start = datetime(day.year, day.month, day.day, 7, 0, tzinfo=UTC)
    pcu = {"car": 1.0, "truck": 2.5}
    out = []
    for m in range(minutes):
        t = start + timedelta(minutes=m)
        lines = []
        for direction in ("in", "out"):
            for cls in ("car", "truck"):
                n = int(rng.integers(0, 6 if cls == "car" else 2))
                if n:
                    speeds = [round(float(s), 1) for s in rng.uniform(20, 70, size=n)]
                    lines.append({"line": "north", "direction": direction, "class_name": cls,
                                  "count": n, "pcu": n * pcu[cls], "speeds_kmh": speeds})
        jam = 30 <= m < 35
        state = "jam" if jam else "normal"
        zone = {"zone": "lane_1", "entries": {"car": 2}, "exits": 2, "dwell_s": [5.0, 7.0],
                "occupancy_mean": 6.0 if jam else 1.0, "occupancy_max": 8 if jam else 2,
                "pcu_in": 2.0, "state": state,
                "state_s": {s: (60.0 if s == state else 0.0)
                            for s in ("normal", "warning", "heavy", "jam")}}
        events = []
        if m == 32:
            events.append({"event_id": f"{camera}.ev.1.1", "kind": "jam", "at": t.isoformat(),
                           "zone": "lane_1", "line": None, "track_id": None,
                           "class_name": None, "duration_s": 120.0, "frame_id": "ab12",
                           "detail": "zone lane_1 jammed for 120 s"})
        out.append({"record_id": f"{camera}.{int(t.timestamp())}.1", "camera_id": camera,
                    "interval_start": t.isoformat(), "interval_s": 60, "covered_s": 60.0,
                    "frames": 600, "config_version": 1, "model_version": "m",
                    "lines": lines, "zones": [zone], "events": events})
    return out
