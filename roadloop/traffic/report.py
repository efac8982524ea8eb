"""The operator's daily traffic report: one UTC day of one or more cameras, as a folder of
markdown (``report.md``), PNG plots and ``summary.json`` (docs/traffic.md).

The folder is built beside its final place and renamed into it, so a reader sees the old
report or the new one, never a part. Plots use matplotlib's object API (Agg), never pyplot's
global state. A day without records gives a report that says so.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from roadloop.fsutil import swap_dir_into_place, temp_sibling
from roadloop.markdown import md_cell
from roadloop.traffic.rollups import (
    STATES,
    LineVolume,
    Record,
    ZoneBucket,
    ZoneTimeline,
    check_bucket,
    congestion_timeline,
    coverage,
    events,
    fitting_bucket,
    in_window,
    line_volumes,
    unfitting_cameras,
    unique_records,
    zone_stats,
)

MARKDOWN_NAME = "report.md"
SUMMARY_NAME = "summary.json"
VOLUMES_PNG = "volumes_15min.png"
PCU_FLOW_PNG = "pcu_flow_hourly.png"
SPEEDS_PNG = "speeds.png"
CONGESTION_PNG = "congestion.png"

STATE_COLOURS = {"normal": "#4caf50", "warning": "#ffc107", "heavy": "#ff7043", "jam": "#c62828"}
_DASH = "–"

LineKey = tuple[str, str, str]  # camera, line, direction

# A plot's cost grows with what it draws (one subplot per line and direction): it draws the
# lines with the most vehicles, the classes with the most vehicles (the rest as "other") and
# the most congested zones, and the report names what it left out. The tables stay complete.
MAX_PLOTTED_LINES = 12
MAX_PLOTTED_CLASSES = 9
MAX_PLOTTED_ZONES = 24
OTHER_CLASSES = "other"


@dataclass(frozen=True)
class DailyReport:
    """What was written, and the day's headline figures (for the Dagster metadata)."""

    folder: Path
    markdown: Path
    day: date
    records: int
    total_vehicles: int
    total_pcu: float
    line_totals: dict[str, int]  # "camera/line/direction" -> vehicles
    events_count: int
    volume_table_md: str
    plots: tuple[Path, ...] = field(default_factory=tuple)
    # camera -> why its records are in no figure of the report (intervals that do not fit)
    left_out: dict[str, str] = field(default_factory=dict)
    not_plotted: tuple[str, ...] = field(default_factory=tuple)  # lines and zones, by label

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder), "markdown": str(self.markdown),
            "day": self.day.isoformat(), "records": self.records,
            "total_vehicles": self.total_vehicles, "total_pcu": self.total_pcu,
            "line_totals": self.line_totals, "events_count": self.events_count,
            "plots": [p.name for p in self.plots], "left_out": self.left_out,
            "not_plotted": list(self.not_plotted),
        }



def _duration(seconds: float) -> str:
    """Watched time: minutes under an hour (a short run is not "0.0 h")."""
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"

def day_window(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), UTC)
    return start, start + timedelta(days=1)


def _label(key: LineKey) -> str:
    return "/".join(key)


def _f(value: float | None, digits: int = 1) -> str:
    return _DASH if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; every cell escaped (``md_cell``): labels and details are the agents'."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _names(labels: Iterable[str]) -> str:
    """Labels for a sentence of the report (escaped like a cell: one line, no table)."""
    return ", ".join(md_cell(label) for label in labels)


def _plotted_lines(volumes: list[LineVolume]) -> tuple[list[LineKey], list[LineKey]]:
    """(the lines the plots draw: the ``MAX_PLOTTED_LINES`` with the most vehicles, in key
    order; the others, most vehicles first)."""
    vehicles: dict[LineKey, int] = defaultdict(int)
    for v in volumes:
        vehicles[(v.camera_id, v.line, v.direction)] += v.count
    ranked = sorted(vehicles, key=lambda k: (-vehicles[k], k))
    return sorted(ranked[:MAX_PLOTTED_LINES]), ranked[MAX_PLOTTED_LINES:]


def _plotted_zones(timelines: list[ZoneTimeline]) -> tuple[list[ZoneTimeline], list[str]]:
    """(the ``MAX_PLOTTED_ZONES`` zones longest at warning or worse, in camera/zone order;
    the others' labels)."""
    def congested(t: ZoneTimeline) -> float:
        return sum((s.end - s.start).total_seconds() for s in t.segments if s.state != "normal")
    ranked = sorted(timelines, key=lambda t: (-congested(t), t.camera_id, t.zone))
    kept = sorted(ranked[:MAX_PLOTTED_ZONES], key=lambda t: (t.camera_id, t.zone))
    return kept, [f"{t.camera_id}/{t.zone}" for t in ranked[MAX_PLOTTED_ZONES:]]


# --------------------------------------------------------------------------- tables


def volume_table(day_volumes: list[LineVolume]) -> tuple[str, dict[str, int], int, float]:
    """The day's vehicles per camera/line/direction and class, with totals: (markdown,
    per-line totals, vehicles, PCU)."""
    classes = sorted({v.class_name for v in day_volumes})
    per: dict[LineKey, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    pcu: dict[LineKey, float] = defaultdict(float)
    for v in day_volumes:
        key = (v.camera_id, v.line, v.direction)
        per[key][v.class_name] += v.count
        pcu[key] += v.pcu
    rows = []
    totals: dict[str, int] = {}
    for key in sorted(per):
        total = sum(per[key].values())
        totals[_label(key)] = total
        rows.append([*key, *(per[key].get(c, 0) for c in classes), total, f"{pcu[key]:.1f}"])
    all_vehicles = sum(totals.values())
    all_pcu = sum(pcu.values())
    col_totals = [sum(per[k].get(c, 0) for k in per) for c in classes]
    rows.append(["**total**", "", "", *col_totals, all_vehicles, f"{all_pcu:.1f}"])
    header = ["camera", "line", "direction", *classes, "vehicles", "PCU"]
    return _table(header, rows), totals, all_vehicles, all_pcu


def _quarter_table(volumes: list[LineVolume]) -> str:
    keys = sorted({(v.camera_id, v.line, v.direction) for v in volumes})
    cells: dict[datetime, dict[LineKey, int]] = defaultdict(lambda: defaultdict(int))
    for v in volumes:
        cells[v.bucket_start][(v.camera_id, v.line, v.direction)] += v.count
    rows = [
        [start.strftime("%H:%M"), *(cells[start].get(k, 0) for k in keys),
         sum(cells[start].values())]
        for start in sorted(cells)
    ]
    return _table(["start (UTC)", *(_label(k) for k in keys), "all"], rows)


def _pooled_speeds(records: list[Record]) -> dict[LineKey, list[float]]:
    out: dict[LineKey, list[float]] = defaultdict(list)
    for record in records:
        for row in record.get("lines") or ():
            key = (record["camera_id"], row["line"], row["direction"])
            out[key].extend(float(s) for s in row.get("speeds_kmh") or ())
    return {k: s for k, s in sorted(out.items()) if s}


# An hour its camera watched for less than this is not a candidate for the peak hour: a
# spell of seconds (an agent stopping at 11:00:20) scaled to an hour is no hour's flow.
PEAK_MIN_WATCHED_S = 1800.0


class HourFlow(NamedTuple):
    """One watched hour of one line and direction: its PCU and the seconds watched."""

    hour: datetime
    pcu: float
    watched_s: float

    @property
    def per_h(self) -> float:
        return self.pcu * 3600.0 / self.watched_s


def _hourly_flow(records: list[Record]) -> dict[LineKey, list[HourFlow]]:
    """PCU and watched seconds per line and direction, for every hour its camera watched."""
    hour = fitting_bucket(records, 3600)  # 3600 for every interval an agent sends
    watched = coverage(records, hour)
    pcu: dict[tuple[LineKey, datetime], float] = defaultdict(float)
    keys: set[LineKey] = set()
    for v in line_volumes(records, hour):
        key = (v.camera_id, v.line, v.direction)
        keys.add(key)
        pcu[(key, v.bucket_start)] += v.pcu
    out: dict[LineKey, list[HourFlow]] = {}
    for key in sorted(keys):
        hours = sorted(h for (cam, h), s in watched.items() if cam == key[0] and s > 0)
        out[key] = [HourFlow(h, pcu.get((key, h), 0.0), watched[(key[0], h)]) for h in hours]
    return out


def _flow_row(key: LineKey, hours: list[HourFlow]) -> list[str]:
    """A line's row of the PCU-flow table: PCU per watched hour over the day (its PCU over
    the hours watched, not a mean of hourly rates: an hour watched for 20 s weighs 20 s), and
    the peak among the hours watched for at least ``PEAK_MIN_WATCHED_S``."""
    watched = sum(h.watched_s for h in hours)
    mean = f"{sum(h.pcu for h in hours) * 3600.0 / watched:.1f}" if watched > 0 else _DASH
    full = [h for h in hours if h.watched_s >= PEAK_MIN_WATCHED_S]
    peak = max(full, key=lambda h: h.per_h) if full else None
    return [_label(key), mean, f"{peak.per_h:.1f}" if peak else _DASH,
            peak.hour.strftime("%H:%M") if peak else _DASH]


def _zone_table(zones: list[ZoneBucket]) -> str:
    agg: dict[tuple[str, str], list[ZoneBucket]] = defaultdict(list)
    for z in zones:
        agg[(z.camera_id, z.zone)].append(z)
    rows = []
    for (cam, name), items in sorted(agg.items()):
        dwell_n = sum(z.dwell_n for z in items)
        dwell = (sum((z.dwell_mean_s or 0.0) * z.dwell_n for z in items) / dwell_n
                 if dwell_n else None)
        weighted = [(z.occupancy_mean, z.covered_s) for z in items if z.occupancy_mean is not None]
        weight = sum(w for _, w in weighted)
        occ = sum(o * w for o, w in weighted) / weight if weight else None
        minutes = {s: sum(z.state_s.get(s, 0.0) for z in items) / 60.0 for s in STATES}
        worst = max((z.worst_state for z in items), key=STATES.index)
        rows.append([cam, name, sum(z.entries_total for z in items), sum(z.exits for z in items),
                     _f(dwell), _f(occ, 2), _f(max(z.occupancy_max for z in items), 0),
                     f"{sum(z.pcu_in for z in items):.1f}",
                     *(f"{minutes[s]:.0f}" for s in STATES), worst])
    return _table(["camera", "zone", "entries", "exits", "mean dwell s", "mean occupancy",
                   "max occupancy", "PCU in", *(f"{s} min" for s in STATES), "worst"], rows)


def _congestion_rows(timelines: list[ZoneTimeline]) -> list[list[Any]]:
    return [
        [t.camera_id, t.zone, s.start.strftime("%H:%M"), s.end.strftime("%H:%M"), s.state,
         f"{(s.end - s.start).total_seconds() / 60:.0f}"]
        for t in timelines for s in t.segments if s.state != "normal"
    ]


# --------------------------------------------------------------------------- plots


def _figure(rows: int, height: float = 2.6, width: float = 11.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, max(height * rows, 2.5)), dpi=90, layout="constrained")


def _time_axis(ax: Any, start: datetime, end: datetime) -> None:
    import matplotlib.dates as mdates

    ax.set_xlim(mdates.date2num(start), mdates.date2num(end))
    ax.xaxis.set_major_locator(mdates.HourLocator(byhour=range(0, 24, 3), tz=UTC))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
    ax.grid(axis="y", alpha=0.3)


def _plot_volumes(volumes: list[LineVolume], start: datetime, path: Path, bucket_s: int) -> None:
    import matplotlib.dates as mdates

    keys = sorted({(v.camera_id, v.line, v.direction) for v in volumes})
    per_class: dict[str, int] = defaultdict(int)
    for v in volumes:
        per_class[v.class_name] += v.count
    classes = sorted(per_class)
    if len(classes) > MAX_PLOTTED_CLASSES + 1:  # the rest drawn as one class
        ranked = sorted(per_class, key=lambda c: (-per_class[c], c))
        kept = sorted(ranked[:MAX_PLOTTED_CLASSES])
        other = f"{OTHER_CLASSES} ({len(ranked) - len(kept)} classes)"
        while other in per_class:  # an agent's class of that name stays its own
            other += "'"
        volumes = [v if v.class_name in kept else dataclasses.replace(v, class_name=other)
                   for v in volumes]
        classes = [*kept, other]
    colours = {c: f"C{i % 10}" for i, c in enumerate(classes)}
    fig = _figure(len(keys))
    axes = np.atleast_1d(fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0])
    width = bucket_s / 86400.0
    for ax, key in zip(axes, keys, strict=True):
        rows = [v for v in volumes if (v.camera_id, v.line, v.direction) == key]
        x = sorted({v.bucket_start for v in rows})
        xs = mdates.date2num(x)
        bottom = np.zeros(len(x))
        for cls in classes:
            by_start: dict[datetime, int] = defaultdict(int)
            for v in rows:
                if v.class_name == cls:
                    by_start[v.bucket_start] += v.count
            heights = np.array([by_start.get(t, 0) for t in x], dtype=float)
            if heights.any():
                ax.bar(xs, heights, width=width, bottom=bottom, align="edge",
                       color=colours[cls], label=cls)
                bottom += heights
        ax.set_title(f"{_label(key)}: vehicles per {bucket_s // 60} min", fontsize=9)
        ax.set_ylabel("vehicles")
        _time_axis(ax, start, start + timedelta(days=1))
        ax.legend(fontsize=7, loc="upper left", ncols=min(len(classes), 6))
    fig.savefig(path, format="png")


def _plot_flow(flow: dict[LineKey, list[HourFlow]], start: datetime, path: Path) -> None:
    import matplotlib.dates as mdates

    fig = _figure(1, height=3.2)
    ax = fig.subplots()
    for key, points in flow.items():
        if points:
            hours = [p.hour + timedelta(minutes=30) for p in points]
            ax.plot(mdates.date2num(hours), [p.per_h for p in points], marker="o", ms=3,
                    label=_label(key))
    ax.set_title("PCU flow per hour (per watched hour)", fontsize=9)
    ax.set_ylabel("PCU / h")
    _time_axis(ax, start, start + timedelta(days=1))
    ax.legend(fontsize=7)
    fig.savefig(path, format="png")


def _plot_speeds(speeds: dict[LineKey, list[float]], path: Path) -> None:
    fig = _figure(len(speeds), height=2.4, width=8.0)
    axes = fig.subplots(len(speeds), 1, squeeze=False)[:, 0]
    for ax, (key, values) in zip(axes, speeds.items(), strict=True):
        arr = np.asarray(values)
        median, p85 = np.percentile(arr, [50, 85])
        ax.hist(arr, bins=np.arange(0.0, float(arr.max()) + 10.0, 5.0), color="C0", alpha=0.8)
        ax.axvline(median, color="k", ls="--", label=f"median {median:.1f}")
        ax.axvline(p85, color="C3", ls="-", label=f"p85 {p85:.1f}")
        ax.set_title(f"{_label(key)}: speeds (n={arr.size})", fontsize=9)
        ax.set_xlabel("km/h")
        ax.legend(fontsize=7)
    fig.savefig(path, format="png")


def _plot_congestion(timelines: list[ZoneTimeline], start: datetime, path: Path) -> None:
    import matplotlib.dates as mdates
    from matplotlib.patches import Patch

    fig = _figure(1, height=0.5 * len(timelines) + 1.2)
    ax = fig.subplots()
    for i, t in enumerate(timelines):
        for state in STATES:
            spans = [(mdates.date2num(s.start), (s.end - s.start).total_seconds() / 86400.0)
                     for s in t.segments if s.state == state]
            if spans:
                ax.broken_barh(spans, (i - 0.4, 0.8), color=STATE_COLOURS[state])
    ax.set_yticks(range(len(timelines)), [f"{t.camera_id}/{t.zone}" for t in timelines])
    ax.set_ylim(-0.6, len(timelines) - 0.4)
    ax.set_title("Congestion per zone (blank: not watched)", fontsize=9)
    _time_axis(ax, start, start + timedelta(days=1))
    ax.legend(handles=[Patch(color=STATE_COLOURS[s], label=s) for s in STATES], fontsize=7,
              loc="upper left", ncols=4)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------- the report


def _markdown(day: date, cameras: Sequence[str], records: list[Record], bucket_s: int,
              volume_md: str, volumes: list[LineVolume], plots: dict[str, Path],
              left_out: dict[str, str], not_plotted: list[LineKey],
              zones_not_plotted: list[str]) -> str:
    start, _ = day_window(day)
    out = [f"# Traffic report {day.isoformat()} (UTC)", ""]
    out.append(f"Cameras: {', '.join(cameras) if cameras else _DASH}.")
    if records:
        watched = coverage(records, 86400)
        out.append("Watched: " + ", ".join(
            f"{cam} {_duration(watched.get((cam, start), 0.0))}" for cam in cameras) + ".")
    for cam, why in sorted(left_out.items()):
        out += ["", f"**Warning: camera {cam} is left out of this report**: {md_cell(why)}."]
    if not_plotted:
        out += ["", (f"The line plots draw the {MAX_PLOTTED_LINES} lines/directions with the "
                     f"most vehicles; {len(not_plotted)} more are in the tables only (not "
                     f"plotted): {_names(_label(k) for k in not_plotted)}.")]
    if zones_not_plotted:
        out += ["", (f"The congestion plot draws the {MAX_PLOTTED_ZONES} zones longest at "
                     f"warning or worse; {len(zones_not_plotted)} more are in the tables only "
                     f"(not plotted): {_names(zones_not_plotted)}.")]
    if not records and left_out:
        out += ["", "**No traffic records this report can count for this day** (see above)."]
        return "\n".join(out) + "\n"
    if not records:
        out += ["", ("**No traffic records for this day.** The cameras sent no interval "
                "records for it (not running, no `traffic` section, or not yet uploaded).")]
        return "\n".join(out) + "\n"
    out += ["", "## Vehicles per line and class", "", volume_md, ""]
    if "volumes" in plots:
        out += [f"![volumes]({plots['volumes'].name})", ""]
    if volumes:
        out += [f"## Vehicles per {bucket_s // 60} minutes", "", _quarter_table(volumes), ""]
    flow = _hourly_flow(records)
    if flow:
        out += ["## PCU flow per hour", ""]
        rows = [_flow_row(key, hours) for key, hours in flow.items()]
        out += [_table(["line", "mean PCU/h", "peak PCU/h", "peak hour (UTC)"], rows), ""]
        out += [(f"Mean: PCU per watched hour over the day. Peak: among hours watched for "
                 f"at least {PEAK_MIN_WATCHED_S / 60:.0f} minutes."), ""]
        if "flow" in plots:
            out += [f"![PCU flow]({plots['flow'].name})", ""]
    speeds = _pooled_speeds(records)
    if speeds:
        out += ["## Speeds", ""]
        rows = [[_label(k), len(s), *(f"{q:.1f}" for q in np.percentile(s, [50, 85]))]
                for k, s in speeds.items()]
        out += [_table(["line", "vehicles with a speed", "median km/h", "p85 km/h"], rows), ""]
        if "speeds" in plots:
            out += [f"![speeds]({plots['speeds'].name})", ""]
    zones = zone_stats(records, 86400)
    if zones:
        out += ["## Zones", "", _zone_table(zones), ""]
        congested = _congestion_rows(congestion_timeline(records))
        out += ["### Congestion (warning or worse)", ""]
        out += [_table(["camera", "zone", "from", "to", "state", "minutes"], congested)
                if congested else ("None: no interval in which a zone spent most of its time at "
                                   "warning or worse (brief spells show as the zones' worst "
                                   "state above)."), ""]
        if "congestion" in plots:
            out += [f"![congestion]({plots['congestion'].name})", ""]
    evs = events(records)
    out += [f"## Events ({len(evs)})", ""]
    if evs:
        out.append(_table(
            ["time (UTC)", "camera", "kind", "zone/line", "duration s", "frame", "detail"],
            [[e.at.strftime("%H:%M:%S"), e.camera_id, e.kind, e.zone or e.line or _DASH,
              _f(e.duration_s), e.frame_id or _DASH, e.detail or ""]
             for e in evs]))
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


def write_daily_report(
    records: Iterable[Record],
    day: date,
    folder: Path,
    *,
    cameras: Sequence[str] | None = None,
    bucket_s: int = 900,
) -> DailyReport:
    """Write the report of ``day`` (UTC) into ``folder`` (replaced as a whole).

    Records outside the day are ignored; ``cameras`` limits (and names, even when silent)
    the cameras reported, default: those in the records.
    """
    start, end = day_window(day)
    chosen = list(unique_records(in_window(records, start, end)))  # a resend counts once
    if cameras is not None:
        chosen = [r for r in chosen if r["camera_id"] in set(cameras)]
    names = sorted(set(cameras) if cameras is not None else {r["camera_id"] for r in chosen})
    # Buckets hold whole records (rollups.check_intervals): wider than asked only for a
    # record longer than the bucket, which the agents' intervals never are at 900 s. A
    # camera whose intervals fit no bucket that tiles a day (records an older gateway took)
    # is left out with a warning: it must not stop the report of every other camera.
    unfit = unfitting_cameras(chosen, check_bucket(bucket_s), widen=True)
    left_out = {cam: (f"its {interval} s intervals fit no bucket of whole records that tiles "
                      f"a day with the report's {bucket_s} s buckets (the agents send 60, "
                      "300 or 900 s); none of its records is counted here")
                for cam, interval in unfit.items()}
    chosen = [r for r in chosen if r["camera_id"] not in unfit]
    names = [n for n in names if n not in unfit]
    bucket_s = fitting_bucket(chosen, bucket_s)
    volumes = line_volumes(chosen, bucket_s)
    volume_md, totals, vehicles, pcu = volume_table(volumes)
    evs = events(chosen)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    tmp.mkdir()
    try:
        plots: dict[str, Path] = {}
        plotted, not_plotted = _plotted_lines(volumes)
        drawn = set(plotted)
        if volumes:
            plots["volumes"] = tmp / VOLUMES_PNG
            _plot_volumes([v for v in volumes if (v.camera_id, v.line, v.direction) in drawn],
                          start, plots["volumes"], bucket_s)
            flow = _hourly_flow(chosen)
            plots["flow"] = tmp / PCU_FLOW_PNG
            _plot_flow({k: f for k, f in flow.items() if k in drawn}, start, plots["flow"])
        speeds = {k: s for k, s in _pooled_speeds(chosen).items() if k in drawn}
        if speeds:
            plots["speeds"] = tmp / SPEEDS_PNG
            _plot_speeds(speeds, plots["speeds"])
        timelines, zones_not_plotted = _plotted_zones(congestion_timeline(chosen))
        if timelines:
            plots["congestion"] = tmp / CONGESTION_PNG
            _plot_congestion(timelines, start, plots["congestion"])
        text = _markdown(day, names, chosen, bucket_s, volume_md, volumes, plots, left_out,
                         not_plotted, zones_not_plotted)
        (tmp / MARKDOWN_NAME).write_text(text, encoding="utf-8")
        report = DailyReport(
            folder=folder, markdown=folder / MARKDOWN_NAME, day=day, records=len(chosen),
            total_vehicles=vehicles, total_pcu=round(pcu, 6), line_totals=totals,
            events_count=len(evs), volume_table_md=volume_md,
            plots=tuple(folder / p.name for p in plots.values()), left_out=left_out,
            not_plotted=(*(_label(k) for k in not_plotted), *zones_not_plotted),
        )
        summary = {**report.to_dict(), "cameras": names,
                   "generated_at": datetime.now(UTC).isoformat()}
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1), encoding="utf-8")
        swap_dir_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report

