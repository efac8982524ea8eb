"""Camera streams with a known drift onset, for the drift benchmark (issue 10).

Each stream is a lossless video (FFV1 in Matroska; Motion-JPEG ``.avi`` where this OpenCV
cannot write FFV1) at ``FPS`` (10) frames/s and ``FRAME_SIZE`` (640x360), plus its truth:
the frame where the shift starts (``None`` for a stable stream) and a kind (``stable`` |
``abrupt`` | ``gradual``). The agent reads it with its ``VideoFileSource``, paced at the
file's fps (``--realtime``, the default): ``ImageFolderSource`` would do, but the agent CLI
fixes an image folder at 5 frames/s, and FFV1 keeps the pixels exact, where an MPEG-4 file
would re-compress the noise / JPEG / blur streams on its own.

Everything is deterministic: the shared videos are resampled in time to ``FPS`` (frame ``i``
shows the source frame at ``i / FPS`` s, looping), stills are shuffled with the stream's
seed, and the noise generator is seeded. Writing a stream records the SHA-256 of its raw
frames (``frames_sha256``): the same definition gives the same pixels.

A *drift window* is ``WINDOW_S`` (20) s of stream time (200 frames); window ``k`` holds
frames ``[k*200, (k+1)*200)``. Twenty seconds, not ten: the drift monitor
(``roadloop.monitoring.drift``) judges a frame feature (brightness, sharpness, detections
per frame) only on windows of at least ``DriftConfig.min_frames`` (100) frames, and an agent
on a loaded machine drops frames (a quarter to a half of them on the shared 2-core box), so a
100-frame window would leave those features unjudged. Shifted streams have ``windows_pre``
(7) windows before the onset and ``windows_post`` (5) after; stable streams
``stable_windows`` (15). The drift detector takes its reference from the first windows of
each stream (the scoring driver's ``--reference-windows``, 4), so windows 4-6 of every
shifted stream are stable windows too.

Streams (``default_streams``):

========================  =======  ==========================================================
name                      kind     what it shows
========================  =======  ==========================================================
stable_cctv_street        stable   ``cctv_street.mp4`` (fixed street CCTV, 47.6 s) looped.
stable_highway_overpass   stable   ``highway_overpass.mp4`` (highway from an overpass, 15 s,
                                   1280x720 downscaled) looped.
stable_window_street      stable   ``window_street.mp4`` (street from a window, 73 s) looped.
day_to_night              abrupt   atl_v2 day stills, then atl_v2 night stills (below). Each
                                   still is held for ``hold`` frames so the 1400 pre-onset
                                   frames show every day still at most once.
atl_to_manaus             abrupt   atl_v2 day stills, then manaus_v4 stills (all of them):
                                   a camera swap to another country, camera set and classes.
fog_highway_overpass      abrupt   highway video; from the onset, haze by the scattering model
                                   ``I = J*t + A*(1-t)``, airlight ``A`` = (220, 215, 210) BGR,
                                   transmission 0.25 at the top row to 0.6 at the bottom.
blur_window_street        abrupt   window-street video; from the onset a Gaussian blur,
                                   sigma 2.5 px (a defocused or smeared lens).
noise_cctv_street         abrupt   street CCTV; from the onset (mid-window: 10 s into window 7)
                                   additive Gaussian noise, sigma 20 grey levels, per channel.
jpeg_window_street        abrupt   window-street video; from the onset every frame is JPEG
                                   encoded at quality 8 and decoded (a starved encoder).
knocked_cctv_street       abrupt   street CCTV; from the onset (mid-window: 8 s into window 7)
                                   the camera is knocked: rotated 7 degrees, zoomed 1.3x and
                                   shifted by (8 %, -6 %) of the frame, edges reflected.
gradual_fog_window_street gradual  window-street video; the fog above ramps linearly from none
                                   at the onset to full over 4 windows (then stays).
gradual_dusk_highway      gradual  highway video; dusk: ``255*(I/255)**gamma * scale`` with
                                   gamma 1 -> 1.6 and scale 1 -> 0.3 linearly over 5 windows.
========================  =======  ==========================================================

Day / night stills (atl_v2, every split): the mean grey level of the whole image. Night is
below ``NIGHT_BELOW`` (60), day at least ``DAY_AT_LEAST`` (110); the frames in between are
not used (the dataset's own ±40 % brightness augmentation puts darkened day views and
brightened night views there). The cut is not clean either side: a few darkened day views
sit below 60 and a few brightened night views above 110 (about 5 of each, by eye). On this
copy: 62 night, 162 day, 60 unused frames (``still_groups`` reports the counts; each
stream's truth records them). Stills are centre-cropped to 16:9 and resized to the frame.

The onset of the abrupt streams is at a window boundary (frame 1400) except where noted; the
scoring driver counts the window containing the onset as window 0. For the gradual
streams the onset is where the ramp starts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

FPS = 10.0
WINDOW_S = 20.0
FRAME_SIZE = (640, 360)  # width, height
NIGHT_BELOW = 60.0
DAY_AT_LEAST = 110.0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

Kind = Literal["stable", "abrupt", "gradual"]


# --------------------------------------------------------------------------- transforms
def fog(img: np.ndarray, s: float, *, t_top: float = 0.25, t_bottom: float = 0.6,
        airlight: tuple[float, float, float] = (220.0, 215.0, 210.0)) -> np.ndarray:
    """Haze of strength ``s`` in [0, 1]: the scattering model, thicker towards the top (far)."""
    if s <= 0:
        return img
    h = img.shape[0]
    t = np.linspace(t_top, t_bottom, h, dtype=np.float32)[:, None, None]
    t = 1.0 - s * (1.0 - t)
    out = img.astype(np.float32) * t + np.asarray(airlight, np.float32) * (1.0 - t)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def blur(img: np.ndarray, s: float, *, sigma: float = 2.5) -> np.ndarray:
    if s <= 0:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma * s)


def noise(img: np.ndarray, s: float, *, rng: np.random.Generator, sigma: float = 20.0) -> np.ndarray:
    if s <= 0:
        return img
    n = rng.normal(0.0, sigma * s, img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32) + n + 0.5, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, s: float, *, quality: int = 8) -> np.ndarray:
    if s <= 0:
        return img
    q = round(100 - s * (100 - quality))
    ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), q])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def knock(img: np.ndarray, s: float, *, angle: float = 7.0, zoom: float = 1.3,
          shift: tuple[float, float] = (0.08, -0.06)) -> np.ndarray:
    """The camera knocked to a new view: rotated, zoomed and shifted (``s`` scales all three)."""
    if s <= 0:
        return img
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle * s, 1.0 + (zoom - 1.0) * s)
    m[0, 2] += shift[0] * s * w
    m[1, 2] += shift[1] * s * h
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def dusk(img: np.ndarray, s: float, *, gamma: float = 1.6, scale: float = 0.3) -> np.ndarray:
    if s <= 0:
        return img
    g = 1.0 + s * (gamma - 1.0)
    k = 1.0 - s * (1.0 - scale)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g * k + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    "fog": fog, "blur": blur, "noise": noise, "jpeg": jpeg, "knock": knock, "dusk": dusk,
}


# --------------------------------------------------------------------------- pixel sources
def fit_frame(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop ``img`` to the aspect of ``size`` (w, h) and resize it to ``size``."""
    w, h = size
    ih, iw = img.shape[:2]
    if iw * h > ih * w:  # too wide
        cw = max(1, round(ih * w / h))
        x0 = (iw - cw) // 2
        img = img[:, x0 : x0 + cw]
    elif iw * h < ih * w:  # too tall
        ch = max(1, round(iw * h / w))
        y0 = (ih - ch) // 2
        img = img[y0 : y0 + ch]
    if img.shape[1] == w and img.shape[0] == h:
        return np.ascontiguousarray(img)
    interp = cv2.INTER_AREA if img.shape[1] > w else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def video_frames(path: Path, n: int, *, fps: float, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """``n`` frames of ``path`` resampled to ``fps`` (frame ``i`` = the source at ``i/fps`` s),
    looping from the start when the file ends."""
    if n <= 0:
        return
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FileNotFoundError(f"{path}: OpenCV cannot open it as a video")
    src_fps = cap.get(cv2.CAP_PROP_FPS)
    src_fps = float(src_fps) if src_fps and 0 < src_fps < 1000 else 25.0
    emitted, pass_start, src_idx, current = 0, 0, -1, None
    try:
        while emitted < n:
            target = int((emitted - pass_start) * src_fps / fps + 1e-9)
            while src_idx < target:
                ok, img = cap.read()
                if not ok or img is None:
                    if src_idx < 0:
                        raise ValueError(f"{path}: no frame could be read")
                    cap.release()
                    cap = cv2.VideoCapture(str(path))  # loop: frame ``emitted`` starts a pass
                    pass_start, src_idx, target = emitted, -1, 0
                    continue
                src_idx += 1
                current = img
            yield fit_frame(current, size)
            emitted += 1
    finally:
        cap.release()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


@lru_cache(maxsize=8)
def _grey_means(dataset: Path) -> tuple[tuple[str, float], ...]:
    out = []
    for p in _images(dataset / "images"):
        grey = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            out.append((str(p), float(grey.mean())))
    return tuple(out)


def still_groups(datasets_dir: Path, *, night_below: float = NIGHT_BELOW,
                 day_at_least: float = DAY_AT_LEAST) -> tuple[dict[str, list[Path]], dict[str, Any]]:
    """``{"atl_day", "atl_night", "manaus"}`` → images (sorted), and how they were cut."""
    atl = _grey_means(Path(datasets_dir) / "atl_v2")
    day = [Path(p) for p, m in atl if m >= day_at_least]
    night = [Path(p) for p, m in atl if m < night_below]
    manaus = _images(Path(datasets_dir) / "manaus_v4" / "images")
    info = {
        "rule": f"atl_v2 mean grey level: night < {night_below:g}, day >= {day_at_least:g}, "
                "in between unused",
        "atl_total": len(atl), "atl_day": len(day), "atl_night": len(night),
        "atl_unused": len(atl) - len(day) - len(night), "manaus": len(manaus),
    }
    return {"atl_day": day, "atl_night": night, "manaus": manaus}, info


def still_frames(paths: list[Path], n: int, *, hold: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Each image of ``paths`` held for ``hold`` frames, cycling, ``n`` frames in all."""
    if n > 0 and not paths:
        raise ValueError("no still images for this stream")
    current, current_idx = None, -1
    for i in range(n):
        idx = (i // hold) % len(paths)
        if idx != current_idx:
            img = cv2.imread(str(paths[idx]), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"{paths[idx]}: not a readable image")
            current, current_idx = fit_frame(img, size), idx
        yield current


# --------------------------------------------------------------------------- streams
@dataclass
class StreamSpec:
    """One stream: its pixels before/after the onset and its truth (see the module docstring).

    ``before`` / ``after`` name a pixel source: ``video:<file in videos/>`` or
    ``stills:<atl_day|atl_night|manaus>``; ``after`` None means the same source continues.
    ``transform`` (a key of ``TRANSFORMS``) is applied from the onset with severity 1, or
    for a gradual stream ramping linearly from 0 to 1 over ``ramp_frames``.
    """

    name: str
    kind: Kind
    description: str
    n_frames: int
    onset_frame: int | None
    before: str
    after: str | None = None
    transform: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    ramp_frames: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.kind == "stable") != (self.onset_frame is None):
            raise ValueError(f"{self.name}: a stable stream has no onset, a shift has one")
        if self.onset_frame is not None and not 0 < self.onset_frame < self.n_frames:
            raise ValueError(f"{self.name}: onset {self.onset_frame} outside (0, {self.n_frames})")
        if self.kind == "gradual" and self.ramp_frames <= 0:
            raise ValueError(f"{self.name}: a gradual stream needs ramp_frames > 0")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise ValueError(f"{self.name}: unknown transform {self.transform!r}")

    def severity(self, i: int) -> float:
        """How much of the shift frame ``i`` shows (0 before the onset, 1 once it is complete)."""
        if self.onset_frame is None or i < self.onset_frame:
            return 0.0
        if self.kind == "gradual":
            return min(1.0, (i - self.onset_frame + 1) / self.ramp_frames)
        return 1.0


def default_streams(*, windows_pre: int = 7, windows_post: int = 5, stable_windows: int = 15,
                    fps: float = FPS, window_s: float = WINDOW_S) -> list[StreamSpec]:
    """The benchmark's streams (module docstring); window counts and rates can shrink for tests."""
    per = round(fps * window_s)  # frames per drift window
    onset = windows_pre * per
    n_shift = (windows_pre + windows_post) * per
    n_stable = stable_windows * per

    def mid(fraction: float) -> int:  # an onset ``fraction`` of a window into window ``windows_pre``
        return onset + round(fraction * per)

    v_cctv, v_hwy, v_win = "video:cctv_street.mp4", "video:highway_overpass.mp4", "video:window_street.mp4"
    specs = [
        StreamSpec("stable_cctv_street", "stable", "fixed street CCTV, looped", n_stable, None, v_cctv),
        StreamSpec("stable_highway_overpass", "stable", "highway seen from an overpass, looped",
                   n_stable, None, v_hwy),
        StreamSpec("stable_window_street", "stable", "street seen from a window, looped",
                   n_stable, None, v_win),
        StreamSpec("day_to_night", "abrupt", "atl_v2 day stills, then atl_v2 night stills",
                   n_shift, onset, "stills:atl_day", "stills:atl_night", seed=11),
        StreamSpec("atl_to_manaus", "abrupt", "atl_v2 day stills, then manaus_v4 stills (camera swap)",
                   n_shift, onset, "stills:atl_day", "stills:manaus", seed=12),
        StreamSpec("fog_highway_overpass", "abrupt", "highway; fog from the onset",
                   n_shift, onset, v_hwy, transform="fog"),
        StreamSpec("blur_window_street", "abrupt", "window street; Gaussian blur sigma 2.5 from the onset",
                   n_shift, onset, v_win, transform="blur"),
        StreamSpec("noise_cctv_street", "abrupt",
                   "street CCTV; Gaussian noise sigma 20 from the onset (mid-window)",
                   n_shift, mid(0.5), v_cctv, transform="noise", seed=13),
        StreamSpec("jpeg_window_street", "abrupt", "window street; JPEG quality 8 from the onset",
                   n_shift, onset, v_win, transform="jpeg"),
        StreamSpec("knocked_cctv_street", "abrupt",
                   "street CCTV; camera knocked to a new view (rotate 7 deg, zoom 1.3, shift) "
                   "from the onset (mid-window)", n_shift, mid(0.4), v_cctv, transform="knock"),
        StreamSpec("gradual_fog_window_street", "gradual",
                   f"window street; fog ramping 0 -> full over {max(1, windows_post - 1)} windows",
                   n_shift, onset, v_win, transform="fog", ramp_frames=max(1, windows_post - 1) * per),
        StreamSpec("gradual_dusk_highway", "gradual",
                   f"highway; dusk (gamma 1 -> 1.6, scale 1 -> 0.3) over {windows_post} windows",
                   n_shift, onset, v_hwy, transform="dusk", ramp_frames=windows_post * per),
    ]
    return specs


def stream_by_name(name: str, **kwargs: Any) -> StreamSpec:
    for spec in default_streams(**kwargs):
        if spec.name == name:
            return spec
    raise KeyError(f"no stream {name!r}")


def _hold_for(spec: StreamSpec, groups: dict[str, list[Path]]) -> int:
    """Frames each still is shown: the pre-onset part shows each still at most once."""
    if not spec.before.startswith("stills:"):
        return 1
    span = spec.onset_frame if spec.onset_frame is not None else spec.n_frames
    return max(1, math.ceil(span / len(groups[spec.before.split(":", 1)[1]])))


def _source(ref: str, n: int, *, spec: StreamSpec, shared_dir: Path, groups: dict[str, list[Path]],
            hold: int, size: tuple[int, int], fps: float, salt: int) -> Iterator[np.ndarray]:
    what, name = ref.split(":", 1)
    if what == "video":
        return video_frames(Path(shared_dir) / "videos" / name, n, fps=fps, size=size)
    if what == "stills":
        paths = list(groups[name])
        np.random.default_rng([spec.seed, salt]).shuffle(paths)
        return still_frames(paths, n, hold=hold, size=size)
    raise ValueError(f"{spec.name}: unknown source {ref!r}")


def iter_stream(spec: StreamSpec, shared_dir: Path, *, size: tuple[int, int] = FRAME_SIZE,
                fps: float = FPS) -> Iterator[np.ndarray]:
    """The stream's frames, in order (BGR uint8, ``size``)."""
    groups = still_groups(Path(shared_dir) / "datasets")[0] if "stills:" in spec.before + str(spec.after) else {}
    hold = _hold_for(spec, groups)
    onset = spec.onset_frame if spec.onset_frame is not None else spec.n_frames
    kw = {"spec": spec, "shared_dir": shared_dir, "groups": groups, "hold": hold, "size": size, "fps": fps}
    if spec.after is None:
        frames = _source(spec.before, spec.n_frames, salt=0, **kw)
    else:
        frames = _chain(_source(spec.before, onset, salt=0, **kw),
                        _source(spec.after, spec.n_frames - onset, salt=1, **kw))
    fn = TRANSFORMS[spec.transform] if spec.transform else None
    rng = np.random.default_rng([spec.seed, 2])
    for i, img in enumerate(frames):
        s = spec.severity(i)
        if fn is not None and s > 0:
            kwargs = {**spec.params, **({"rng": rng} if spec.transform == "noise" else {})}
            img = fn(img, s, **kwargs)
        yield img


def _chain(*its: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    for it in its:
        yield from it


def _open_writer(stem: Path, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, Path, str]:
    for fourcc, ext in (("FFV1", ".mkv"), ("MJPG", ".avi")):
        path = stem.with_suffix(ext)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if writer.isOpened():
            return writer, path, fourcc
        writer.release()
        path.unlink(missing_ok=True)
    raise RuntimeError("OpenCV can write neither FFV1 nor MJPG video here")


def truth_of(spec: StreamSpec, shared_dir: Path, *, fps: float = FPS, window_s: float = WINDOW_S,
             size: tuple[int, int] = FRAME_SIZE) -> dict[str, Any]:
    """The stream's truth and definition (what ``truth.json`` holds, less the render facts)."""
    per = fps * window_s
    onset_s = None if spec.onset_frame is None else spec.onset_frame / fps
    truth: dict[str, Any] = {
        **asdict(spec),
        "fps": fps,
        "window_s": window_s,
        "frames_per_window": per,
        "n_windows": math.ceil(spec.n_frames / per),
        "duration_s": spec.n_frames / fps,
        "onset_s": onset_s,
        "onset_window": None if onset_s is None else int(onset_s // window_s),
        "ramp_s": spec.ramp_frames / fps,
        "frame_size": list(size),
    }
    if "stills:" in spec.before + str(spec.after):
        groups, info = still_groups(Path(shared_dir) / "datasets")
        truth["stills"] = info
        truth["hold_frames"] = _hold_for(spec, groups)
    return truth


def render_stream(spec: StreamSpec, shared_dir: Path, out_dir: Path, *, fps: float = FPS,
                  window_s: float = WINDOW_S, size: tuple[int, int] = FRAME_SIZE) -> dict[str, Any]:
    """Write ``<out_dir>/<name>/stream.{mkv,avi}`` and ``truth.json``; returns the truth.

    A stream already written from the same definition (its ``truth.json`` matches) is reused.
    """
    folder = Path(out_dir) / spec.name
    truth = truth_of(spec, shared_dir, fps=fps, window_s=window_s, size=size)
    truth_path = folder / "truth.json"
    if truth_path.is_file():
        old = json.loads(truth_path.read_text())
        video = folder / str(old.get("video", ""))
        if video.is_file() and {k: old.get(k) for k in truth} == json.loads(json.dumps(truth)):
            return old
    folder.mkdir(parents=True, exist_ok=True)
    writer, path, fourcc = _open_writer(folder / "stream", fps, size)
    digest, n = hashlib.sha256(), 0
    try:
        for img in iter_stream(spec, shared_dir, size=size, fps=fps):
            digest.update(img.tobytes())
            writer.write(img)
            n += 1
    finally:
        writer.release()
    if n != spec.n_frames:
        raise RuntimeError(f"{spec.name}: wrote {n} frames, expected {spec.n_frames}")
    truth.update(video=path.name, codec=fourcc, frames_sha256=digest.hexdigest())
    truth_path.write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - a thin CLI
    import argparse

    from roadloop.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/.cache/drift_streams"))
    parser.add_argument("--shared", type=Path, default=Settings().shared_dir)
    parser.add_argument("--streams", default="all", help="comma-separated names, or all")
    args = parser.parse_args(argv)
    specs = default_streams()
    if args.streams != "all":
        want = set(args.streams.split(","))
        specs = [s for s in specs if s.name in want]
    for spec in specs:
        truth = render_stream(spec, args.shared, args.out)
        print(f"{spec.name}: {truth['n_frames']} frames, onset {truth['onset_frame']}, "
              f"{truth['video']} ({truth['codec']})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
