"""What several test modules need: where the shared data is, and synthetic JPEG frames.

``SHARED_DIR`` is read once, from the settings' ``shared_dir`` field (``ROADLOOP_SHARED_DIR``,
default ``../shared`` beside the repository): the ``shared_dir`` fixture in ``conftest.py``
returns it, and module-level ``skipif`` markers use :func:`needs_shared`. Reading the field
from a fresh ``Settings()`` leaves ``get_settings()``'s cache alone (conftest imports this
module before it sets the test home).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pytest

from roadloop.settings import Settings

SHARED_DIR: Path = Settings().shared_dir


def missing_shared(*paths: Path) -> str:
    """The reason to skip: every path of ``paths`` that does not exist, named in full ('' when
    all exist). A path whose name is a glob (``videos/*.mp4``) must match at least one file."""
    gone = []
    for p in paths:
        found = any(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else p.exists()
        if not found:
            gone.append(str(p))
    return f"shared data missing: {', '.join(gone)}" if gone else ""


def needs_shared(*paths: Path) -> pytest.MarkDecorator:
    """``skipif`` marker for a test that reads ``paths`` (each under :data:`SHARED_DIR`)."""
    reason = missing_shared(*paths)
    return pytest.mark.skipif(bool(reason), reason=reason or "shared data present")


def require_shared(*paths: Path) -> None:
    """Skip the calling test, fixture or module (at import) unless every path exists."""
    reason = missing_shared(*paths)
    if reason:
        pytest.skip(reason, allow_module_level=True)


# ------------------------------------------------------------------------ synthetic frames
Pattern = Literal["smooth", "blocks", "noise"]


def synthetic_image(
    seed: int = 0,
    size: tuple[int, int] = (96, 64),
    *,
    pattern: Pattern = "smooth",
    cells: tuple[int, int] = (8, 6),
) -> np.ndarray:
    """A random BGR frame of ``size`` (width, height), the same for the same arguments.

    ``smooth``: a ``cells`` (columns, rows) grid of random colours scaled up with cubic
    interpolation, a texture whose dhash differs from seed to seed; ``blocks``: the same grid
    scaled up as flat blocks; ``noise``: an independent random value per pixel.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    if pattern == "noise":
        return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    small = rng.integers(0, 256, size=(cells[1], cells[0], 3), dtype=np.uint8)
    interpolation = cv2.INTER_CUBIC if pattern == "smooth" else cv2.INTER_NEAREST
    return cv2.resize(small, (w, h), interpolation=interpolation)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "cv2.imencode failed"
    return buf.tobytes()


def synthetic_jpeg(
    seed: int = 0,
    size: tuple[int, int] = (96, 64),
    *,
    pattern: Pattern = "smooth",
    cells: tuple[int, int] = (8, 6),
    quality: int = 90,
) -> bytes:
    """:func:`synthetic_image` encoded as JPEG."""
    return encode_jpeg(synthetic_image(seed, size, pattern=pattern, cells=cells), quality)


class CountingS3Client:
    """An S3 client that logs the key of every GET into ``gets`` (to show what a store
    downloaded) and passes every call on."""

    def __init__(self, client: Any, gets: list[str]) -> None:
        self._client, self._gets = client, gets

    def get_object(self, **kw: Any) -> Any:
        self._gets.append(kw["Key"])
        return self._client.get_object(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def bucket_sizes(client: Any, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every object of ``bucket``: its key (``prefix`` taken off where it has it) -> size."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"].removeprefix(prefix)] = int(obj["Size"])
    return out


class StoredSizes:
    """What a test's view of a store gives from its ``sizes()`` (key -> bytes)."""

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def bytes_of(self, *frame_ids: str) -> int:
        return sum(n for k, n in self.sizes().items() if Path(k).stem in frame_ids)

    def frame_ids(self) -> set[str]:
        return {Path(k).stem for k in self.sizes()}


class AnsweringServer:
    """A TCP server on loopback answering each connection with ``prefix`` at once, then
    ``answer`` one byte every ``interval_s`` (all at once when 0), for at most ``max_s``
    seconds; keeps the first line of each request it got."""

    def __init__(self, answer: bytes, *, interval_s: float = 0.0, max_s: float = 5.0,
                 prefix: bytes = b"") -> None:
        self.answer, self.interval_s, self.max_s = answer, interval_s, max_s
        self.prefix = prefix
        self.request_lines: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        end = time.monotonic() + self.max_s
        with conn:
            try:
                self.request_lines.append(conn.recv(65536).split(b"\r\n", 1)[0].decode())
                if self.prefix:
                    conn.sendall(self.prefix)
                if not self.interval_s:
                    conn.sendall(self.answer)
                    time.sleep(0.2)
                    return
                for byte in self.answer:
                    if self.stop.is_set() or time.monotonic() > end:
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(self.interval_s)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
