"""The daily traffic report: files written, table totals equal to the records' sums."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta

import numpy as np

from roadloop.traffic.report import MARKDOWN_NAME, SUMMARY_NAME, write_daily_report

DAY = date(2026, 11, 27)


def synthetic_records(day: date = DAY, minutes: int = 90, seed: int = 0) -> list[dict]:
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
            events.append({"event_id": "cam-1.ev.1.1", "kind": "jam", "at": t.isoformat(),
                           "zone": "lane_1", "line": None, "track_id": None,
                           "class_name": None, "duration_s": 120.0, "frame_id": "ab12",
                           "detail": "zone lane_1 jammed for 120 s"})
        out.append({"record_id": f"cam-1.{int(t.timestamp())}.1", "camera_id": "cam-1",
                    "interval_start": t.isoformat(), "interval_s": 60, "covered_s": 60.0,
                    "frames": 600, "config_version": 1, "model_version": "m",
                    "lines": lines, "zones": [zone], "events": events})
    return out


def _totals_table(text: str) -> dict[str, list[str]]:
    section = text.split("## Vehicles per line and class", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()]
    header, body = rows[0], rows[2:]
    return {"header": header, **{"/".join(r[:3]).strip("/"): r for r in body}}


def test_report_files_and_totals(tmp_path):
    records = synthetic_records()
    # a second agent run in the first minute: it sums; a record of the next day: left out
    extra = dict(records[0], record_id="cam-1.restart", lines=[
        {"line": "north", "direction": "in", "class_name": "car", "count": 3, "pcu": 3.0,
         "speeds_kmh": []}], zones=[], events=[])
    other_day = dict(records[1], record_id="cam-1.tomorrow",
                     interval_start=(datetime(2026, 11, 28, 1, tzinfo=UTC)).isoformat())
    records += [extra, other_day]
    in_day = records[:-1]
    folder = tmp_path / "reports" / DAY.isoformat()
    report = write_daily_report(records, DAY, folder)

    names = {p.name for p in folder.iterdir()}
    assert {MARKDOWN_NAME, SUMMARY_NAME, "volumes_15min.png", "pcu_flow_hourly.png",
            "speeds.png", "congestion.png"} <= names
    for plot in report.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in folder.parent.iterdir()] == [DAY.isoformat()]  # no temp left

    want_total = sum(r["count"] for rec in in_day for r in rec["lines"])
    want_in = sum(r["count"] for rec in in_day for r in rec["lines"] if r["direction"] == "in")
    want_trucks = sum(r["count"] for rec in in_day for r in rec["lines"]
                      if r["class_name"] == "truck")
    want_pcu = sum(r["pcu"] for rec in in_day for r in rec["lines"])
    assert report.total_vehicles == want_total
    assert report.line_totals["cam-1/north/in"] == want_in
    assert report.events_count == 1 and report.records == len(in_day)

    text = (folder / MARKDOWN_NAME).read_text()
    table = _totals_table(text)
    header, total_row = table["header"], table["**total**"]
    assert int(total_row[header.index("vehicles")]) == want_total
    assert int(total_row[header.index("truck")]) == want_trucks
    assert float(total_row[header.index("PCU")]) == round(want_pcu, 1)
    assert int(table["cam-1/north/in"][header.index("vehicles")]) == want_in
    # the 15-minute table adds up to the same day total
    quarter = text.split("## Vehicles per 15 minutes", 1)[1].split("\n\n", 2)[1]
    alls = [int(line.strip("|").split("|")[-1]) for line in quarter.splitlines()[2:]]
    assert len(alls) == 6 and sum(alls) == want_total
    assert re.search(r"\| cam-1 \| lane_1 \| 07:30 \| 07:35 \| jam \| 5 \|", text)
    assert "| 07:32:00 | cam-1 | jam | lane_1 | 120.0 | ab12 |" in text
    summary = json.loads((folder / SUMMARY_NAME).read_text())
    assert summary["total_vehicles"] == want_total

    # written again: replaced as a whole, still no temp folder beside it
    again = write_daily_report(records[:10], DAY, folder)
    assert again.total_vehicles < want_total
    assert [p.name for p in folder.parent.iterdir()] == [DAY.isoformat()]


def test_a_day_without_records_says_so(tmp_path):
    folder = tmp_path / "empty"
    report = write_daily_report(synthetic_records(minutes=3), date(2026, 11, 26), folder,
                                cameras=["cam-1"])
    text = (folder / MARKDOWN_NAME).read_text()
    assert "No traffic records for this day" in text
    assert report.total_vehicles == 0 and report.records == 0 and report.plots == ()
    assert not list(folder.glob("*.png"))
