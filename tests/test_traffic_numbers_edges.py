"""Traffic numbers at the edges a deployment meets (an audit's cases, by hand): a zone renamed
mid-bucket, a partial interval before a change of interval length, a resend in the daily
report, and an hour watched for seconds."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from edge_agent.counting import DensityState
from edge_agent.traffic.events import FrameTraffic, ZoneState
from edge_agent.traffic.intervals import IntervalAccumulator
from roadloop.traffic import congestion_timeline, zone_stats
from roadloop.traffic.report import _congestion_rows, write_daily_report

from .test_traffic_rollups import _line, _record, _zone

T10 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
DAY = T10.date()


def _at(seconds: float) -> str:
    return (T10 + timedelta(seconds=seconds)).isoformat()


def test_a_zones_flow_is_per_the_time_that_zone_was_watched() -> None:
    """Zone A renamed B at 10:05 by a configuration change, 1 PCU in a minute throughout:
    60 PCU/h for both (5 PCU over 300 s, 10 over 600 s), not 20 and 40 (PCU over the
    camera's 900 s); and filtering by zone gives the same figure."""
    records = [_record(_at(60 * m), f"cam-1.{m}.1",
                       zones=[_zone(1.0, 1, 1.0, {"normal": 60.0}, name="A" if m < 5 else "B")])
               for m in range(15)]
    got = {z.zone: (z.pcu_flow_per_h, z.covered_s) for z in zone_stats(records, 900)}
    assert got == {"A": (pytest.approx(60.0), 300.0), "B": (pytest.approx(60.0), 600.0)}
    [only_a] = zone_stats(records, 900, zone="A")
    assert (only_a.pcu_flow_per_h, only_a.covered_s) == (pytest.approx(60.0), 300.0)


def _accumulated(interval_s: int, t_from: float, t_to: float, state: DensityState) -> list:
    """The agent's own records of a zone held in ``state`` from ``t_from`` to ``t_to``."""
    acc = IntervalAccumulator("cam-1", interval_s=interval_s, zones=["Z"],
                              segment_started_at=t_from, config_version=1, model_version="m")
    out, t = [], t_from
    while t < t_to:
        out += acc.add(FrameTraffic([], zones=[ZoneState("Z", 8, state)]), t)
        t += 0.5
    return out + acc.close()


def test_a_partial_interval_ends_where_the_next_segment_starts() -> None:
    """300 s intervals, a jam 10:00-10:02, then the operator switches to 60 s intervals and
    the zone is normal to 10:10: the jam lasted 2 minutes, not the partial record's nominal
    5 (which overlapped the 60 s records)."""
    t = T10.timestamp()
    records = (_accumulated(300, t, t + 120, DensityState.JAM)
               + _accumulated(60, t + 120, t + 600, DensityState.NORMAL))
    [timeline] = congestion_timeline(records)
    assert [(s.start, s.end, s.state) for s in timeline.segments] == [
        (T10, T10 + timedelta(minutes=2), "jam"),
        (T10 + timedelta(minutes=2), T10 + timedelta(minutes=10), "normal")]
    assert _congestion_rows([timeline]) == [["cam-1", "Z", "10:00", "10:02", "jam", "2"]]


def test_the_daily_report_counts_a_resent_record_once(tmp_path) -> None:
    """Speeds 40 and 80 (minute 0, sent twice) and 50 (minute 1): 3 vehicles with a speed,
    median 50, p85 numpy's 71.0 of [40, 50, 80]; 2 records."""
    first = _record(_at(0), "cam-1.a.1", lines=[_line(2, 2.0, [40.0, 80.0], line="L")])
    second = _record(_at(60), "cam-1.b.1", lines=[_line(1, 1.0, [50.0], line="L")])
    report = write_daily_report([first, first, second], DAY, tmp_path / "r")
    assert report.records == 2 and report.total_vehicles == 3
    assert "| cam-1/L/in | 3 | 50.0 | 71.0 |" in report.markdown.read_text()


def test_the_mean_flow_weighs_hours_by_watched_time_and_a_spell_is_no_peak(tmp_path) -> None:
    """Hour 10 watched whole at 10 PCU a minute (600 PCU/h); the agent stops at 11:00:20, its
    last record 20 s with 3.5 PCU. Mean: 603.5 PCU over 3620 s = 600.2 PCU/h (the mean of
    the two hourly rates said 615); peak: hour 10 at 600 (the 20 s spell, 630/h, said 11:00)."""
    records = [_record(_at(60 * m), f"cam-1.{m}.1", lines=[_line(10, 10.0, [], line="L")])
               for m in range(60)]
    records.append(_record(_at(3600), "cam-1.60.1", covered_s=20.0,
                           lines=[_line(1, 1.0, [], line="L"),
                                  _line(1, 2.5, [], cls="truck", line="L")]))
    report = write_daily_report(records, date(2026, 11, 27), tmp_path / "r")
    assert "| cam-1/L/in | 600.2 | 600.0 | 10:00 |" in report.markdown.read_text()
