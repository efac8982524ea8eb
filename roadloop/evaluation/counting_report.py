"""The benchmark report's "Counting on tracks" tables (see
:mod:`roadloop.evaluation.counting_benchmark`): one row per (model, ONNX format) with the
line-crossing counts against the synthetic scene's truth, and the counts per line."""

from __future__ import annotations

from roadloop.evaluation.results import FORMAT_LABELS, BenchmarkResults

_DASH = "–"


def _f(value: float | None, digits: int = 3) -> str:
    return _DASH if value is None else f"{value:.{digits}f}"


def counting_rows(results: BenchmarkResults) -> tuple[list[str], list[list[str]]]:
    """Counting on tracks, one row per (model, ONNX format): true line crossings, counted,
    relative count error, missed / duplicate / ghost crossings, ID switches, IDF1."""
    header = ["Model", "Version", "Format", "True crossings", "Counted", "Count error",
              "Missed", "Duplicates", "Ghosts", "IDSW", "IDF1"]
    rows = []
    for r in sorted(results.counting_rows, key=lambda r: _pair_order(results, r.model, r.format)):
        rel = _DASH if r.rel_error is None else f"{r.rel_error * 100:+.1f} % ({r.error:+d})"
        rows.append([r.model, r.version, FORMAT_LABELS.get(r.format, r.format), str(r.truth),
                     str(r.counted), rel, str(r.missed), str(r.duplicates), str(r.ghosts),
                     str(r.idsw), _f(r.idf1)])
    return header, rows


def counting_line_rows(results: BenchmarkResults) -> tuple[list[str], list[list[str]]]:
    """Per line: truth / counted for each (model, format), one column per line."""
    lines = sorted({ln["line"] for r in results.counting_rows for ln in r.lines})
    header = ["Model", "Format"] + [f"{ln} true / counted" for ln in lines]
    rows = []
    for r in sorted(results.counting_rows, key=lambda r: _pair_order(results, r.model, r.format)):
        per = {ln["line"]: f"{ln['truth']} / {ln['counted']}" for ln in r.lines}
        rows.append([r.model, FORMAT_LABELS.get(r.format, r.format)]
                    + [per.get(ln, _DASH) for ln in lines])
    return header, rows


def _pair_order(results: BenchmarkResults, model: str, fmt: str) -> tuple[int, int]:
    models = results.model_names()
    fmts = list(FORMAT_LABELS)
    return (models.index(model) if model in models else len(models),
            fmts.index(fmt) if fmt in fmts else len(fmts))


def counting_protocol_line(results: BenchmarkResults) -> str:
    """How the counting scene was made, in one sentence."""
    sc, cfg = results.counting_scene, results.counting_config
    if cfg is None or not sc:
        return "Counting on tracks: not run."
    crops = (f"vehicle crops from split `{sc.get('crop_split')}` of the curated dataset"
             if sc.get("crop_datasets") else "plain boxes (no crop dataset)")
    road = "a real road (median frame of a video)" if sc.get("background_video") else "a plain road"
    lanes = sc.get("lanes") or []
    return (
        f"One synthetic scene, seed {sc.get('seed')}, {sc.get('width')}x{sc.get('height')} at "
        f"{_f(sc.get('fps'), 0)} fps for {_f(sc.get('duration_s'), 0)} s ({len(lanes)} lanes, "
        f"{lanes.count('closed')} closed), {crops} on {road}; each ONNX file runs as the edge "
        f"agent does (conf {cfg.conf}, the model's own input size) into the agent's tracker + "
        "line counter. "
        "Crossings within 1 s of the start or end are not scored; count error = "
        "(counted - true) / true over all lines."
    )
