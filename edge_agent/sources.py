"""Frame sources (video file, folder of images, RTSP/HTTP stream) and the latest-frame reader.

A source yields ``Frame``s. ``LatestFrameReader`` runs a source on its own thread and hands
the inference loop one frame at a time:

* ``drop_stale=True`` (live streams, and files in realtime mode): the reader keeps only the
  newest frame. If inference has not taken the previous one when the next arrives, the old
  one is *dropped* and counted (``dropped``) — memory stays bounded and the detector always
  works on the freshest picture.
* ``drop_stale=False`` (files, as fast as possible): a one-slot hand-off; the reader waits
  for the consumer, so every frame is processed (reproducible runs and tests).

``open_source`` picks the source from a spec: ``rtsp://``, ``rtsp(s)://``, ``http(s)://``
URLs are streams; a directory is a folder of images; anything else is a video file.
File sources can be paced at the video's fps (``realtime=True``) or read as fast as possible.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
# A video file's header fps is believed within these bounds (a broken time scale gives
# 0.0025); outside them the file is timed at DEFAULT_FILE_FPS until its timestamps take over.
MIN_FILE_FPS, MAX_FILE_FPS, DEFAULT_FILE_FPS = 1.0, 1000.0, 25.0
# A pass through a file that yields fewer than this share of its header's frame count is
# reported as cut short or damaged (counts are estimates in some containers: not exact).
SHORT_FILE_SHARE = 0.9
# A step between two frames' timestamps is believed up to the larger of MAX_PTS_STEP_S and
# PTS_STEP_PERIODS times the file's typical step (the median of its last PTS_STEP_HISTORY
# steps; 1/fps before any). 10 s is ten times the tracker's ``lost_s`` and twice the longest
# gap an interval counts as watched (``MAX_FRAME_GAP_S``), so no real frame spacing of a
# camera file comes near it, while the factor keeps a time-lapse (a frame every 30 s) on its
# own timestamps. A longer step -- a corrupted timestamp, or a recording paused for hours --
# advances media time by the bound only: one bad PTS cannot shift the rest of the file, and
# a real pause still reads as a pause (tracks end; speeds are not measured across it).
MAX_PTS_STEP_S, PTS_STEP_PERIODS, PTS_STEP_HISTORY = 10.0, 10.0, 15


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message names it."""


@dataclass
class Frame:
    """One frame from a source: pixels (BGR uint8) plus where and when they came from."""

    image: np.ndarray
    index: int  # position in the source (0-based), monotonic
    captured_at: float  # unix time (s) when the frame was read
    source_ref: str  # e.g. "video:cctv_street.mp4#123", "image:/x/y.jpg", "stream:rtsp://…"
    # Seconds on the source's own clock (a file's frame index / fps), so motion measured
    # between frames (tracking, speeds) is right even when a file is read faster than real
    # time; None for a live stream, whose clock is ``monotonic_time``.
    media_time: float | None = None
    # A live stream's media clock: ``time.monotonic()`` when the frame was read. The wall
    # clock (``captured_at``) can step back or forward (an NTP correction); the tracker
    # drops every update timed before its last one, and speeds over a step are nonsense.
    monotonic_time: float | None = None

    @property
    def stream_time(self) -> float:
        """The clock motion is measured on: the file's media time, a live frame's monotonic
        read time, else (a frame built without either) its capture time."""
        if self.media_time is not None:
            return self.media_time
        return self.captured_at if self.monotonic_time is None else self.monotonic_time

    @property
    def is_live(self) -> bool:
        """A live frame's records follow its wall clock (``captured_at``); a file's follow
        its media time (one record per minute of video, however fast it is read)."""
        return self.media_time is None

    @property
    def captured_at_iso(self) -> str:
        return datetime.fromtimestamp(self.captured_at, UTC).isoformat()


@dataclass
class SourceStats:
    frames_read: int = 0
    read_errors: int = 0
    reconnects: int = 0


class FrameSource:
    """Base class: ``frames(stop)`` yields frames until exhausted or ``stop`` is set."""

    kind = "source"
    is_live = False

    def __init__(self) -> None:
        self.stats = SourceStats()

    def frames(self, stop: threading.Event) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


class _Pacer:
    """Sleeps so that frame ``i`` is released at ``start + i / fps`` (realtime mode)."""

    def __init__(self, fps: float | None) -> None:
        self.period = 1.0 / fps if fps and fps > 0 else 0.0
        self.start: float | None = None

    def wait(self, i: int, stop: threading.Event) -> None:
        if not self.period:
            return
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + i * self.period - time.monotonic()
        if delay > 0:
            stop.wait(delay)


class VideoFileSource(FrameSource):
    kind = "video"

    def __init__(self, path: Path | str, *, realtime: bool = True, loop: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such video file")
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise SourceError(f"{self.path}: OpenCV cannot open it as a video")
            fps = cap.get(cv2.CAP_PROP_FPS)
            self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        finally:
            cap.release()
        if fps and MIN_FILE_FPS <= fps < MAX_FILE_FPS:
            self.fps = float(fps)
        else:  # absent, or a header no camera writes (a broken time scale, say)
            logger.warning("%s: its header says %s frames/s; timing it at %g frames/s until "
                           "its frame timestamps say otherwise", self.path.name,
                           f"{fps:.4g}" if fps else "nothing", DEFAULT_FILE_FPS)
            self.fps = DEFAULT_FILE_FPS
        self.realtime = realtime
        self.loop = loop
        self._jumps = 0  # timestamps far ahead of the frame before (see MAX_PTS_STEP_S)
        # The frame period a header below MIN_FILE_FPS states (a time-lapse's 30 s) is not
        # paced at, but bounds the first step until the file's own steps do.
        self._header_period = 1.0 / fps if fps and 0 < fps < MIN_FILE_FPS else 0.0

    def describe(self) -> str:
        return f"video {self.path.name} ({self.fps:.1f} fps, {self.frame_count} frames)"

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """The file's frames, each with its media time: the container's own timestamp
        (``CAP_PROP_POS_MSEC``) relative to the first frame, so a variable-frame-rate file
        times its motion right; ``1 / fps`` steps where a timestamp does not advance, and a
        step beyond the bound (``MAX_PTS_STEP_S``) advances by the bound only."""
        pacer = _Pacer(self.fps if self.realtime else None)
        index = 0
        offset = 0.0  # media time at which this pass through the file starts (loop)
        last: float | None = None
        while not stop.is_set():
            cap = cv2.VideoCapture(str(self.path))
            if not cap.isOpened():
                raise SourceError(f"{self.path}: OpenCV cannot open it as a video")
            pos = 0
            shift: float | None = None  # media time = timestamp + shift (re-based: below)
            steps: deque[float] = deque(maxlen=PTS_STEP_HISTORY)
            try:
                while not stop.is_set():
                    pacer.wait(index, stop)
                    ok, image = cap.read()
                    if not ok or image is None:
                        break
                    self.stats.frames_read += 1
                    ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                    stamp = ms / 1000.0 if math.isfinite(ms) else None
                    if shift is None or stamp is None:  # no timestamp (yet): index / fps
                        t = offset if last is None else last + 1.0 / self.fps
                        if stamp is not None:
                            shift = t - stamp
                    else:
                        t, shift = self._media_time(stamp, shift, last, steps, pos)
                    last = t
                    yield Frame(image, index, time.time(), f"video:{self.path.name}#{pos}", t)
                    index += 1
                    pos += 1
            finally:
                cap.release()
            self._check_whole(pos)
            if not self.loop or pos == 0:
                return
            offset = (last or 0.0) + 1.0 / self.fps

    def _media_time(self, stamp: float, shift: float, last: float, steps: deque[float],
                    pos: int) -> tuple[float, float]:
        """``(media time, shift)`` of a frame stamped ``stamp`` after one timed ``last``:
        its own timestamp while it is after the last by at most the bound
        (``MAX_PTS_STEP_S``); ``bound`` later, re-based, when it is further ahead; ``1/fps``
        later when it is not after the last (re-based only when it is more than the bound
        back, so a timestamp that stalls a few frames is caught up with)."""
        t = stamp + shift
        step = t - last
        bound = max(MAX_PTS_STEP_S, PTS_STEP_PERIODS * (
            sorted(steps)[len(steps) // 2] if steps
            else max(1.0 / self.fps, self._header_period)))
        if step > 0:
            steps.append(step)
        if 0 < step <= bound:
            return t, shift
        if step > bound:
            self._jumps += 1
            self.stats.read_errors += 1
            if self._jumps <= 3:  # a file of broken stamps must not flood the log
                logger.warning("%s: frame %d is stamped %.6g s after the one before, beyond "
                               "the %.3g s believed (a damaged timestamp, or a pause in the "
                               "recording): timed %.3g s after it", self.path.name, pos, step,
                               bound, bound)
            t = last + bound
            return t, t - stamp
        t = last + 1.0 / self.fps
        return t, (t - stamp if step < -bound else shift)

    def _check_whole(self, frames: int) -> None:
        """Say so when a pass ended well before the frame count the header gave: a file cut
        short or damaged inside ends like a whole one otherwise."""
        if self.frame_count > 0 and frames < SHORT_FILE_SHARE * self.frame_count:
            self.stats.read_errors += 1
            logger.warning("%s ended after %d of the %d frames its header lists: the file is "
                           "cut short or damaged", self.path.name, frames, self.frame_count)


class ImageFolderSource(FrameSource):
    """Images of a folder in name order; unreadable files are logged, counted and skipped."""

    kind = "images"

    def __init__(
        self, folder: Path | str, *, realtime: bool = True, fps: float = 5.0, loop: bool = False
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder}: not a directory")
        self.paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SourceError(f"{self.folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.fps = fps
        self.realtime = realtime
        self.loop = loop

    def describe(self) -> str:
        return f"image folder {self.folder} ({len(self.paths)} images)"

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """The images in name order (again and again with ``loop``). An unreadable file is
        counted every time and logged the first time it fails (again only after it has been
        read). A pass that yields no image at all ends the source with a ``SourceError``
        (the agent stops with ``source_error``): looping over nothing would spin the reader."""
        pacer = _Pacer(self.fps if self.realtime else None)
        index = 0
        failing: set[Path] = set()  # unreadable files already logged
        while not stop.is_set():
            yielded = 0
            for path in self.paths:
                if stop.is_set():
                    return
                pacer.wait(index, stop)
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    self.stats.read_errors += 1
                    if path not in failing:
                        failing.add(path)
                        logger.warning("%s: not a readable image, skipped", path)
                    continue
                failing.discard(path)
                self.stats.frames_read += 1
                yielded += 1
                yield Frame(image, index, time.time(), f"image:{path}", index / self.fps)
                index += 1
            if not yielded and not stop.is_set():
                raise SourceError(f"{self.folder}: none of its {len(self.paths)} images could "
                                  "be read")
            if not self.loop:
                return


class StreamSource(FrameSource):
    """An RTSP/HTTP stream through OpenCV; reconnects with capped backoff when it drops."""

    kind = "stream"
    is_live = True

    def __init__(
        self, url: str, *, reconnect_max_delay_s: float = 30.0, max_reconnects: int | None = None
    ) -> None:
        super().__init__()
        self.url = url
        self.reconnect_max_delay_s = reconnect_max_delay_s
        self.max_reconnects = max_reconnects

    def describe(self) -> str:
        return f"stream {self._redacted()}"

    def _redacted(self) -> str:
        # Never log credentials embedded in the URL (rtsp://user:pass@host/...).
        if "@" in self.url and "://" in self.url:
            scheme, rest = self.url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        index, failures = 0, 0
        while not stop.is_set():
            cap = cv2.VideoCapture(self.url)
            try:
                while cap.isOpened() and not stop.is_set():
                    ok, image = cap.read()
                    if not ok or image is None:
                        break
                    failures = 0
                    self.stats.frames_read += 1
                    yield Frame(image, index, time.time(), f"stream:{self._redacted()}",
                                monotonic_time=time.monotonic())
                    index += 1
            finally:
                cap.release()
            if stop.is_set():
                return
            failures += 1
            self.stats.reconnects += 1
            if self.max_reconnects is not None and failures > self.max_reconnects:
                raise SourceError(
                    f"{self._redacted()}: stream unavailable after {failures - 1} retries"
                )
            delay = min(self.reconnect_max_delay_s, 0.5 * 2 ** min(failures, 10))
            logger.warning(
                "%s: stream lost or not reachable; reconnecting in %.1fs", self._redacted(), delay
            )
            stop.wait(delay)


def open_source(
    spec: str, *, realtime: bool = True, loop: bool = False, image_fps: float = 5.0
) -> FrameSource:
    """A source from a CLI spec: a stream URL, a folder of images or a video file."""
    if not spec.strip():
        raise SourceError("the source is empty: give a video file, a folder of images or a "
                          "stream URL")
    if spec.lower().startswith(STREAM_SCHEMES):
        return StreamSource(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(path, realtime=realtime, fps=image_fps, loop=loop)
    return VideoFileSource(path, realtime=realtime, loop=loop)


@dataclass
class _Slot:
    frame: Frame | None = None
    ended: bool = False
    error: BaseException | None = None
    dropped: int = 0
    delivered: int = 0
    produced: int = 0


class LatestFrameReader:
    """Runs ``source`` on a daemon thread; ``get()`` returns the next frame for inference.

    See the module docstring for ``drop_stale``. ``dropped`` counts frames replaced before
    the consumer took them; every produced frame is either delivered or dropped.
    """

    def __init__(self, source: FrameSource, *, drop_stale: bool | None = None) -> None:
        self.source = source
        if drop_stale is None:
            drop_stale = source.is_live or bool(getattr(source, "realtime", False))
        self.drop_stale = drop_stale
        self._cond = threading.Condition()
        self._slot = _Slot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-reader", daemon=True)

    # ---- producer
    def start(self) -> LatestFrameReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for frame in self.source.frames(self._stop):
                with self._cond:
                    if not self.drop_stale:
                        while self._slot.frame is not None and not self._stop.is_set():
                            self._cond.wait(0.1)
                        if self._stop.is_set():
                            break
                    elif self._slot.frame is not None:
                        self._slot.dropped += 1
                    self._slot.frame = frame
                    self._slot.produced += 1
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the consumer through get()/error
            logger.error("frame source %s failed: %s", self.source.describe(), exc)
            with self._cond:
                self._slot.error = exc
        finally:
            with self._cond:
                self._slot.ended = True
                self._cond.notify_all()

    # ---- consumer
    def get(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet delivered; ``None`` on timeout or when the source ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._slot.frame is None:
                if self._slot.ended or self._stop.is_set():
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._slot.frame = self._slot.frame, None
            self._slot.delivered += 1
            self._cond.notify_all()
            return frame

    @property
    def exhausted(self) -> bool:
        """The source ended (or was stopped) and the last frame has been taken."""
        with self._cond:
            return (self._slot.ended or self._stop.is_set()) and self._slot.frame is None

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._slot.ended

    @property
    def dropped(self) -> int:
        with self._cond:
            return self._slot.dropped

    @property
    def produced(self) -> int:
        with self._cond:
            return self._slot.produced

    @property
    def delivered(self) -> int:
        with self._cond:
            return self._slot.delivered

    @property
    def error(self) -> BaseException | None:
        with self._cond:
            return self._slot.error

    def stop(self, join_timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(join_timeout)
