"""Per-variant summary and markdown report of ``benchmarks.gateway_intake``: the variants,
the levers table, the SIGKILL durability check, time per stage, and findings computed from
the run's figures."""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

from benchmarks.intake_loadgen import AgentResult, weighted_percentile

if TYPE_CHECKING:
    from benchmarks.gateway_intake import KillReport, Variant

logger = logging.getLogger("benchmarks.gateway_intake")

STAGES = ["read_form", "read_batch", "parse_batch", "parse_metadata", "precheck", "jpeg_check",
          "decode", "quality", "write_frame", "fsync_dir", "frame_sync", "commit_wait",
          "gc_gen0", "gc_gen1", "gc_gen2"]


def p99_by_slice(results: list[AgentResult], window: float, slice_s: float
                 ) -> list[float | None]:
    """P99 frame latency of the requests sent in each ``slice_s`` of the window: whether a
    tail is start-up, a stall or the steady state."""
    slices: list[list[tuple[float, int]]] = [[] for _ in range(max(1, math.ceil(window
                                                                               / slice_s)))]
    for r in results:
        for (ms, n), at in zip(r.latencies, r.latency_at, strict=True):
            slices[min(len(slices) - 1, max(0, int(at // slice_s)))].append((ms, n))
    return [None if (p := weighted_percentile(s, 99)) is None else round(p, 1) for s in slices]


def slowest_requests(results: list[AgentResult], n: int = 10) -> list[dict[str, float]]:
    """The ``n`` slowest requests: when in the window each was due (s), its latency and
    frames — whether a tail is a few requests at the start or spread over the window."""
    rows = [(ms, at, frames) for r in results
            for (ms, frames), at in zip(r.latencies, r.latency_at, strict=True)]
    rows.sort(reverse=True)
    return [{"at_s": round(at, 2), "ms": round(ms, 1), "frames": frames}
            for ms, at, frames in rows[:n]]


def summarize(v: Variant, agents: int, window: float, wall: float, results: list[AgentResult],
              check: dict[str, Any], cpu_server: float, cpu_loadgen: float,
              load_before: list[float], load_after: list[float], stats: dict[str, Any],
              kill: KillReport | None, build_s: float) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    acked_window = sum(r.acked_in_window for r in results)
    acked_all = sum(len(r.acked) for r in results)
    lat = [x for r in results for x in r.latencies]
    req_lat = [(ms, 1) for ms, _ in lat]
    codes: dict[str, int] = {}
    req_codes: dict[str, int] = {}
    for r in results:
        for k, n in r.codes.items():
            codes[str(k)] = codes.get(str(k), 0) + n
        for k, n in r.request_codes.items():
            req_codes[str(k)] = req_codes.get(str(k), 0) + n

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    out: dict[str, Any] = {
        "variant": v.name, "lever": v.lever, "batch": v.batch, "env": v.env, "agents": agents,
        "duration_s": round(window, 2), "wall_s": round(wall, 2),
        "acknowledged": acked_window, "acknowledged_incl_drain": acked_all,
        "frames_per_s": round(acked_window / window, 1),
        "requests_per_s": round(sum(r.requests_in_window for r in results) / window, 1),
        "latency_ms": {"p50": ms(weighted_percentile(lat, 50)),
                       "p90": ms(weighted_percentile(lat, 90)),
                       "p99": ms(weighted_percentile(lat, 99)),
                       "max": ms(max((x for x, _ in lat), default=None)),
                       "mean": ms(sum(x * n for x, n in lat) / max(1, sum(n for _, n in lat)))},
        "p99_ms_by_5s": p99_by_slice(results, window, 5.0),
        "slowest_requests": slowest_requests(results),
        "request_latency_ms": {"p50": ms(weighted_percentile(req_lat, 50)),
                               "p99": ms(weighted_percentile(req_lat, 99))},
        "frame_status_codes": codes, "request_status_codes": req_codes,
        "transport_errors": sum(r.transport_errors for r in results),
        "retried_frames": sum(r.retried_frames for r in results),
        "rejected": sum(len(r.rejected) for r in results),
        "unacknowledged_at_end": sum(len(r.unacknowledged) for r in results),
        "requests_built_in_window": sum(r.built_late for r in results),
        **check,
        "cpu_s": {"server": round(cpu_server, 2), "load_generator": round(cpu_loadgen, 2),
                  "available": round(wall * cores, 2)},
        "cpu_ms_per_frame": {
            "server": round(1000 * cpu_server / max(1, acked_all), 3),
            "load_generator": round(1000 * cpu_loadgen / max(1, acked_all), 3)},
        "node_share": {"load_generator": round(cpu_loadgen / (wall * cores), 3),
                       "server": round(cpu_server / (wall * cores), 3)},
        "load_average": {"before": load_before, "after": load_after},
        "prebuild_s": round(build_s, 2),
        "server_stats": stats,
    }
    if kill is not None:
        out["kill"] = {"at_s": kill.at_s, "acknowledged_before": kill.acked_before,
                       "restart_s": kill.restart_s,
                       "restart_cpu_s_not_counted": kill.restart_thread_cpu_s}
    logger.info("%s: %.1f frames/s, %.1f requests/s, P50 %s ms, P99 %s ms, lost %d, dup %d",
                v.name, out["frames_per_s"], out["requests_per_s"], out["latency_ms"]["p50"],
                out["latency_ms"]["p99"], check["lost"], check["duplicate_rows"])
    return out


def _fmt(x: Any, spec: str = "") -> str:
    return "–" if x is None else format(x, spec)


def _load(r: dict[str, Any]) -> str:
    la = r.get("load_average") or {}
    if not la:
        return "–"
    return f"{la['before'][0]:.2f} → {la['after'][0]:.2f}"


def _variant_row(r: dict[str, Any]) -> str:
    lat, cpu = r["latency_ms"], r["cpu_ms_per_frame"]
    return (f"| {r['variant']} | {r['batch']} | {r['frames_per_s']:.0f} | "
            f"{r['requests_per_s']:.0f} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} | "
            f"{cpu['server']:.2f} | {cpu['load_generator']:.2f} | "
            f"{r['node_share']['load_generator']:.1%} | {r['acknowledged_distinct']} | "
            f"{r['lost']} | {r['duplicate_rows']} | {_load(r)} |")


def levers_table(results: list[dict[str, Any]]) -> list[str]:
    """One row per lever on top of the previous one, with what it bought."""
    lines = [("| lever added | frames/s | vs previous | requests/s | P50 ms | P99 ms | "
             "server CPU ms/frame | loadgen CPU ms/frame | lost |"),
             "|---|---|---|---|---|---|---|---|---|"]
    prev: float | None = None
    for r in results:
        if r.get("lever") is None:
            continue
        if "skipped" in r:
            lines.append(f"| {r['variant']}: {r['lever']} | skipped: {r['skipped']} "
                         "| | | | | | | |")
            continue
        fps = r["frames_per_s"]
        gain = "–" if not prev else f"{fps / prev:.2f}x"
        lat, cpu = r["latency_ms"], r["cpu_ms_per_frame"]
        lines.append(f"| {r['variant']}: {r['lever']} | {fps:.0f} | {gain} | "
                     f"{r['requests_per_s']:.0f} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} | "
                     f"{cpu['server']:.2f} | {cpu['load_generator']:.2f} | {r['lost']} |")
        prev = fps
    return lines


def _stage_rows(stats: dict[str, Any]) -> list[str]:
    spans = stats.get("spans_ms", {})
    rows = []
    for k in STAGES + sorted(set(spans) - set(STAGES)):
        if k in spans:
            s = spans[k]
            rows.append(f"| `{k}` | {s['count']} | {s['mean_ms']:.2f} | {s['max_ms']:.1f} |")
    return rows


def _host_speed(machine: dict[str, Any]) -> str:
    d = machine.get("host_decode_ms_per_frame")
    if not d:
        return ""
    return (f" · host speed: a strict 1/8 decode of one of them took {d['before']:.3f} ms "
            f"before the runs, {d['after']:.3f} ms after")


def to_markdown(doc: dict[str, Any]) -> str:
    m, j = doc["machine"], doc["jpegs"]
    ran = [r for r in doc["results"] if "skipped" not in r]
    lines = [
        "# Fleet gateway intake benchmark",
        "",
        (f"{doc['created_at']} · {m['cpu']} · Python {m['python']} · {doc['agents']} agents × "
         f"{doc['duration_s']:.0f} s per variant · JPEGs: {j['source']}, {j['width']} px wide, "
         f"mean {j['mean_bytes'] / 1024:.0f} KiB ({j['mean_bytes']} B){_host_speed(m)} · "
         f"`{doc.get('command', '')}`"),
        "",
        (f"**The load generator runs on the same {m['cores']} cores as the gateway** "
         f"({doc['load_generator']['transport']}, {doc['load_generator']['event_loop']}); its "
         "CPU per frame and its share of the node's CPU time are columns below. Machine load "
         f"average (1/5/15 min) before → after the whole run: {m['load_average']['before']} → "
         f"{m['load_average']['after']}; per variant the 1-min figure is in the last column."),
        "",
        ("**Closed loop**: each agent sends its next request when the previous one is "
         "answered, so frames/s is the most the node takes and latency is mostly queueing "
         "(Little's law: agents × frames per request in flight)." if not doc.get("offered_fps")
         else f"**Paced**: {doc['offered_fps']:.0f} frames/s offered in all, each agent's "
         "requests due at fixed intervals; a frame's latency runs from its request's due "
         "time (a late send counts)."),
        "",
        *([(f"**Store under retention**: each camera held {doc['seed_days']} earlier date "
            "folders before the agents started (`--seed-days`), as a long-running gateway's "
            "store does; every upload looks for its frame id in each of them."), ""]
          if doc.get("seed_days") else []),
        (f"Target: ≥ {doc['target']['frames_per_s']:.0f} frames/s acknowledged with P99 < "
         f"{doc['target']['p99_ms']:.0f} ms, 0 lost. A frame is acknowledged by 201 or 409 "
         "(alone or inside a batch's results); its latency is its request's."),
        "",
        ("| variant | frames/request | frames/s | requests/s | P50 ms | P99 ms | "
         "server CPU ms/frame | loadgen CPU ms/frame | loadgen share of node | acked | lost | "
         "dup rows | load 1-min |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_variant_row(r) for r in ran]
    skipped = [r for r in doc["results"] if "skipped" in r]
    if skipped:
        lines += [""] + [f"- skipped `{r['variant']}`: {r['skipped']}" for r in skipped]
    if doc.get("levers"):
        lines += ["", "## Levers, each on top of the previous", ""] + levers_table(doc["results"])
    killed = [r for r in ran if "kill" in r]
    if killed:
        lines += ["", "## SIGKILL under load", "",
                  ("Every gateway process SIGKILLed mid-run, restarted on the same home and "
                   "port; the agents re-send what was not acknowledged. Lost = acknowledged "
                   "(before or after the kill) but not a row plus a complete frame-store entry "
                   "with the bytes sent."), "",
                  ("| variant | SIGKILL at s | acked before kill | restart s | acked in all | "
                   "rows | transport errors | frames re-sent | unacked at end | lost | "
                   "dup rows |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in killed:
            k = r["kill"]
            lines.append(f"| {r['variant']} | {k['at_s']} | {k['acknowledged_before']} | "
                         f"{k['restart_s']} | {r['acknowledged_distinct']} | {r['rows']} | "
                         f"{r['transport_errors']} | {r['retried_frames']} | "
                         f"{r['unacknowledged_at_end']} | {r['lost']} | "
                         f"{r['duplicate_rows']} |")
    for r in ran:
        lines += ["", f"## Server time per stage — `{r['variant']}`", ""]
        notes = []
        if int((r.get("env") or {}).get("ROADLOOP_GATEWAY_WORKERS", "1")) > 1:
            notes.append("`GET /v1/stats` answers from the one worker that took the request: "
                         "its share of the calls")
        if "kill" in r:
            notes.append("since the restart only")
        gc = r["server_stats"].get("group_commit", {})
        notes.append(f"mean group commit {gc.get('mean_batch', '–')} requests")
        before = r.get("machine_before")
        if before:
            since = before.get("since_removal_s")  # absent in reports from before it was kept
            notes.append(f"started after {before['waited_s']} s of waiting for a quiet machine: "
                         f"I/O pressure {before['io_pressure_avg10']} %, CPU pressure "
                         f"{before['cpu_pressure_avg10']} % (10 s averages)"
                         + ("" if before.get("cpu_pressure_avg60") is None else
                            f", {before['cpu_pressure_avg60']} % over the last minute")
                         + ("" if since is None else
                            f", {since:.0f} s after the last benchmark files were deleted")
                         + ("" if before.get("file_create_ms") is None else
                            f", a new file cost {before['file_create_ms']} ms of CPU")
                         + ("" if before["quiet"] else ", NOT quiet (timed out)"))
        warm = r.get("warmup")
        if warm:
            p50, p99 = (("–" if x is None else f"{x:.0f}") for x in (warm["p50_ms"],
                                                                       warm["p99_ms"]))
            notes.append(f"after {warm['duration_s']:.0f} s of warm-up at the same load "
                         f"({warm['acknowledged']} frames acknowledged, P50 {p50} ms, P99 "
                         f"{p99} ms; not in the row above)")
        by_slice = r.get("p99_ms_by_5s")
        if by_slice:
            notes.append("P99 ms of the requests sent in each 5 s of the window: "
                         + ", ".join("–" if p is None else f"{p:.0f}" for p in by_slice))
        slowest = r.get("slowest_requests")
        if slowest:
            notes.append("the slowest requests, due at s into the window: ms, "
                         + ", ".join(f"{x['at_s']:.1f}: {x['ms']:.0f}" for x in slowest))
        node = r.get("node_by_5s")
        if node:
            def cell(x: dict[str, Any]) -> str:
                if x["busy_pct"] is None:
                    return "–"
                return (f"{x['busy_pct']:.0f}/{x['iowait_pct']:.0f}/{x['steal_pct']:.0f} % "
                        f"{x['dirty_mb']:.0f}/{x['writeback_mb']:.0f} MB")
            notes.append("the node in the same slices, CPU busy/iowait/steal of all cores and "
                         "most dirty/write-back memory: " + "; ".join(cell(x) for x in node))
        lines += ["(" + "; ".join(notes) + ".)", "", "| stage | calls | mean ms | max ms |",
                  "|---|---|---|---|"]
        lines += _stage_rows(r["server_stats"])
    if doc.get("findings"):
        lines += ["", "## What the figures say", ""] + [f"- {f}" for f in doc["findings"]]
    return "\n".join(lines) + "\n"


def measured_findings(doc: dict[str, Any]) -> list[str]:
    """Sentences computed from this run's figures (no hand-written numbers)."""
    cores = doc["machine"]["cores"]
    target = doc["target"]["frames_per_s"]
    out: list[str] = []
    for r in doc["results"]:
        if "skipped" in r:
            continue
        srv, gen = r["cpu_ms_per_frame"]["server"], r["cpu_ms_per_frame"]["load_generator"]
        share = r["node_share"]["server"] + r["node_share"]["load_generator"]
        line = (f"`{r['variant']}`: {r['frames_per_s']:.0f} frames/s; gateway "
                f"{srv:.2f} ms and load generator {gen:.2f} ms of CPU per acknowledged frame, "
                f"together {share:.0%} of the {cores} cores' time")
        if "kill" in r:
            line += "; a SIGKILL run: its rate and CPU include the restart and the re-sends"
        elif srv > 0:
            line += (f"; at that cost the {cores} cores (load generator included) top out "
                     f"near {1000 * cores / (srv + gen):.0f} frames/s")
        meets = (r["frames_per_s"] >= target and (r["latency_ms"]["p99"] or 1e9)
                 < doc["target"]["p99_ms"] and r["lost"] == 0)
        out.append(line + (" — meets the target." if meets else "."))
        if r.get("requests_built_in_window"):
            out.append(f"`{r['variant']}`: the pre-built requests ran out and "
                       f"{r['requests_built_in_window']} were built inside the timed window "
                       "(their cost is in the load generator's CPU): raise `--max-fps`.")
        if r.get("unacknowledged_at_end"):
            out.append(f"`{r['variant']}`: {r['unacknowledged_at_end']} frames were still "
                       "unacknowledged when the agents stopped re-sending (not lost: never "
                       "acknowledged).")
    return out
