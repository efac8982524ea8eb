"""Content-addressed model files of the gateway: ``<models_dir>/<sha256>.onnx``.

A file enters only after its bytes hash to the manifest's SHA-256 and match its size; it is
written to a temp file in the same folder, fsynced and renamed (``roadloop.fsutil.atomic_path``),
so a crash or a bad upload never leaves a partial model where agents download from. A publish
refused after a file entered (a variant's check, a rollout-id clash) removes the files it
stored (``discard``), and ``GET /v1/models/{sha256}`` serves only files a stored manifest
names (``fleet.caches.ManifestCache.published``), so a file no manifest vouches for is never
handed out. ``ModelFileResponse`` serves one, whole or by byte ranges.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import BinaryIO

from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from roadloop.fsutil import atomic_path, fsync_dir

logger = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class ModelFileRejected(ValueError):
    """The uploaded bytes are not the file the manifest describes."""


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / f"{sha256}.onnx"

    def has(self, sha256: str) -> bool:
        try:
            return self.path_for(sha256).is_file()
        except ValueError:
            return False

    def ingest(self, src: BinaryIO, sha256: str, size: int) -> Path:
        """Copy ``src`` in, checking size and SHA-256 (hashed while it is written); returns the
        stored path. A rejected upload leaves nothing behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path_for(sha256)
        h = hashlib.sha256()
        n = 0
        with atomic_path(final, durable=True) as tmp:
            with open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    n += len(chunk)
                    if n > size:
                        raise ModelFileRejected(
                            f"file is larger than the manifest's size {size} bytes"
                        )
                    h.update(chunk)
                    out.write(chunk)
            if n != size:
                raise ModelFileRejected(f"file has {n} bytes, the manifest says {size}")
            digest = h.hexdigest()
            if digest != sha256:
                raise ModelFileRejected(
                    f"file SHA-256 {digest} does not match the manifest's {sha256}"
                )
        fsync_dir(self.root)
        logger.info("stored model %s (%d bytes)", final.name, n)
        return final

    def discard(self, sha256: str) -> None:
        """Remove a stored file (a refused publish's); nothing when there is none."""
        try:
            path = self.path_for(sha256)
        except ValueError:
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove model %s of a refused publish: %s", path.name, exc)
            return
        logger.info("removed model %s (its publish was refused)", path.name)


_BYTE_RANGE = re.compile(r"\s*(?:(\d+)-(\d*)|-(\d+))\s*")


def valid_byte_ranges(value: str) -> bool:
    """``value`` is a ``Range`` header this route serves: ``bytes=`` and one or more
    ``first-last``, ``first-`` or ``-suffix`` specs, with ``last >= first`` (RFC 9110 14.1.2:
    otherwise the spec is invalid)."""
    unit, sep, specs = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return False
    for spec in specs.split(","):
        m = _BYTE_RANGE.fullmatch(spec)
        if m is None or (m[2] and int(m[2]) < int(m[1])):
            return False
    return True


class ModelFileResponse(FileResponse):
    """A model file whose ``Range`` header, when invalid (another unit, ``bytes=9-0``,
    ``bytes=abc``), is ignored and the whole file served, as RFC 9110 14.2 allows; Starlette
    would answer a plain-text 400 that no client here expects. A valid range past the end
    of the file is still a 416."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers") or []
        if any(k == b"range" and not valid_byte_ranges(v.decode("latin-1"))
               for k, v in headers):
            scope = {**scope, "headers": [(k, v) for k, v in headers if k != b"range"]}
        await super().__call__(scope, receive, send)
