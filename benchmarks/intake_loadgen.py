"""A cheap closed-loop load generator for the gateway's frame intake (``gateway_intake``).

It must not eat the cores it measures, so:

* every request (head + body) is built BEFORE the timed window: the metadata of each frame is
  serialised once, the JPEG bytes are shared references, and an upload is a list of byte
  chunks the agent only writes to its socket (``build_agent_requests``);
* one asyncio task per simulated agent, each with one raw HTTP/1.1 keep-alive connection
  (``asyncio`` streams, uvloop when installed): no HTTP client library on the hot path;
* closed loop: an agent sends its next request when the previous one is answered, as the
  real agent's uploader does.

Two request shapes: ``POST /v1/frames`` (one multipart frame, what every agent speaks) and
``POST /v1/frames/batch`` (``application/vnd.roadloop.frame-batch``: 4-byte big-endian
manifest length, JSON manifest ``{"frames": [{"metadata": ..., "image_bytes": n}, ...]}``,
then the JPEGs concatenated; see the batch protocol in the gateway's docs).

Inputs (``load_jpegs``): frames of the shared videos re-encoded as JPEGs, each with the
edge-computed quality block the agent sends.

Acknowledgement follows the agent's rules: 201 or 409 acknowledges a frame; 429/503/507, a
5xx or a transport error means "retry later" (the same frames are re-sent, so a frame stored
just before a crash comes back as a 409); any other 4xx rejects the frame for good.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np

from roadloop.data.frame_quality import compute_quality

BATCH_CONTENT_TYPE = "application/vnd.roadloop.frame-batch"
RETRY_CODES = frozenset({429, 503, 507})
ACK_CODES = frozenset({201, 409})
_BOUNDARY = "roadloopbenchboundary7d1f0c"


@dataclass(frozen=True)
class Jpeg:
    data: bytes
    width: int
    height: int
    quality: dict[str, Any]


@dataclass
class PreparedRequest:
    """One upload ready to send: the frames it carries and the bytes that make it."""

    frame_ids: list[str]
    chunks: list[bytes]
    batch: bool

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


# ---------------------------------------------------------------------------- inputs
# What the intake benchmarks encode the shared videos' frames at: 46.1 KB a 640 px frame. The
# in-process benchmarks use it too, so that their per-frame costs sit beside the server's (at
# 80, 39.6 KB, a frame is cheaper to hash, decode and write).
JPEG_QUALITY = 85


def describe_jpegs(jpegs: list[Jpeg], source: str, jpeg_quality: int) -> str:
    """How a report names its JPEG pool: count, source, width, quality and mean size (the
    figures that make two benchmarks' per-frame costs comparable)."""
    mean = round(sum(len(j.data) for j in jpegs) / max(1, len(jpegs)))
    width = jpegs[0].width if jpegs else 0
    return (f"{len(jpegs)} frames of {source}, {width} px, JPEG quality {jpeg_quality}, "
            f"mean {mean} B")


def load_jpegs(n: int, width: int, jpeg_quality: int, *,
               synthetic: bool = False) -> tuple[list[Jpeg], str]:
    """``n`` frames spread over the shared videos; with ``synthetic``, smooth random textures
    instead. No shared videos without ``synthetic`` is an error, not a quiet switch: the
    textures encode to ~38 KB where the videos' frames average ~46 KB, and decoding them
    costs the gateway less, so a run from a checkout that cannot see ``../shared`` (a git
    worktree elsewhere, say) would otherwise measure other inputs than the runs it is set
    beside (it did: ``benchmarks/results/intake-1128-s13/README.md``)."""
    from roadloop.settings import get_settings

    images: list[np.ndarray] = []
    if synthetic:
        rng = np.random.default_rng(0)
        images = [cv2.resize(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), (640, 360),
                             interpolation=cv2.INTER_CUBIC) for _ in range(n)]
        source = "synthetic textures (--synthetic-jpegs)"
    else:
        videos_dir = get_settings().videos_dir
        videos = sorted(videos_dir.glob("*.mp4"))
        for video in videos:
            cap = cv2.VideoCapture(str(video))
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 300
            per = max(1, n // len(videos) + 1)
            for k in range(per):
                cap.set(cv2.CAP_PROP_POS_FRAMES, int(k * total / per))
                ok, frame = cap.read()
                if ok and frame is not None:
                    images.append(frame)
            cap.release()
        if not images:
            raise SystemExit(
                f"no readable *.mp4 under {videos_dir}: point ROADLOOP_SHARED_DIR at the shared "
                "data folder, or pass --synthetic-jpegs to measure with synthetic textures "
                "(not comparable with runs on the videos' frames)")
        source = f"shared videos ({', '.join(v.name for v in videos)}) in {videos_dir}"
    out = []
    for img in images[:n]:
        h, w = img.shape[:2]
        if w != width:
            img = cv2.resize(img, (width, round(h * width / w)), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok
        q = compute_quality(img).model_dump()
        out.append(Jpeg(buf.tobytes(), img.shape[1], img.shape[0], q))
    return out, source


def host_decode_ms(jpegs: list[Jpeg], rounds: int = 5) -> float:
    """How fast this host is right now, in the gateway's own terms: one thread's strict
    1/8-scale grey decode of ``jpegs`` (what the gateway does to every upload), ms a frame,
    best of ``rounds``. This host's speed drifts by hours (``docs/capacity.md``); a run's
    figure beside its P99 says which kind of hour it ran in."""
    from fleet.jpeg import decode_grey, inspect_jpeg  # the gateway's own decode

    infos = [inspect_jpeg(j.data) for j in jpegs]  # the header walk is not timed
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for j, info in zip(jpegs, infos):
            decode_grey(j.data, info, 8)
        best = min(best, (time.perf_counter() - t0) / max(1, len(jpegs)))
    return round(best * 1000, 3)


# ---------------------------------------------------------------------------- bodies
# What an agent's redaction states (edge_agent.redaction): a camera whose configuration
# redacts (the default) refuses a frame that states none.
AGENT_REDACTION = {"method": "blur", "version": "roadloop-redaction/1 centerface:bench",
                   "counts": {"face": 0}, "area_share": 0.0}


def frame_metadata(camera_id: str, frame_id: str, jpeg: Jpeg, captured_at: str) -> dict[str, Any]:
    return {
        "frame_id": frame_id, "camera_id": camera_id, "captured_at": captured_at,
        "reasons": ["base_rate"], "importance": 1.0, "model_version": "bench",
        "detections": [], "width": jpeg.width, "height": jpeg.height, "quality": jpeg.quality,
        "redaction": AGENT_REDACTION,
    }


def multipart_body(metadata: dict[str, Any], jpeg: bytes) -> list[bytes]:
    """``metadata`` (text field) and ``image`` (file part), as the agent's httpx form sends."""
    head = (
        f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n"
        f"{json.dumps(metadata, separators=(',', ':'))}\r\n"
        f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return [head, jpeg, f"\r\n--{_BOUNDARY}--\r\n".encode()]


def batch_body(frames: list[tuple[dict[str, Any], bytes]]) -> list[bytes]:
    """The raw batch envelope: uint32 BE manifest length, manifest JSON, the JPEGs in order."""
    manifest = json.dumps(
        {"frames": [{"metadata": m, "image_bytes": len(j)} for m, j in frames]},
        separators=(",", ":"),
    ).encode()
    return [struct.pack(">I", len(manifest)) + manifest, *(j for _, j in frames)]


def split_batch(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """Inverse of ``batch_body`` (for checks): [(metadata, jpeg bytes)]."""
    (n,) = struct.unpack(">I", body[:4])
    manifest = json.loads(body[4:4 + n])
    out, pos = [], 4 + n
    for entry in manifest["frames"]:
        size = entry["image_bytes"]
        out.append((entry["metadata"], body[pos:pos + size]))
        pos += size
    if pos != len(body):
        raise ValueError(f"batch body has {len(body) - pos} bytes after the last image")
    return out


def http_request(host: str, path: str, token: str, content_type: str,
                 body: list[bytes]) -> list[bytes]:
    """Request line and headers (keep-alive, Content-Length) followed by the body chunks."""
    length = sum(len(c) for c in body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return [head, *body]


def build_request(host: str, token: str, camera_id: str,
                  frames: list[tuple[str, Jpeg]], batch: bool, captured_at: str) -> PreparedRequest:
    """One upload of ``frames`` ([(frame_id, jpeg)]): multipart when ``batch`` is false (one
    frame), else the raw batch envelope."""
    metas = [(frame_metadata(camera_id, fid, jp, captured_at), jp.data) for fid, jp in frames]
    if batch:
        chunks = http_request(host, "/v1/frames/batch", token, BATCH_CONTENT_TYPE,
                              batch_body(metas))
    else:
        if len(frames) != 1:
            raise ValueError("a multipart upload carries exactly one frame")
        chunks = http_request(host, "/v1/frames", token,
                              f"multipart/form-data; boundary={_BOUNDARY}",
                              multipart_body(*metas[0]))
    return PreparedRequest([fid for fid, _ in frames], chunks, batch)


@dataclass
class AgentPlan:
    """What one simulated agent sends: pre-built requests, then more built on demand."""

    host: str
    token: str
    camera_id: str
    jpegs: list[Jpeg]
    batch: int  # frames per request; 1 = the multipart route
    offset: int = 0
    prebuilt: list[PreparedRequest] = field(default_factory=list)
    next_seq: int = 0
    built_late: int = 0  # requests built inside the timed window (pre-built ones ran out)

    def _frames(self, n: int) -> list[tuple[str, Jpeg]]:
        out = []
        for _ in range(n):
            seq = self.next_seq
            out.append((f"{self.camera_id}-{seq:07d}",
                        self.jpegs[(self.offset + seq) % len(self.jpegs)]))
            self.next_seq += 1
        return out

    def request_for(self, frames: list[tuple[str, Jpeg]]) -> PreparedRequest:
        now = datetime.now(UTC).isoformat()
        return build_request(self.host, self.token, self.camera_id, frames,
                             self.batch > 1, now)

    def prebuild(self, frames: int) -> None:
        now = datetime.now(UTC).isoformat()
        for _ in range(math.ceil(frames / self.batch)):
            self.prebuilt.append(build_request(self.host, self.token, self.camera_id,
                                               self._frames(self.batch), self.batch > 1, now))

    def requests(self) -> Iterator[PreparedRequest]:
        """Pre-built requests first (a later call goes on where an earlier one stopped: a
        warm-up and the timed window send different frames), then built on the fly."""
        while self.prebuilt:
            yield self.prebuilt.pop(0)
        while True:
            self.built_late += 1
            yield self.request_for(self._frames(self.batch))

    def jpeg_for(self, frame_id: str) -> Jpeg:
        """The JPEG a frame id of this agent carries."""
        seq = int(frame_id.rsplit("-", 1)[1])
        return self.jpegs[(self.offset + seq) % len(self.jpegs)]

    def retry_request(self, frame_ids: list[str]) -> PreparedRequest:
        """A request re-sending some frames of an earlier one (same ids, same pixels)."""
        return self.request_for([(fid, self.jpeg_for(fid)) for fid in frame_ids])


# ---------------------------------------------------------------------------- transport
class HttpConnection:
    """One HTTP/1.1 keep-alive connection on asyncio streams; reconnects when closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def send(self, chunks: list[bytes]) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.writelines(chunks)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._read_chunked()
            else:
                body = await self.reader.read()
                headers["connection"] = "close"
        except BaseException:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


# ---------------------------------------------------------------------------- agents
@dataclass
class AgentResult:
    camera_id: str
    acked: list[str] = field(default_factory=list)  # 201 or 409, in order
    acked_in_window: int = 0
    requests_in_window: int = 0
    # (request latency ms, frames that request acknowledged) for requests sent in the window
    latencies: list[tuple[float, int]] = field(default_factory=list)
    latency_at: list[float] = field(default_factory=list)  # each one's send (due) time, s
    codes: dict[int, int] = field(default_factory=dict)  # per frame (batch: per result)
    request_codes: dict[int, int] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    transport_errors: int = 0
    retried_frames: int = 0
    unacknowledged: list[str] = field(default_factory=list)  # still pending at the end
    built_late: int = 0


def classify(req: PreparedRequest, status: int,
             body: bytes) -> tuple[list[str], list[str], list[str], list[int]]:
    """(acknowledged, retry, rejected, per-frame codes) of one answered request."""
    if req.batch and status == 200:
        ack, retry, rej, codes = [], [], [], []
        results = json.loads(body)["results"]
        for fid, res in zip(req.frame_ids, results, strict=True):
            code = int(res["status"])
            codes.append(code)
            (ack if code in ACK_CODES else retry if code in RETRY_CODES else rej).append(fid)
        return ack, retry, rej, codes
    codes = [status] * len(req.frame_ids)
    if status in ACK_CODES and not req.batch:
        return list(req.frame_ids), [], [], codes
    if status in RETRY_CODES or status >= 500:
        return [], list(req.frame_ids), [], codes
    return [], [], list(req.frame_ids), codes


async def run_agent(plan: AgentPlan, res: AgentResult, host: str, port: int, start: float,
                    duration: float, drain_s: float = 0.0, interval_s: float | None = None,
                    phase_s: float = 0.0) -> AgentResult:
    """Closed loop for ``duration`` s from ``start``; then, for up to ``drain_s`` s, re-send
    only what is still unacknowledged (what an agent's outbox would retry). ``res`` fills in
    as it goes (a caller may read ``res.acked`` mid-run).

    With ``interval_s`` the agent is paced instead: its k-th new request is due at
    ``start + phase_s + k * interval_s`` (sent at once when it is already late), and a frame's
    latency runs from that due time, so a slow answer delays every later request's latency
    too (no coordinated omission)."""
    conn = HttpConnection(host, port)
    fresh = plan.requests()
    retry: deque[PreparedRequest] = deque()
    backoff = 0.02
    end = start + duration
    k = 0
    try:
        while True:
            now = time.perf_counter()
            in_window = now < end
            if not in_window and (not retry or now >= end + drain_s):
                break
            due = None
            if retry:
                req = retry.popleft()
            else:
                if interval_s is not None:
                    due = start + phase_s + k * interval_s
                    k += 1
                    if due >= end:
                        await asyncio.sleep(max(0.0, end - now))
                        continue
                    if due > now:
                        await asyncio.sleep(due - now)
                req = next(fresh)
            t0 = time.perf_counter()
            try:
                status, headers, body = await conn.send(req.chunks)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, IndexError):
                res.transport_errors += 1
                res.retried_frames += len(req.frame_ids)
                retry.appendleft(req)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            dt_ms = (time.perf_counter() - (t0 if due is None else min(t0, due))) * 1000
            backoff = 0.02
            res.request_codes[status] = res.request_codes.get(status, 0) + 1
            try:
                ack, again, rej, codes = classify(req, status, body)
            except (ValueError, KeyError, TypeError):  # a 200 whose results do not parse
                ack, again, rej, codes = [], [], list(req.frame_ids), [-1] * len(req.frame_ids)
            for c in codes:
                res.codes[c] = res.codes.get(c, 0) + 1
            res.acked.extend(ack)
            res.rejected.extend(rej)
            if in_window:
                res.requests_in_window += 1
                res.acked_in_window += len(ack)
                if ack:
                    res.latencies.append((dt_ms, len(ack)))
                    res.latency_at.append((t0 if due is None else min(t0, due)) - start)
            if again:
                res.retried_frames += len(again)
                retry.append(req if len(again) == len(req.frame_ids)
                             else plan.retry_request(again))
                if not ack:
                    await asyncio.sleep(float(headers.get("retry-after", 0) or 0) or backoff)
    finally:
        await conn.close()
    res.unacknowledged = [f for r in retry for f in r.frame_ids]
    res.built_late = plan.built_late
    return res


def weighted_percentile(samples: list[tuple[float, int]], q: float) -> float | None:
    """Percentile ``q`` of per-frame latency: each request's latency counts once per frame
    it acknowledged (a frame's acknowledgement latency is its request's latency)."""
    pairs = sorted((v, w) for v, w in samples if w > 0)
    total = sum(w for _, w in pairs)
    if not total:
        return None
    rank = q / 100 * total
    seen = 0
    for v, w in pairs:
        seen += w
        if seen >= rank:
            return v
    return pairs[-1][0]


def install_fast_loop() -> str:
    """uvloop when installed (cheaper per request), else the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
