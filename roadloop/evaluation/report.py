"""Benchmark report: one self-contained HTML file (plots as base64 PNGs), the results as JSON,
and a markdown summary (the key table that goes into Dagster's markdown metadata).

Plots use matplotlib's object API (``matplotlib.figure.Figure``, Agg canvas), so rendering
never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from roadloop.evaluation.counting_report import (
    counting_line_rows,
    counting_protocol_line,
    counting_rows,
)
from roadloop.evaluation.gates import GateOutcome
from roadloop.evaluation.report_context import (
    TrainingProfile,
    context_rows,
    gate_rows,
)
from roadloop.evaluation.results import FORMAT_LABELS, BenchmarkResults
from roadloop.evaluation.shape_report import shape_protocol_line, shape_rows
from roadloop.evaluation.testsets import ALL, SLICE_DESCRIPTIONS
from roadloop.fsutil import write_text_atomic

logger = logging.getLogger(__name__)

HTML_NAME = "benchmark_report.html"
JSON_NAME = "benchmark_results.json"
MARKDOWN_NAME = "benchmark_report.md"

_DASH = "–"


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the written report files."""

    html: Path
    json: Path
    markdown: Path


# --------------------------------------------------------------------------- tables


def primary_test_set(results: BenchmarkResults) -> str:
    """``"all"`` when benchmarked, else the first test set."""
    return ALL if ALL in results.test_sets else results.test_sets[0]


def _f(value: float | None, digits: int = 3) -> str:
    return _DASH if value is None else f"{value:.{digits}f}"


def _pairs(results: BenchmarkResults) -> list[tuple[str, str]]:
    """(model, format) pairs in report order."""
    return [(m, f) for m in results.model_names() for f in results.formats(m)]


def _label(model: str, fmt: str) -> str:
    return f"{model} · {FORMAT_LABELS.get(fmt, fmt)}"


def key_table_rows(
    results: BenchmarkResults, test_set: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the key table: one row per (model, format)."""
    ts = test_set or primary_test_set(results)
    header = [
        "Model",
        "Version",
        "Format",
        "mAP50",
        "mAP50-95",
        "P",
        "R",
        "F1",
        "Count MAE",
        "P95 ms @b1",
        "frames/s @b1",
    ]
    rows = []
    for m, fmt in _pairs(results):
        met = results.get(m, fmt, ts)
        lat = results.latency(m, fmt, 1)
        rows.append(
            [
                m,
                results.models[m].version,
                FORMAT_LABELS.get(fmt, fmt),
                _f(met and met.map50),
                _f(met and met.map50_95),
                _f(met and met.precision),
                _f(met and met.recall),
                _f(met and met.f1),
                _f(met and met.count_mae, 2),
                _f(lat and lat.p95_ms, 1),
                _f(lat and lat.frames_per_s, 1),
            ]
        )
    return header, rows


def per_source_rows(results: BenchmarkResults) -> tuple[list[str], list[list[str]]]:
    """mAP50 / mAP50-95 per source test set (the domain shift), one row per (model, format)."""
    sources = results.test_sets_of_kind("source")
    header = ["Model", "Format"]
    for s in sources:
        header += [f"{s} mAP50", f"{s} mAP50-95", f"{s} frames"]
    rows = []
    for m, fmt in _pairs(results):
        row = [m, FORMAT_LABELS.get(fmt, fmt)]
        for s in sources:
            met = results.get(m, fmt, s)
            row += [
                _f(met and met.map50),
                _f(met and met.map50_95),
                str(met.n_images) if met else _DASH,
            ]
        rows.append(row)
    return header, rows


def n_frames(results: BenchmarkResults, test_set: str) -> int | None:
    """Frames in a test set, as the benchmark evaluated it (None if it has no metrics row)."""
    return next((r.metrics.n_images for r in results.rows if r.test_set == test_set), None)


def robustness_rows(results: BenchmarkResults) -> tuple[list[str], list[list[str]]]:
    """mAP50-95 on the clean primary set and on each corrupted copy of it (change vs clean)."""
    base = primary_test_set(results)
    slices = results.test_sets_of_kind("slice")

    def col(ts: str, label: str) -> str:
        n = n_frames(results, ts)
        return f"{label} mAP50-95 (n={n if n is not None else _DASH})"

    header = ["Model", "Format", col(base, f"{base} clean")] + [col(s, s) for s in slices]
    rows = []
    for m, fmt in _pairs(results):
        clean = results.get(m, fmt, base)
        row = [m, FORMAT_LABELS.get(fmt, fmt), _f(clean and clean.map50_95)]
        for ts in slices:
            met = results.get(m, fmt, ts)
            cell = _f(met and met.map50_95)
            if met is not None and clean is not None:
                cell += f" ({met.map50_95 - clean.map50_95:+.3f})"
            row.append(cell)
        rows.append(row)
    return header, rows


def latency_rows(results: BenchmarkResults) -> tuple[list[str], list[list[str]]]:
    header = [
        "Model",
        "Format",
        "Batch",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "mean ms",
        "frames/s",
        "runs",
        "threads",
        "device",
    ]
    rows = []
    for m, fmt in _pairs(results):
        for b in results.batch_sizes():
            lat = results.latency(m, fmt, b)
            if lat is None:
                continue
            rows.append(
                [
                    m,
                    FORMAT_LABELS.get(fmt, fmt),
                    str(b),
                    _f(lat.p50_ms, 1),
                    _f(lat.p95_ms, 1),
                    _f(lat.p99_ms, 1),
                    _f(lat.mean_ms, 1),
                    _f(lat.frames_per_s, 1),
                    f"{lat.warmup}+{lat.runs}",
                    str(lat.threads or "default"),
                    lat.device,
                ]
            )
    return header, rows


def per_class_rows(
    results: BenchmarkResults, test_set: str | None = None
) -> tuple[list[str], list[list[str]]]:
    ts = test_set or primary_test_set(results)
    classes = _class_names(results, ts)
    header = ["Model", "Format"] + [f"{c} AP50 / AP50-95 / count MAE" for c in classes]
    rows = []
    for m, fmt in _pairs(results):
        met = results.get(m, fmt, ts)
        row = [m, FORMAT_LABELS.get(fmt, fmt)]
        for c in classes:
            if met is None:
                row.append(_DASH)
            elif c in met.absent_classes:
                row.append(f"absent / absent / {_f(met.per_class_count_mae.get(c), 2)}")
            else:
                row.append(
                    f"{_f(met.per_class_ap50.get(c))} / {_f(met.per_class_ap50_95.get(c))} / "
                    f"{_f(met.per_class_count_mae.get(c), 2)}"
                )
        rows.append(row)
    return header, rows


def _class_names(results: BenchmarkResults, ts: str) -> list[str]:
    names: list[str] = []
    for r in results.rows:
        if r.test_set == ts:
            for c in r.metrics.per_class_count_mae:
                if c not in names:
                    names.append(c)
    return names


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


_CODE_SPAN = re.compile(r"`([^`]+)`")


def _prose(text: str) -> str:
    """Escape ``text`` for HTML; markdown code spans (`x`) become ``<code>x</code>``."""
    return _CODE_SPAN.sub(r"<code>\1</code>", html.escape(str(text))).replace("`", "")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_prose(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_prose(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    attr = f" class='{cls}'" if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _protocol_line(results: BenchmarkResults) -> str:
    ts = primary_test_set(results)
    n = next((r.metrics.n_images for r in results.rows if r.test_set == ts), 0)
    lc = results.latency_config
    lat = (
        f"latency: forward only, {lc.warmup} warm-up + {lc.runs} timed runs, "
        f"threads {lc.threads or 'default'}, device {lc.device}"
        if lc.enabled
        else "latency: not measured"
    )
    return (
        f"imgsz {results.imgsz}, split `{results.split}`, key table on test set `{ts}` "
        f"({n} frames), count MAE at conf {results.conf}; {lat}."
    )


def key_table_markdown(results: BenchmarkResults) -> str:
    """The key table alone (model × format on the primary test set), as a markdown table."""
    return _md_table(*key_table_rows(results)) + "\n"


def render_markdown(
    results: BenchmarkResults, *, title: str, training: TrainingProfile | None = None
) -> str:
    """Key table (model × format) + per-source table; short enough for Dagster metadata."""
    parts = [f"### {title}", ""]
    note = training.smoke_note() if training is not None else None
    if note:
        parts += [f"> **Not a real training run.** {note}", ""]
    parts += [_protocol_line(results), "", _md_table(*key_table_rows(results))]
    if results.test_sets_of_kind("source"):
        parts += ["", "**Per source** (domain shift)", "", _md_table(*per_source_rows(results))]
    if results.counting_rows:
        parts += ["", "**Counting on tracks**", "", counting_protocol_line(results), "",
                  _md_table(*counting_rows(results))]
    if results.shape_rows:
        parts += ["", "**Input shapes**", "", shape_protocol_line(results), "",
                  _md_table(*shape_rows(results))]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plots


def _figure_png(
    draw: Callable[..., None], *, ncols: int = 1, width: float = 7.0, height: float = 3.6
) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    draw(fig, axes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grouped_bars(
    ax, groups: Sequence[str], series: dict[str, list[float | None]], *, ylabel: str, title: str
) -> None:
    import numpy as np

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, vals) in enumerate(series.items()):
        ys = [np.nan if v is None else v for v in vals]
        ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _plot_map_by_format(results: BenchmarkResults) -> str | None:
    ts = primary_test_set(results)
    fmts = [f for f in FORMAT_LABELS if any(r.format == f for r in results.rows)]
    if not fmts:
        return None

    def draw(fig, axes):
        for ax, attr, name in ((axes[0], "map50", "mAP50"), (axes[1], "map50_95", "mAP50-95")):
            series = {
                m: [getattr(results.get(m, f, ts), attr, None) for f in fmts]
                for m in results.model_names()
            }
            _grouped_bars(
                ax,
                [FORMAT_LABELS[f] for f in fmts],
                series,
                ylabel=name,
                title=f"{name} by format and model (test set {ts})",
            )

    return _figure_png(draw, ncols=2, width=6)


def _metric_series(
    results: BenchmarkResults, test_sets: Sequence[str], getter
) -> dict[str, list[float | None]]:
    return {
        _label(m, f): [getter(results.get(m, f, t)) for t in test_sets]
        for m, f in _pairs(results)
        if any(r.model == m and r.format == f for r in results.rows)
    }


def _plot_per_class(results: BenchmarkResults) -> str | None:
    ts = primary_test_set(results)
    classes = _class_names(results, ts)
    if not classes:
        return None
    absent: set[str] = set()
    for r in results.rows:
        if r.test_set == ts:
            absent |= set(r.metrics.absent_classes)
    ticks = [f"{c}\n(absent)" if c in absent else c for c in classes]

    def draw(fig, axes):
        for ax, attr, name in (
            (axes[0], "per_class_ap50", "AP50"),
            (axes[1], "per_class_ap50_95", "AP50-95"),
        ):
            series = {
                _label(m, f): [
                    None if (met := results.get(m, f, ts)) is None else getattr(met, attr).get(c)
                    for c in classes
                ]
                for m, f in _pairs(results)
                if results.get(m, f, ts) is not None
            }
            _grouped_bars(ax, ticks, series, ylabel=name, title=f"Per-class {name} (test set {ts})")

    return _figure_png(draw, ncols=2, width=6.5)


def _plot_test_sets(results: BenchmarkResults, test_sets: list[str], title: str) -> str | None:
    if not test_sets or not results.rows:
        return None

    def draw(fig, axes):
        series = _metric_series(results, test_sets, lambda m: None if m is None else m.map50_95)
        _grouped_bars(axes[0], test_sets, series, ylabel="mAP50-95", title=title)

    return _figure_png(draw, width=max(7.0, 1.4 * len(test_sets) + 3))


def _plot_latency(results: BenchmarkResults) -> str | None:
    batches = results.batch_sizes()
    if not batches:
        return None
    pairs = [(m, f) for m, f in _pairs(results) if any(results.latency(m, f, b) for b in batches)]

    def draw(fig, axes):
        for ax, b in zip(axes, batches):
            series: dict[str, list[float | None]] = {}
            for pct in ("p50", "p95", "p99"):
                series[pct] = [
                    getattr(results.latency(m, f, b), f"{pct}_ms", None) for m, f in pairs
                ]
            _grouped_bars(
                ax,
                [_label(m, f).replace(" · ", "\n") for m, f in pairs],
                series,
                ylabel="ms per batch",
                title=f"Latency percentiles, batch {b}",
            )
            ax.tick_params(axis="x", labelsize=7)

    return _figure_png(draw, ncols=len(batches), width=max(4.5, 1.3 * len(pairs)))


# --------------------------------------------------------------------------- html


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;margin:.5em 0}.note{color:#555;font-size:.85em}
.warn{background:#fff4e5;border-left:4px solid #e8a33d;padding:.6em 1em}
code{background:#f3f3f3;padding:0 .2em}table.text td{text-align:left}
"""


def render_html(
    results: BenchmarkResults,
    *,
    title: str,
    context: dict[str, str] | None = None,
    gates: Sequence[GateOutcome] | None = None,
    training: TrainingProfile | None = None,
) -> str:
    ts = primary_test_set(results)
    sec: list[str] = [f"<h1>{_prose(title)}</h1>"]
    note = training.smoke_note() if training is not None else None
    if note:
        sec.append(f"<p class='warn'><strong>Not a real training run.</strong> {_prose(note)}</p>")
    sec += [
        f"<p class='note'>{_prose(_protocol_line(results))} Generated {results.created_at}.</p>",
        "<h2>Context</h2>",
        _html_table(["", ""], context_rows(results, context, training)),
    ]
    if gates:
        verdict = "all pass" if all(g.passed for g in gates) else "promotion blocked"
        sec += [f"<h2>Promotion gates ({verdict})</h2>", _html_table(*gate_rows(gates), cls="text")]

    def img(b64: str | None, alt: str) -> str:
        return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>" if b64 else ""

    sec += [
        "<h2>Summary</h2>",
        _html_table(*key_table_rows(results)),
        img(_plot_map_by_format(results), "mAP by format and model"),
    ]
    sources = results.test_sets_of_kind("source")
    if sources:
        sec += [
            "<h2>Per source (domain shift)</h2>",
            _html_table(*per_source_rows(results)),
            img(
                _plot_test_sets(results, [ts, *sources], "mAP50-95 per source test set"),
                "mAP50-95 per source",
            ),
        ]
    sec += [
        "<h2>Per class</h2>",
        (
            "<p class='note'>Classes without ground truth in the test set are marked absent (no AP), "
            "not scored 0.</p>"
        ),
        _html_table(*per_class_rows(results)),
        img(_plot_per_class(results), "per-class AP"),
    ]
    slices = results.test_sets_of_kind("slice")
    if slices:
        what = "; ".join(f"{s}: {SLICE_DESCRIPTIONS.get(s, 'synthetic corruption')}" for s in slices)
        sec += [
            "<h2>Robustness slices: mAP50-95 under synthetic corruptions</h2>",
            (
                "<p class='note'>Each slice is a corrupted copy of the frames of test set "
                f"<code>{_prose(ts)}</code> (n = frames per column); cells are mAP50-95, in "
                f"brackets the change against the clean frames. {_prose(what)}.</p>"
            ),
            _html_table(*robustness_rows(results)),
            img(
                _plot_test_sets(
                    results, [ts, *slices], "mAP50-95 per robustness slice (first bar: clean)"
                ),
                "robustness slices",
            ),
        ]
    if results.latency_rows:
        sec += [
            "<h2>Latency (forward pass only)</h2>",
            _html_table(*latency_rows(results)),
            img(_plot_latency(results), "latency percentiles by batch"),
        ]
    if results.counting_rows:
        sec += [
            "<h2>Counting on tracks</h2>",
            f"<p class='note'>{html.escape(counting_protocol_line(results))}</p>",
            _html_table(*counting_rows(results)),
            _html_table(*counting_line_rows(results)),
        ]
    if results.shape_rows:
        sec += [
            "<h2>Input shapes</h2>",
            f"<p class='note'>{html.escape(shape_protocol_line(results))}</p>",
            _html_table(*shape_rows(results)),
        ]
    others = [
        t
        for t in results.test_sets
        if results.test_set_kinds.get(t) not in ("all", "source", "slice")
    ]
    if others:
        sec += [
            "<h2>Other test sets</h2>",
            img(_plot_test_sets(results, others, "mAP50-95"), "other test sets"),
        ]
    sec.append(f"<p class='note'>Raw results: {JSON_NAME}</p>")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(s for s in sec if s)
        + "</body></html>\n"
    )


# --------------------------------------------------------------------------- files


def render_report(
    results: BenchmarkResults,
    out_dir: Path,
    *,
    title: str,
    context: dict[str, str] | None = None,
    gates: Sequence[GateOutcome] | None = None,
    training: TrainingProfile | None = None,
) -> ReportFiles:
    """Write ``benchmark_report.html``, ``benchmark_results.json`` and ``benchmark_report.md``.

    Everything is rendered in memory first; each file is then written to a temporary name
    in ``out_dir`` and renamed, so a failure never leaves a half-written report.
    """
    if not results.rows and not results.latency_rows:
        raise ValueError("benchmark results are empty: nothing to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_text = render_html(results, title=title, context=context, gates=gates, training=training)
    md_text = render_markdown(results, title=title, training=training)
    json_text = results.model_dump_json(indent=2)
    files = ReportFiles(
        html=out_dir / HTML_NAME, json=out_dir / JSON_NAME, markdown=out_dir / MARKDOWN_NAME
    )
    write_text_atomic(files.json, json_text)
    write_text_atomic(files.markdown, md_text)
    write_text_atomic(files.html, html_text)
    logger.info("benchmark report written to %s", out_dir)
    return files


__all__ = [
    "ReportFiles",
    "TrainingProfile",
    "context_rows",
    "gate_rows",
    "key_table_markdown",
    "key_table_rows",
    "n_frames",
    "per_source_rows",
    "primary_test_set",
    "render_html",
    "render_markdown",
    "render_report",
]
