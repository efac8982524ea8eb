"""Per-frame costs of the gateway's intake steps, in-process (no server, no network): which
levers of issue 14 pay, measured one by one.

* **envelope**: a batch of 16 frames of ~46 KB (45 KiB) split from the raw
  ``application/vnd.roadloop.frame-batch`` body (``fleet.intake_batch.split_batch``) vs the
  same 16 frames as one multipart body and as 16 single-frame multipart bodies, each parsed by
  Starlette's form parser (what ``POST /v1/frames`` does), fed in 64 KiB chunks as uvicorn
  does.
* **jpeg**: the header walk (``check_jpeg``) and the strict grey decode at 1/1, 1/2, 1/4,
  1/8 scale (``decode_grey``); how far the dhash and brightness of the 1/8 decode are from the
  native ones.
* **read_back**: the sidecar read back from disk (``FrameStore.read_record``) vs the
  in-memory check (``roadloop.data.frame_records.frame_sidecar``).
* **lookup**: whether a new frame's id is already stored (the gateway asks once per upload)
  in a camera folder holding 1, 7 and 30 date folders of 50 frames each (30: the default
  retention of raw frames, so a long-running gateway's steady state): in any date folder
  (``FrameStore.find_frame``, the gateway's check until 2026-11-28) and in the record's own
  folder only (``write_frame(look_in_other_days=False)``, the gateway's check since).
* **durability**: 16 frames written with two fsyncs each + a folder fsync per frame
  (``frame_sync=per_file``) vs written without fsync + one ``FrameStore.sync()``
  (``frame_sync=group``) on the frame store's file system.

    python -m benchmarks.intake_parsing --out benchmarks/results

Writes ``<out>/intake_parsing.json`` and ``<out>/intake_parsing.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request

from benchmarks.gateway_intake import load_jpegs
from benchmarks.intake_loadgen import AGENT_REDACTION
from fleet.config import GatewaySettings
from fleet.intake_batch import split_batch
from fleet.jpeg import JpegLimits, check_jpeg, decode_grey
from roadloop.data.frame_quality import dhash_hamming, dhash_hex
from roadloop.data.frame_records import FrameRecord, frame_sidecar
from roadloop.data.frames import FrameStore
from roadloop.fsutil import fsync_dir, write_text_atomic

BATCH = 16
CHUNK = 64 * 1024


def _best_of(fn: Callable[[], Any], repeat: int, number: int) -> float:
    """CPU seconds (this process) per call: the least of ``repeat`` runs of ``number`` calls
    — CPU time, and the least, because other jobs share the 2 cores (timeit's advice)."""
    runs = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        runs.append((time.process_time() - t0) / number)
    return min(runs)


def _metadata(i: int, w: int, h: int) -> dict[str, Any]:
    return {"frame_id": f"f-{i:06d}", "camera_id": "cam-a",
            "captured_at": datetime(2026, 5, 4, tzinfo=UTC).isoformat(),
            "reasons": ["low_confidence"], "importance": 1.0, "model_version": "sha256:abc",
            "detections": [{"class_id": 0, "class_name": "car", "confidence": 0.4,
                            "xyxy": [1, 2, 30, 40]}], "width": w, "height": h,
            "redaction": AGENT_REDACTION}


def _raw_body(frames: list[tuple[dict[str, Any], bytes]]) -> bytes:
    manifest = json.dumps({"frames": [{"metadata": m, "image_bytes": len(d)}
                                      for m, d in frames]}).encode()
    return struct.pack(">I", len(manifest)) + manifest + b"".join(d for _, d in frames)


def _multipart(frames: list[tuple[dict[str, Any], bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for i, (m, data) in enumerate(frames):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="metadata{i}"'
                     f"\r\n\r\n{json.dumps(m)}\r\n".encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image{i}"; '
                     f'filename="f.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
                     + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def _parse_form(body: bytes, ctype: str, files: int) -> None:
    chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [
        (b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]}
    request = Request(scope, receive)
    form = await request.form(max_files=files, max_fields=files * 2)
    for value in form.values():
        if hasattr(value, "read"):
            await value.read()
    await form.close()


def envelope(frames: list[tuple[dict[str, Any], bytes]], settings: GatewaySettings,
             repeat: int) -> dict[str, Any]:
    raw = _raw_body(frames)
    multi, ctype = _multipart(frames)
    singles = [_multipart([f]) for f in frames]
    loop = asyncio.new_event_loop()
    try:
        raw_s = _best_of(lambda: split_batch(raw, settings), repeat, 20)
        multi_s = _best_of(lambda: loop.run_until_complete(_parse_form(multi, ctype, BATCH)),
                           repeat, 5)
        singles_s = _best_of(lambda: [loop.run_until_complete(_parse_form(b, c, 2))
                                      for b, c in singles], repeat, 5)
    finally:
        loop.close()
    return {"frames": BATCH, "body_bytes": len(raw),
            "raw_batch_ms_per_frame": raw_s / BATCH * 1e3,
            "multipart_batch_ms_per_frame": multi_s / BATCH * 1e3,
            "multipart_single_ms_per_frame": singles_s / BATCH * 1e3}


def jpeg_costs(jpegs: list[Any], repeat: int) -> dict[str, Any]:
    limits = JpegLimits(max_side=4096, max_pixels=4096 * 2160, max_scans=64,
                        max_metadata_bytes=128 * 1024)
    sample = jpegs[:BATCH]
    infos = [check_jpeg(j.data, j.width, j.height, 4096, limits) for j in sample]
    out: dict[str, Any] = {
        "width": sample[0].width, "height": sample[0].height,
        "header_check_ms": _best_of(lambda: [check_jpeg(j.data, j.width, j.height, 4096, limits)
                                             for j in sample], repeat, 3) / len(sample) * 1e3,
    }
    for scale in (1, 2, 4, 8):
        out[f"decode_1_{scale}_ms"] = _best_of(
            lambda s=scale: [decode_grey(j.data, i, s) for j, i in zip(sample, infos)],
            repeat, 3) / len(sample) * 1e3
    dh, br = [], []
    for j, info in zip(jpegs, [check_jpeg(j.data, j.width, j.height, 4096, limits)
                               for j in jpegs], strict=True):
        native, eighth = decode_grey(j.data, info, 1), decode_grey(j.data, info, 8)
        dh.append(dhash_hamming(dhash_hex(native), dhash_hex(eighth)))
        br.append(abs(float(native.mean()) - float(eighth.mean())))
    out["dhash_bits_1_8_vs_native"] = {"mean": statistics.fmean(dh), "max": max(dh)}
    out["brightness_abs_diff_1_8_vs_native"] = {"mean": statistics.fmean(br), "max": max(br)}
    out["frames_compared"] = len(jpegs)
    return out


def _records(jpegs: list[Any], tag: str) -> list[tuple[FrameRecord, bytes]]:
    now = datetime.now(UTC)
    return [(FrameRecord(frame_id=f"{tag}-{i:05d}", camera_id="cam-a", captured_at=now,
                         source="bench", width=j.width, height=j.height,
                         detections=[{"class_id": 0, "class_name": "car", "confidence": 0.4,
                                      "xyxy": [1, 2, 30, 40]}]), j.data)
            for i, j in enumerate(jpegs)]


def storage_costs(jpegs: list[Any], root: Path, rounds: int) -> dict[str, Any]:
    store = FrameStore(root)
    sample = jpegs[:BATCH]
    per_file, group = [], []
    for r in range(rounds):
        recs = _records(sample, f"p{r}")
        t0 = time.perf_counter()
        for rec, data in recs:
            w = store.write_frame(rec, data, decoded_size=(rec.width, rec.height), durable=True)
            fsync_dir(w.path.parent)
        per_file.append((time.perf_counter() - t0) / len(recs))
        recs = _records(sample, f"g{r}")
        t0 = time.perf_counter()
        for rec, data in recs:
            store.write_frame(rec, data, decoded_size=(rec.width, rec.height), durable=False)
        store.sync()
        group.append((time.perf_counter() - t0) / len(recs))
    recs = _records(sample, "p0")
    disk = _best_of(lambda: [store.read_record(rec.camera_id, rec.frame_id) for rec, _ in recs],
                    9, 3) / len(recs)
    memory = _best_of(lambda: [frame_sidecar(rec) for rec, _ in recs], 9, 3) / len(recs)
    return {
        "per_file_ms_per_frame": statistics.median(per_file) * 1e3,
        "group_ms_per_frame": statistics.median(group) * 1e3,
        "rounds": rounds,
        "read_back_disk_ms_per_frame": disk * 1e3,
        "read_back_memory_ms_per_frame": memory * 1e3,
    }


def lookup_costs(root: Path, repeat: int, days: tuple[int, ...] = (1, 7, 30)) -> dict[str, Any]:
    """CPU ms of the "already stored?" check for an id that is not stored, by date folders
    present: in every date folder (``find_frame``; the gateway's ``write_frame`` until
    2026-11-28) and in the record's own folder only (``look_in_other_days=False``)."""
    out, own = {}, {}
    for n in days:
        store = FrameStore(root / f"days{n}")
        cam = store.root / "cam-lookup"
        for d in range(n):
            folder = cam / f"2026-10-{d + 1:02d}"
            folder.mkdir(parents=True)
            for j in range(50):
                (folder / f"f{j:04d}.jpg").write_bytes(b"\xff\xd8")
                (folder / f"f{j:04d}.json").write_bytes(b"{}")
        missing = uuid.uuid4().hex
        assert store.find_frame("cam-lookup", missing) is None
        out[str(n)] = _best_of(lambda s=store, m=missing: s.find_frame("cam-lookup", m),
                               repeat, 200) * 1e3
        target = cam / f"2026-10-{n:02d}" / f"{missing}.jpg"  # today's folder: it exists
        own[str(n)] = _best_of(lambda s=store, t=target: s.is_complete(t), repeat, 200) * 1e3
    return {"find_frame_new_frame_ms_by_day_folders": out,
            "own_folder_new_frame_ms_by_day_folders": own}


def _load_average() -> list[float]:
    """The 1, 5 and 15 min load average: how busy the shared cores were."""
    return [round(x, 2) for x in os.getloadavg()]


def _load_text(doc: dict[str, Any]) -> str:
    start_end = doc.get("load_average_start_end")
    if not start_end:  # a report from before the load average was recorded
        return "load average not recorded"
    start, end = ("/".join(f"{x:.2f}" for x in la) for la in start_end)
    return f"load average (1/5/15 min) {start} at start, {end} at end"


def to_markdown(doc: dict[str, Any]) -> str:
    e, j, s = doc["envelope"], doc["jpeg"], doc["storage"]
    own = doc["lookup"].get("own_folder_new_frame_ms_by_day_folders", {})
    lines = [
        "# Gateway intake: per-frame cost of each step (in-process)", "",
        (f"{doc['at']} · {doc['machine']} · {doc['jpegs']} · {_load_text(doc)} · "
        "`python -m benchmarks.intake_parsing`."
        " CPU ms of this process, least of several runs (the machine's 2 cores were shared with"
        " other jobs); the storage rows are wall time (median of rounds: fsync waits for the"
        " disk, not the CPU)."), "",
        f"## Envelope: {e['frames']} frames, {e['body_bytes'] / 1024:.0f} KiB body", "",
        "| how | ms per frame |", "|---|---|",
        f"| raw batch body (`split_batch`) | {e['raw_batch_ms_per_frame']:.4f} |",
        (f"| one multipart body of {e['frames']} frames (Starlette form parser) | "
        f"{e['multipart_batch_ms_per_frame']:.3f} |"),
        (f"| {e['frames']} single-frame multipart bodies (today's `POST /v1/frames`) | "
        f"{e['multipart_single_ms_per_frame']:.3f} |"), "",
        f"## JPEG ({j['width']}x{j['height']})", "",
        "| step | ms per frame |", "|---|---|",
        f"| header walk (`check_jpeg`) | {j['header_check_ms']:.4f} |",
        *(f"| strict grey decode at 1/{k} | {j[f'decode_1_{k}_ms']:.3f} |" for k in (1, 2, 4, 8)),
        "",
        (f"1/8 decode vs native over {j['frames_compared']} frames: dhash differs by "
        f"{j['dhash_bits_1_8_vs_native']['mean']:.2f} bits on average (max "
        f"{j['dhash_bits_1_8_vs_native']['max']}), brightness by "
        f"{j['brightness_abs_diff_1_8_vs_native']['mean']:.3f} grey levels (max "
        f"{j['brightness_abs_diff_1_8_vs_native']['max']:.3f})."), "",
        "## Storage", "",
        "| step | ms per frame |", "|---|---|",
        (f"| write, `frame_sync=per_file` (2 file fsyncs + folder fsync) | "
        f"{s['per_file_ms_per_frame']:.3f} |"),
        (f"| write, `frame_sync=group` (no fsync; one `sync()` per {BATCH} frames) | "
        f"{s['group_ms_per_frame']:.3f} |"),
        (f"| sidecar read back from disk (`frame_read_back`) | "
        f"{s['read_back_disk_ms_per_frame']:.3f} |"),
        (f"| sidecar made and checked in memory (`frame_sidecar`) | "
        f"{s['read_back_memory_ms_per_frame']:.3f} |"), "",
        "## Lookup: is this frame id already stored? (once per upload)", "",
        ("| date folders in the camera's folder | in every folder (`find_frame`), ms | "
         "in the record's own folder (the gateway's check), ms |"), "|---|---|---|",
        *(f"| {n} | {v:.4f} | {own.get(n, float('nan')):.4f} |" for n, v in
          doc["lookup"]["find_frame_new_frame_ms_by_day_folders"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--pool", type=int, default=48)
    ap.add_argument("--synthetic-jpegs", action="store_true",
                    help="synthetic textures instead of the shared videos' frames")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--store", type=Path, default=None,
                    help="folder on the file system to measure (default: a temp folder)")
    args = ap.parse_args(argv)
    load_start = _load_average()  # the cores are shared: the report says how busy they were
    jpegs, source = load_jpegs(args.pool, 640, 85, synthetic=args.synthetic_jpegs)
    frames = [(_metadata(i, j.width, j.height), j.data) for i, j in enumerate(jpegs[:BATCH])]
    with tempfile.TemporaryDirectory(dir=args.store) as tmp:
        settings = GatewaySettings(home=Path(tmp) / "home")
        doc = {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "jpegs": f"{len(jpegs)} frames of {source}, 640 px, mean "
                     f"{statistics.fmean(len(j.data) for j in jpegs) / 1024:.0f} KiB",
            "envelope": envelope(frames, settings, args.repeat),
            "jpeg": jpeg_costs(jpegs, args.repeat),
            "storage": storage_costs(jpegs, Path(tmp) / "frames", args.rounds),
            "lookup": lookup_costs(Path(tmp) / "lookup", args.repeat),
        }
    doc["load_average_start_end"] = [load_start, _load_average()]
    write_text_atomic(args.out / "intake_parsing.json", json.dumps(doc, indent=2) + "\n",
                      parents=True)
    write_text_atomic(args.out / "intake_parsing.md", to_markdown(doc), parents=True)
    print(to_markdown(doc))


if __name__ == "__main__":
    main()
