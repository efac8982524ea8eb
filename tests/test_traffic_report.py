"""The daily traffic report: files written, table totals equal to the records' sums."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, time, timedelta

from roadloop.traffic.report import MARKDOWN_NAME, SUMMARY_NAME, write_daily_report

from .traffic_factories import DAY, synthetic_records


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
                     interval_start=(datetime.combine(DAY + timedelta(days=1), time(1), UTC)).isoformat())
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
    report = write_daily_report(synthetic_records(minutes=3), DAY - timedelta(days=1), folder,
                                cameras=["cam-1"])
    text = (folder / MARKDOWN_NAME).read_text()
    assert "No traffic records for this day" in text
    assert report.total_vehicles == 0 and report.records == 0 and report.plots == ()
    assert not list(folder.glob("*.png"))
