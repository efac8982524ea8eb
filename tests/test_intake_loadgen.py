"""``benchmarks.intake_loadgen`` / ``gateway_intake``: the intake benchmark's request bodies,
acknowledgement rules, retry loop and variant settings, against a tiny fake HTTP server."""

from __future__ import annotations

import asyncio
import json
import struct
import time

import pytest

from benchmarks import intake_loadgen as lg
from benchmarks.gateway_intake import LEVERS, Variant, grid_variants, run_levers
from benchmarks.intake_report import levers_table

JPEGS = [lg.Jpeg(b"\xff\xd8" + bytes([i]) * (50 + i) + b"\xff\xd9", 64, 48, {}) for i in range(3)]


def test_batch_envelope_round_trips_and_is_length_prefixed() -> None:
    plan = lg.AgentPlan("h:1", "tok", "cam-1", JPEGS, batch=3)
    plan.prebuild(3)
    (req,) = plan.prebuilt
    head, *body = req.chunks
    text = head.decode()
    assert text.startswith("POST /v1/frames/batch HTTP/1.1\r\n")
    assert f"Content-Type: {lg.BATCH_CONTENT_TYPE}\r\n" in text
    raw = b"".join(body)
    assert f"Content-Length: {len(raw)}\r\n" in text
    (n,) = struct.unpack(">I", raw[:4])
    assert json.loads(raw[4:4 + n])["frames"][0]["image_bytes"] == len(JPEGS[0].data)
    frames = lg.split_batch(raw)
    assert [m["frame_id"] for m, _ in frames] == req.frame_ids == [
        "cam-1-0000000", "cam-1-0000001", "cam-1-0000002"]
    assert [j for _, j in frames] == [plan.jpeg_for(f).data for f in req.frame_ids]
    assert all(m["camera_id"] == "cam-1" for m, _ in frames)
    with pytest.raises(ValueError):
        lg.split_batch(raw + b"x")


def test_single_upload_is_one_multipart_frame() -> None:
    plan = lg.AgentPlan("h:1", "tok", "cam-1", JPEGS, batch=1)
    plan.prebuild(2)
    assert len(plan.prebuilt) == 2
    head, *body = plan.prebuilt[1].chunks
    assert head.startswith(b"POST /v1/frames HTTP/1.1\r\n")
    raw = b"".join(body)
    assert JPEGS[1].data in raw and b'"frame_id":"cam-1-0000001"' in raw
    with pytest.raises(ValueError):
        lg.build_request("h", "t", "c", [("a", JPEGS[0]), ("b", JPEGS[1])], False, "now")


def test_classify_follows_the_agents_rules() -> None:
    batch = lg.PreparedRequest(["a", "b", "c", "d"], [], batch=True)
    body = json.dumps({"results": [{"frame_id": f, "status": s} for f, s in
                                   zip("abcd", (201, 409, 503, 422), strict=True)]}).encode()
    assert lg.classify(batch, 200, body)[:3] == (["a", "b"], ["c"], ["d"])
    assert lg.classify(batch, 503, b"")[:3] == ([], ["a", "b", "c", "d"], [])
    assert lg.classify(batch, 404, b"")[:3] == ([], [], ["a", "b", "c", "d"])
    single = lg.PreparedRequest(["x"], [], batch=False)
    assert lg.classify(single, 409, b"")[0] == ["x"]
    assert lg.classify(single, 429, b"")[1] == ["x"]
    assert lg.classify(single, 413, b"")[2] == ["x"]


def test_weighted_percentile_counts_each_acknowledged_frame() -> None:
    # One 10 ms request acknowledging 9 frames, one 100 ms request acknowledging 1.
    samples = [(10.0, 9), (100.0, 1)]
    assert lg.weighted_percentile(samples, 50) == 10.0
    assert lg.weighted_percentile(samples, 95) == 100.0
    assert lg.weighted_percentile([], 50) is None


async def _fake_gateway(script: list[str], seen: list[list[str]]) -> asyncio.Server:
    """Answers each request per ``script``: 'drop' closes the connection after reading the
    request (as a SIGKILL would), 'busy' answers a batch with 503 for its first frame."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            frames = [m["frame_id"] for m, _ in lg.split_batch(await reader.readexactly(length))]
            seen.append(frames)
            action = script.pop(0) if script else "ok"
            if action == "drop":
                break
            results = [{"frame_id": f, "status": 503 if action == "busy" and i == 0 else 201}
                       for i, f in enumerate(frames)]
            body = json.dumps({"results": results}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_agent_resends_unacknowledged_frames_until_acknowledged() -> None:
    async def scenario() -> tuple[lg.AgentResult, list[list[str]]]:
        seen: list[list[str]] = []
        server = await _fake_gateway(["drop", "busy"], seen)
        port = server.sockets[0].getsockname()[1]
        plan = lg.AgentPlan(f"127.0.0.1:{port}", "tok", "cam", JPEGS, batch=2)
        plan.prebuild(6)
        res = lg.AgentResult("cam")
        # A zero-length window: only the first request goes out, then the drain re-sends.
        await lg.run_agent(plan, res, "127.0.0.1", port, time.perf_counter(), 0.05,
                           drain_s=5.0)
        server.close()
        await server.wait_closed()
        return res, seen

    res, seen = asyncio.run(scenario())
    first = seen[0]
    assert seen[1] == first  # dropped: the same frames again
    assert res.transport_errors == 1
    assert first[0] in res.acked and first[1] in res.acked  # 503 for one: re-sent alone
    assert [first[0]] in seen[2:]
    assert len(res.acked) == len(set(res.acked))
    assert res.unacknowledged == []


def test_lever_ladder_is_cumulative_and_grid_is_a_product() -> None:
    ran: list[tuple[Variant, float | None]] = []

    def fake_run(v: Variant, kill: float | None) -> dict:
        ran.append((v, kill))
        if v.batch > 1:  # a gateway without the batch route
            return {"variant": v.name, "skipped": "no batch route"}
        return {"variant": v.name}

    every = {f for *_, requires in LEVERS for f in requires}
    results = run_levers(fake_run, every - {"frame_sync"}, kill_after=3.0)
    assert [r["variant"] for r in results[:len(LEVERS)]] == [name for name, *_ in LEVERS]
    assert "skipped" in results[2] and not any(v.name == "+group-sync" for v, _ in ran)
    first, last = ran[0][0], ran[-2][0]
    assert first.batch == 1 and first.env["ROADLOOP_GATEWAY_PRINCIPAL_CACHE_S"] == "0"
    # skipped levers add nothing: the last rung is single uploads, per-file sync, 2 workers
    assert last.name == "+4-workers" and last.batch == 1
    assert last.env["ROADLOOP_GATEWAY_WORKERS"] == "4"
    assert last.env["ROADLOOP_GATEWAY_WORKER_SOCKETS"] == "reuse_port"
    assert ran[-4][0].env["ROADLOOP_GATEWAY_WORKER_SOCKETS"] == "shared"
    assert last.env["ROADLOOP_GATEWAY_FRAME_SYNC"] == "per_file"
    assert last.env["ROADLOOP_GATEWAY_PRINCIPAL_CACHE_S"] != "0"
    assert ran[-1] == (Variant("+4-workers SIGKILL", 1, last.env), 3.0)
    grid = grid_variants("1,8", "group,per_file", None, None, "1,2", ["COMMIT_BATCH_MAX=1"])
    assert len(grid) == 8 and len({v.name for v in grid}) == 8
    assert all(v.env["ROADLOOP_GATEWAY_COMMIT_BATCH_MAX"] == "1" for v in grid)
    assert {v.batch for v in grid} == {1, 8}


def test_levers_table_gives_each_rung_its_gain_over_the_previous_one() -> None:
    def row(name: str, fps: float) -> dict:
        return {"variant": name, "lever": name, "frames_per_s": fps, "requests_per_s": fps,
                "latency_ms": {"p50": 1.0, "p99": 2.0}, "lost": 0,
                "cpu_ms_per_frame": {"server": 1.0, "load_generator": 0.1}}

    results = [row("base", 100.0), {"variant": "x", "lever": "x", "skipped": "absent"},
               row("more", 250.0), {"variant": "grid row", "lever": None}]
    lines = levers_table(results)
    assert len(lines) == 2 + 3
    assert "| base: base | 100 | – |" in lines[2]
    assert "skipped: absent" in lines[3]
    assert "| more: more | 250 | 2.50x |" in lines[4]


def test_the_report_names_the_slowest_requests_and_when_they_were_due() -> None:
    from benchmarks.intake_report import p99_by_slice, slowest_requests

    a, b = lg.AgentResult("cam-1"), lg.AgentResult("cam-2")
    a.latencies, a.latency_at = [(20.0, 16), (250.0, 16), (30.0, 8)], [0.5, 7.6, 12.0]
    b.latencies, b.latency_at = [(180.0, 16), (25.0, 16)], [7.65, 19.0]
    assert slowest_requests([a, b], n=3) == [
        {"at_s": 7.6, "ms": 250.0, "frames": 16}, {"at_s": 7.65, "ms": 180.0, "frames": 16},
        {"at_s": 12.0, "ms": 30.0, "frames": 8}]
    assert p99_by_slice([a, b], 20.0, 5.0)[1] >= 180.0  # both in the 5-10 s slice


def test_without_the_shared_videos_the_benchmark_stops_instead_of_measuring_other_jpegs(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from roadloop.settings import get_settings

    monkeypatch.setenv("ROADLOOP_SHARED_DIR", str(tmp_path / "nowhere"))
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="--synthetic-jpegs"):
            lg.load_jpegs(4, 320, 85)
        jpegs, source = lg.load_jpegs(4, 320, 85, synthetic=True)
    finally:
        get_settings.cache_clear()
    assert len(jpegs) == 4 and "synthetic" in source
    assert all(j.data[:2] == b"\xff\xd8" and j.width == 320 for j in jpegs)


def test_the_host_speed_probe_decodes_the_pool_strictly_and_the_report_shows_it() -> None:
    import cv2
    import numpy as np

    from benchmarks.intake_report import _host_speed

    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    good = lg.Jpeg(buf.tobytes(), 96, 64, {})
    assert lg.host_decode_ms([good], rounds=2) > 0
    with pytest.raises(ValueError):  # strict, as the gateway decodes: a cut JPEG is an error
        lg.host_decode_ms([lg.Jpeg(buf.tobytes()[:-200] + b"\xff\xd9", 96, 64, {})], rounds=1)
    line = _host_speed({"host_decode_ms_per_frame": {"before": 0.4, "after": 0.41}})
    assert "0.400 ms before" in line and "0.410 ms after" in line
    assert _host_speed({}) == ""


def test_describe_jpegs_names_what_makes_runs_comparable() -> None:
    """Count, source, width, quality and mean size: two benchmarks' per-frame costs compare
    only on the same JPEGs (one used quality 80, 39.6 KB, beside the server's 85, 46.1 KB)."""
    pool = [lg.Jpeg(data=b"x" * n, width=640, height=360, quality={}) for n in (100, 300)]
    assert lg.describe_jpegs(pool, "test frames", 85) == (
        "2 frames of test frames, 640 px, JPEG quality 85, mean 200 B")
