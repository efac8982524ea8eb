"""The JPEG of a frame upload: its structure checked without decoding, then one strict decode.

What an upload may cost is decided from its header, before any pixel is decoded
(``inspect_jpeg``): a few-KB file can claim a 4096x2160 image, and a decoder allocates
what the header claims. So the gateway

* walks the marker structure in pure Python (no allocation beyond the bytes it has):
  one frame header of a supported kind (baseline, extended or progressive Huffman, 8-bit,
  grey or YCbCr), width x height within ``max_image_pixels``, at most ``max_jpeg_scans``
  scans, APPn/COM segments within ``max_jpeg_metadata_bytes``, and the end-of-image marker
  as the file's last two bytes — a file that goes on after it carries another format
  (a ZIP, a PNG) and is refused;
* decodes once, greyscale, at reduced scale (``decode_scale``: 1080p at 1/2, 4K at 1/4;
  libjpeg scales in the DCT domain, so the output buffer is small) and *strictly*: a JPEG
  that libjpeg decodes only with a warning — "premature end of data segment" when the
  image data stops short (the file still ends in FFD9), "extraneous bytes before marker" —
  is refused instead of being stored as a grey frame. OpenCV prints such warnings and
  returns the picture anyway, so the decode is simplejpeg's (libjpeg-turbo, ``strict=True``).

Memory per decode stays under about 7 bytes per pixel of the claimed image — at most ~60 MiB
at the 4096x2160 cap (measured): a progressive JPEG's whole-image coefficient buffer (up to
6 bytes a pixel for 4:4:4, even at reduced scale) plus a native-scale output when a client
sends no sharpness (1 byte a pixel, then 2 for its int16 Laplacian). ``DecodePool`` runs at most ``max_concurrent_decodes`` at once, on as
many dedicated threads: glibc keeps freed memory in the arena of the thread that used it,
so decoding on whichever of the 64 request threads happened to run the upload would leave
every arena holding a decode's worth of memory (measured: RSS grew with the number of
concurrent uploads, not with the number of decode slots).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import simplejpeg

from roadloop.data.frame_quality import FrameQuality, dhash_hex, laplacian_variance

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SUPPORTED_SOF = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
_SOF_NAMES = {
    0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical progressive",
    0xC7: "hierarchical lossless", 0xC9: "arithmetic-coded", 0xCA: "arithmetic progressive",
    0xCB: "arithmetic lossless", 0xCD: "arithmetic hierarchical",
    0xCE: "arithmetic hierarchical progressive", 0xCF: "arithmetic hierarchical lossless",
}
# In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker
# (D0-D7) or fill (FF): anything else is the next real marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SIGNATURES = (
    (b"PK\x03\x04", "a ZIP archive"), (b"PK\x05\x06", "a ZIP archive"),
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a second JPEG"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"Rar!", "a RAR archive"), (b"7z\xbc\xaf", "a 7z archive"),
    (b"\x1f\x8b", "gzip data"), (b"RIFF", "a RIFF file"),
)
DECODE_SCALES = (1, 2, 4, 8)
T = TypeVar("T")


class JpegError(ValueError):
    """The upload is not a usable JPEG; the message says what is wrong."""


@dataclass(frozen=True)
class JpegLimits:
    """What one upload's JPEG may claim (``GatewaySettings`` fields of the same names)."""

    max_side: int = 4096
    max_pixels: int = 4096 * 2160
    max_scans: int = 64
    max_metadata_bytes: int = 128 * 1024


@dataclass(frozen=True)
class JpegInfo:
    """What the marker structure says, read without decoding any pixel."""

    width: int
    height: int
    components: int
    coding: str  # "baseline" | "extended sequential" | "progressive"
    scans: int
    metadata_bytes: int  # APPn + COM segments

    @property
    def pixels(self) -> int:
        return self.width * self.height


# --------------------------------------------------------------------------- structure
def jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG frame header, without decoding any pixels."""
    info = _walk(data, stop_at_frame_header=True)
    return info.width, info.height


def inspect_jpeg(data: bytes) -> JpegInfo:
    """The whole marker structure, SOI to EOI; ``JpegError`` naming the first defect."""
    return _walk(data, stop_at_frame_header=False)


def _walk(data: bytes, *, stop_at_frame_header: bool) -> JpegInfo:
    if not data:
        raise JpegError("image is empty")
    if data[:3] != b"\xff\xd8\xff":
        raise JpegError("image is not a JPEG (it does not start with the FFD8 marker)")
    n = len(data)
    i = 2
    frame: tuple[int, int, int, str] | None = None
    scans = 0
    metadata_bytes = 0
    while True:
        if i >= n:
            raise _truncated()
        if data[i] != 0xFF:
            raise JpegError(f"JPEG is corrupt (no marker at byte {i})")
        while i < n and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i >= n:
            raise _truncated()
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI
            if frame is None or scans == 0:
                raise JpegError("JPEG has no image data before its end-of-image marker")
            _check_nothing_after(data, i)
            width, height, components, coding = frame
            return JpegInfo(width, height, components, coding, scans, metadata_bytes)
        if marker == 0xD8:
            raise JpegError(f"JPEG has a second start-of-image marker at byte {i - 2}")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if i + 2 > n:
            raise _truncated()
        seg_len = int.from_bytes(data[i : i + 2], "big")
        if seg_len < 2:
            raise JpegError(f"JPEG is corrupt (segment length {seg_len} at byte {i})")
        end = i + seg_len
        if end > n:
            raise _truncated()
        if marker in _SOF_MARKERS:
            if frame is not None:
                raise JpegError("JPEG has more than one frame header (SOF)")
            frame = _frame_header(marker, data[i + 2 : end])
            if stop_at_frame_header:
                return JpegInfo(frame[0], frame[1], frame[2], frame[3], 0, metadata_bytes)
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM
            metadata_bytes += seg_len + 2
        elif marker == 0xDA:  # SOS: skip its entropy-coded data to the next real marker
            if frame is None:
                raise JpegError("JPEG has no frame header (SOF) before its image data")
            scans += 1
            found = _NEXT_MARKER.search(data, end)
            i = found.start() if found is not None else n
            continue
        i = end


def _truncated() -> JpegError:
    return JpegError("JPEG is truncated (it ends before its end-of-image marker): "
                     "re-send the whole file")


def _frame_header(marker: int, body: bytes) -> tuple[int, int, int, str]:
    if marker not in _SUPPORTED_SOF:
        name = _SOF_NAMES.get(marker, f"SOF{marker - 0xC0}")
        raise JpegError(f"JPEG uses {name} coding; send a baseline or progressive JPEG")
    if len(body) < 6:
        raise JpegError("JPEG frame header (SOF) is too short")
    precision = body[0]
    height = int.from_bytes(body[1:3], "big")
    width = int.from_bytes(body[3:5], "big")
    components = body[5]
    if precision != 8:
        raise JpegError(f"JPEG has {precision}-bit samples; send an 8-bit JPEG")
    if components not in (1, 3):
        raise JpegError(f"JPEG has {components} colour components; send a grey (1) or "
                        "YCbCr colour (3) JPEG")
    if len(body) != 6 + 3 * components:
        raise JpegError("JPEG frame header (SOF) length does not match its components")
    return width, height, components, _SUPPORTED_SOF[marker]


def _check_nothing_after(data: bytes, eoi_end: int) -> None:
    extra = len(data) - eoi_end
    if extra <= 0:
        return
    tail = data[eoi_end : eoi_end + 16]
    what = next((name for sig, name in _SIGNATURES if tail.startswith(sig)), "other data")
    plural = "s" if extra != 1 else ""
    raise JpegError(f"JPEG has {extra} byte{plural} after its end-of-image marker ({what}); "
                    "send the JPEG file alone")


def check_jpeg(
    data: bytes, width: int, height: int, max_side: int, limits: JpegLimits | None = None
) -> JpegInfo:
    """Everything that can be known without decoding: structure, limits, size match.

    ``limits.max_side`` is replaced by ``max_side``.
    """
    lim = limits or JpegLimits()
    info = inspect_jpeg(data)
    w, h = info.width, info.height
    if w <= 0 or h <= 0:
        raise JpegError(f"JPEG header claims an empty image ({w}x{h})")
    if w > max_side or h > max_side:
        raise JpegError(f"JPEG is {w}x{h}; the gateway accepts at most {max_side} px a side")
    if info.pixels > lim.max_pixels:
        raise JpegError(f"JPEG is {w}x{h} = {info.pixels} px; the gateway accepts at most "
                        f"{lim.max_pixels} px (max_image_pixels)")
    if (w, h) != (width, height):
        raise JpegError(f"JPEG is {w}x{h} but metadata says {width}x{height}")
    if info.scans > lim.max_scans:
        raise JpegError(f"JPEG has {info.scans} scans; the gateway accepts at most "
                        f"{lim.max_scans}")
    if info.metadata_bytes > lim.max_metadata_bytes:
        raise JpegError(f"JPEG carries {info.metadata_bytes} bytes of APPn/COM segments "
                        f"(EXIF, comments, ...); the gateway accepts at most "
                        f"{lim.max_metadata_bytes}")
    return info


# --------------------------------------------------------------------------- decoding
class DecoderBusy(RuntimeError):
    """Every decode slot stayed taken for the whole wait."""


class DecodePool:
    """At most ``slots`` decodes at once, each run on one of ``slots`` dedicated threads.

    ``run`` waits up to ``wait_s`` for a free slot (``DecoderBusy`` after that), so the
    number of decodes — and the memory they hold, including what the allocator keeps
    around afterwards — is bounded whatever the number of concurrent uploads.
    """

    def __init__(self, slots: int) -> None:
        self.size = slots
        self.slots = threading.BoundedSemaphore(slots)
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="jpeg-decode")

    def run(self, wait_s: float, fn: Callable[..., T], *args: object) -> T:
        if not self.slots.acquire(timeout=wait_s):
            raise DecoderBusy(f"all {self.size} decode slots in use")
        try:  # a slot is held, so a thread is free: the executor never queues
            return self._threads.submit(fn, *args).result()
        finally:
            self.slots.release()

    def close(self) -> None:
        self._threads.shutdown(wait=True)


def decode_scale(width: int, height: int, max_pixels: int) -> int:
    """The smallest of 1, 2, 4, 8 that decodes ``width`` x ``height`` to at most
    ``max_pixels`` (8 when none does)."""
    for scale in DECODE_SCALES:
        if math.ceil(width / scale) * math.ceil(height / scale) <= max_pixels:
            return scale
    return DECODE_SCALES[-1]


def decode_grey(data: bytes, info: JpegInfo, scale: int) -> np.ndarray:
    """The one decode of an upload: grey, at 1/``scale``, strict (a libjpeg warning such as
    a premature end of the image data is an error, not a grey fill)."""
    want_h, want_w = math.ceil(info.height / scale), math.ceil(info.width / scale)
    try:
        out = simplejpeg.decode_jpeg(
            data, colorspace="GRAY", min_height=want_h, min_width=want_w, strict=True
        )
    except ValueError as exc:
        reason = str(exc).strip() or "decoder error"
        raise JpegError(f"JPEG does not decode cleanly ({reason}); re-send the whole, "
                        "unmodified file") from exc
    grey = out.reshape(out.shape[0], out.shape[1])
    if grey.shape != (want_h, want_w):  # the header and the decoder disagree
        raise JpegError(f"JPEG decodes to {grey.shape[1] * scale}x{grey.shape[0] * scale}, "
                        f"not the {info.width}x{info.height} its header claims")
    return grey


DHASH_MIN_DECODE = (72, 40)  # px: at least 8x5 decoded pixels behind each 9x8 dhash cell


def quality_scale(info: JpegInfo, sent: dict[str, float | str], max_decode_pixels: int,
                  dc_only: bool = False) -> int:
    """The scale of an upload's one decode: native when the client sent no sharpness (it is
    defined at native resolution); else the largest within ``max_decode_pixels``, or with
    ``dc_only`` the smallest that still gives ``DHASH_MIN_DECODE`` pixels — 1/8 from 576x320
    up (640x360 and every camera resolution), where libjpeg keeps only each block's DC
    coefficient. It still entropy-decodes every coefficient of every block, so corrupt or
    truncated image data is refused exactly as at full scale; the dhash of a 640x360 frame's
    1/8 decode is the native one's within 0.6 bits on average (max 3 of 64;
    benchmarks/results/intake_parsing.md); a 160x120 frame at 1/8 (20x15) would differ by
    5, hence the floor — which does not apply when the client sent its dhash too."""
    budget = 1 if "sharpness" not in sent else decode_scale(
        info.width, info.height, max_decode_pixels)
    if "sharpness" not in sent or not dc_only:
        return budget
    if "dhash" in sent:  # nothing measured from the pixels but the mean: only a check
        return 8
    min_w, min_h = DHASH_MIN_DECODE
    for scale in (8, 4, 2):
        if math.ceil(info.width / scale) >= min_w and math.ceil(info.height / scale) >= min_h:
            return max(scale, budget)
    return budget


def measure_quality(
    data: bytes, info: JpegInfo, sent: dict[str, float | str], max_decode_pixels: int,
    dc_only: bool = False,
) -> FrameQuality:
    """Decode once (``decode_grey``) and complete ``sent`` (the agent's values, kept as sent).

    * ``dhash`` (agents leave it to the gateway): from the reduced decode — a 9x8 thumbnail
      of a 1/2 or 1/4 decode is the native one's within a bit.
    * ``brightness`` (mean grey level): from the same decode (DCT scaling keeps the mean).
    * ``sharpness`` is defined at native resolution (``FrameQuality``), and a Laplacian at 1/4
      scale measures something else; a client that does not send it gets a native-scale
      decode (bounded by ``max_image_pixels`` and the decode slots), so the stored value
      means the same for every frame.
    """
    scale = quality_scale(info, sent, max_decode_pixels, dc_only)
    grey = decode_grey(data, info, scale)
    values: dict[str, float | str] = {}
    if "dhash" not in sent:
        values["dhash"] = dhash_hex(grey)
    if "brightness" not in sent:
        values["brightness"] = float(grey.mean())
    if "sharpness" not in sent:
        values["sharpness"] = laplacian_variance(grey)
    return FrameQuality.model_validate({**values, **sent})
