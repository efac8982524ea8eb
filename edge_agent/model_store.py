"""The agent's model store and the updater's persisted state, under ``<state>``.

``ModelStore`` (``<state>/models``) holds verified model files named ``<sha256>.onnx``. A
download (``ModelStore.download``, after the manifest was verified) goes to
``.partial-<sha256>``; a dropped connection keeps what arrived and the next poll resumes with
``Range``. Then the size, then the SHA-256 are checked against the signed manifest, and only
then does the file become ``<sha256>.onnx`` (fsync + rename). A size or SHA-256 mismatch is an
``UpdateRejected`` that may be retried (a corrupt transfer) — ``HASH_MISMATCH_ATTEMPTS`` tries;
a stopped transfer is a ``DownloadIncomplete``. A model directory that cannot be written (a
full disk, ``ENOSPC``/``EFBIG``, a read-only mount; also found before the transfer when the
free space is short of the bytes still to come) is an ``UpdateRejected`` that is not final
and not counted against the model: the partial file is removed (it only takes space), and
the next poll tries again. The serving model that a rollout replaces is
copied into the store (``adopt``; the ``--model`` baseline too), so it survives as *previous*;
``prune`` deletes every model file but the ones still needed, and the temporary files of
copies cut off by a crash (all of them when the store is created, at start-up; older than
``TMP_LEFTOVER_AGE_S`` later, so a copy in progress in another thread is never removed).

``UpdaterState`` is ``<state>/updater.json`` (atomic writes): ``serving`` and ``previous``
(sha256, path, model_version, rollout_id, since; ``serving`` of a rollout model also
``baseline_p95``, the previous model's latency P95 its rollback guard compares against),
``shadow``, ``rejected`` {key: reason, status, count, permanent, at},
``status``/``reason``/``rollout_id``. A rejected or rolled-back SHA-256 (or
``manifest:<digest>``, or ``manifest:<digest>:<sha256>`` for a file that disagrees with its
manifest) is remembered there and not retried; at most
``MAX_REJECTED`` entries are kept, newest last. The ETag is kept in memory only, so a
restarted agent re-reads the manifest once and re-applies it idempotently (nothing is
downloaded twice).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from edge_agent.client import GatewayClient
from edge_agent.errors import DownloadIncomplete, GatewayError, UpdateRejected
from edge_agent.fsutil import copy_file_atomic, file_sha256, fsync_dir, write_text_atomic
from edge_agent.http_deadline import AnswerTooSlow, read_capped, request_budget
from edge_agent.manifest import ModelManifest
from edge_agent.model_slot import LoadedModel

logger = logging.getLogger(__name__)

STATE_FILE = "updater.json"
MODELS_DIR = "models"
HASH_MISMATCH_ATTEMPTS = 3
MAX_REJECTED = 200
# The most bytes of a download's error answer read (a JSON ``detail``: a few hundred bytes).
ERROR_BODY_BYTES = 64 * 1024
# One download attempt's deadline: its bytes at ``MIN_DOWNLOAD_RATE`` (32 KiB/s: a slow
# cellular uplink shared with frame uploads still does several times that), and never less
# than ``MIN_DOWNLOAD_S`` (5 minutes: connection set-up, a busy gateway, a small model on a bad
# link). A 10 MB model gets ~5 min, a 100 MB one ~52 min. Past it the attempt is given up and
# the next poll resumes from the bytes received: a gateway trickling the body a byte per read
# timeout cannot hold the updater thread for days.
MIN_DOWNLOAD_RATE = 32 * 1024
MIN_DOWNLOAD_S = 300.0
# A ``.<name>.tmp-<hex>`` (``fsutil.temp_sibling``) in the models folder untouched this long is
# the leftover of a copy cut off by a crash or a power cut (``adopt``): ``prune`` removes it.
# A live copy writes the file continuously and renames it a moment after its last write
# (fsync), so 15 minutes never catch one in progress; at start-up (``ModelStore.__init__``,
# before the updater runs anything that writes) every such file is a leftover, whatever its age.
TMP_LEFTOVER_AGE_S = 900.0


def _is_temp_leftover(name: str) -> bool:
    """A temporary sibling of an atomic write (``.<name>.tmp-<hex>``)."""
    return name.startswith(".") and ".tmp-" in name


def download_deadline_s(nbytes: int) -> float:
    """Seconds one attempt may take to fetch ``nbytes`` (see ``MIN_DOWNLOAD_RATE``)."""
    return max(MIN_DOWNLOAD_S, nbytes / MIN_DOWNLOAD_RATE)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


# --------------------------------------------------------------------------- persisted state
@dataclass
class UpdaterState:
    """What the updater remembers across restarts (``<state>/updater.json``)."""

    serving: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "idle"
    reason: str | None = None
    rollout_id: str | None = None
    updated_at: str = field(default_factory=_now_iso)

    @classmethod
    def load(cls, path: Path) -> UpdaterState:
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            state = cls(**known)
            if not isinstance(state.rejected, dict):
                raise TypeError("'rejected' is not an object")
            return state
        except (OSError, ValueError, TypeError) as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(path, aside)
            except OSError:
                aside = path
            logger.error(
                "%s: unreadable updater state (%s); kept as %s, starting fresh", path, exc, aside
            )
            return cls()

    def save(self, path: Path) -> None:
        self.updated_at = _now_iso()
        path.parent.mkdir(parents=True, exist_ok=True)
        # sync_dir: the rename survives a power cut (a rollback or a rejection is not forgotten)
        write_text_atomic(path, json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True),
                          sync_dir=True)

    def remember(
        self, key: str, reason: str, *, permanent: bool, status: str = "rejected"
    ) -> dict[str, Any]:
        """Record one refusal of ``key``; the entry says whether it is final (``permanent``:
        asked for, or ``HASH_MISMATCH_ATTEMPTS`` refusals reached)."""
        entry = self.rejected.get(key) or {"count": 0}
        entry.update(
            reason=reason,
            status=status,
            count=int(entry.get("count", 0)) + 1,
            at=_now_iso(),
        )
        entry["permanent"] = bool(
            permanent or entry["count"] >= HASH_MISMATCH_ATTEMPTS or entry.get("permanent")
        )
        self.rejected.pop(key, None)
        self.rejected[key] = entry  # newest last
        while len(self.rejected) > MAX_REJECTED:
            self.rejected.pop(next(iter(self.rejected)))
        return entry


# --------------------------------------------------------------------------- the model store
def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    return int(m.group(1)) if m else None


class ModelStore:
    """``<state>/models``: verified models by SHA-256, the resumable download, pruning.

    ``pending`` is the SHA-256 being downloaded (or downloaded and not yet recorded by the
    updater): ``prune`` keeps its files. The updater clears it once the model is recorded or
    given up.
    """

    def __init__(self, models_dir: Path, client: GatewayClient) -> None:
        self.dir = Path(models_dir)
        self.client = client
        self.pending: str | None = None
        # Created once, by the updater's constructor, before any thread writes here: every
        # temporary file is the leftover of an interrupted write of an earlier run.
        self._remove_temp_leftovers(older_than_s=None)

    def _remove_temp_leftovers(self, older_than_s: float | None) -> None:
        """Delete the ``.*.tmp-*`` files of atomic writes cut off by a crash (all of them, or
        those unmodified for ``older_than_s``: a copy in progress is left alone)."""
        try:
            entries = list(self.dir.iterdir()) if self.dir.is_dir() else []
        except OSError as exc:
            logger.warning("cannot list %s: %s", self.dir, exc)
            return
        now = time.time()
        for f in entries:
            if not _is_temp_leftover(f.name):
                continue
            try:
                if older_than_s is not None:
                    age = now - f.stat().st_mtime
                    # a file from the future (the clock stepped back) is not a fresh one either
                    if 0 <= age < older_than_s:
                        continue
                f.unlink()
                logger.info("removed %s, left by an interrupted write", f)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot remove %s: %s", f, exc)

    def path_for(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.onnx"

    def download(
        self, m: ModelManifest, *, on_transfer: Callable[[], None] | None = None
    ) -> Path:
        """The verified file of ``m`` (size and SHA-256 as signed), downloaded or resumed as
        needed. ``on_transfer`` is called before bytes are fetched. Raises ``UpdateRejected``
        (size or SHA-256 mismatch: retryable; the model directory not writable or full:
        retryable, not counted against the model) or ``DownloadIncomplete`` (resumed next
        time)."""
        try:
            return self._download(m, on_transfer)
        except OSError as exc:  # the local disk, never the network (httpx wraps its errors)
            self.pending = None
            try:
                (self.dir / f".partial-{m.sha256}").unlink(missing_ok=True)
            except OSError:
                pass
            raise UpdateRejected(
                f"model dir {self.dir} not writable / disk full: {exc}",
                permanent=False,
            ) from exc

    def _download(self, m: ModelManifest, on_transfer: Callable[[], None] | None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(m.sha256)
        if final.is_file():
            if final.stat().st_size == m.size and file_sha256(final) == m.sha256:
                logger.info("model %s is already on disk at %s", m.short, final)
                return final
            final.unlink()
        partial = self.dir / f".partial-{m.sha256}"
        self.pending = m.sha256
        have = partial.stat().st_size if partial.exists() else 0
        if have > m.size:
            partial.unlink()
            have = 0
        if have < m.size:
            free = shutil.disk_usage(self.dir).free
            if free < m.size - have:  # do not fetch what cannot be stored
                raise OSError(
                    errno.ENOSPC,
                    f"{free} bytes free, {m.size - have} more needed for {m.short}",
                )
            if on_transfer is not None:
                on_transfer()
            logger.info(
                "downloading %s (%d bytes)%s",
                m.short,
                m.size,
                f", resuming at byte {have}" if have else "",
            )
            self._transfer(m, partial, have)
        got = partial.stat().st_size if partial.exists() else 0
        if got != m.size:  # the gateway ended the response cleanly: its file is shorter
            partial.unlink(missing_ok=True)
            self.pending = None
            raise UpdateRejected(
                f"size mismatch: the gateway sent {got} bytes, the signed manifest says {m.size}",
                key=m.sha256,
                permanent=False,
            )
        logger.info("download done: %s, %d bytes", m.short, got)
        digest = file_sha256(partial)
        if digest != m.sha256:
            partial.unlink(missing_ok=True)
            self.pending = None
            raise UpdateRejected(
                f"sha256 mismatch: the downloaded file hashes to {digest[:16]}…, the signed "
                f"manifest says {m.sha256[:16]}…",
                key=m.sha256,
                permanent=False,
            )
        os.replace(partial, final)  # pending stays set until the updater records the model
        fsync_dir(self.dir)
        logger.info("model verified: %s (size and sha256 match the signed manifest)", m.short)
        return final

    def _transfer(self, m: ModelManifest, partial: Path, have: int) -> None:
        """Append (206) or rewrite (200) ``partial`` from byte ``have``, never past ``m.size``."""
        budget_s = download_deadline_s(m.size - have)
        deadline = time.monotonic() + budget_s
        try:
            with self.client.stream_model(m.sha256, offset=have) as resp, \
                    request_budget(deadline):
                if time.monotonic() > deadline:
                    raise AnswerTooSlow("the answer's headers came after the deadline")
                code = resp.status_code
                if code == 206:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != have:
                        partial.unlink(missing_ok=True)
                        raise DownloadIncomplete(
                            f"asked to resume at byte {have}, the gateway sent byte {start}; "
                            "restarting the download"
                        )
                    mode = "ab"
                elif code == 200:
                    mode, have = "wb", 0
                else:
                    # An error answer is a few hundred bytes: read no more than the cap.
                    body = read_capped(resp, ERROR_BODY_BYTES)
                    try:
                        detail = str(json.loads(body).get("detail"))
                    except (ValueError, AttributeError, RecursionError):
                        detail = body[:200].decode("utf-8", "replace")
                    if code == 416:  # the gateway's file is not longer than what we have
                        partial.unlink(missing_ok=True)
                        raise UpdateRejected(
                            f"size mismatch: the gateway cannot send bytes {have}- of "
                            f"{m.short} (416), the signed manifest says {m.size} bytes",
                            key=m.sha256,
                            permanent=False,
                        )
                    raise DownloadIncomplete(f"model download answered {code}: {detail}")
                written = have
                with open(partial, mode) as fh:
                    # as the bytes arrive (no re-chunking): what a cut-off attempt received
                    # is in the file, for the next one to resume from
                    for chunk in resp.iter_bytes():
                        if written + len(chunk) > m.size:
                            break
                        fh.write(chunk)
                        written += len(chunk)
                        if time.monotonic() > deadline:  # a transport without the budget
                            raise AnswerTooSlow(f"{written} of {m.size} bytes at the deadline")
                    else:
                        fh.flush()
                        os.fsync(fh.fileno())
                        return
                partial.unlink(missing_ok=True)
                raise UpdateRejected(
                    f"the gateway sent more than the manifest's {m.size} bytes for {m.short}",
                    key=m.sha256,
                    permanent=False,
                )
        except AnswerTooSlow as exc:
            # The bytes received are kept, as after a lost connection: the next poll resumes
            # from them (Range), so a link slower than the floor still gets there in steps.
            got = partial.stat().st_size if partial.exists() else 0
            raise DownloadIncomplete(
                f"model download of {m.short} too slow: not done within {budget_s:.0f} s "
                f"({got} of {m.size} bytes; at least {MIN_DOWNLOAD_RATE // 1024} KiB/s or "
                f"{MIN_DOWNLOAD_S:.0f} s expected; {exc}); the next poll resumes from there"
            ) from exc
        except httpx.HTTPError as exc:
            got = partial.stat().st_size if partial.exists() else 0
            raise DownloadIncomplete(
                f"connection lost after {got} of {m.size} bytes ({type(exc).__name__}: {exc})"
            ) from exc
        except GatewayError as exc:
            raise DownloadIncomplete(str(exc)) from exc

    def adopt(self, model: LoadedModel) -> LoadedModel:
        """Copy ``model``'s file into the store (``<sha256>.onnx``) so it survives as previous;
        ``model`` unchanged (logged) when it cannot be copied."""
        target = self.path_for(model.sha256)
        try:
            if model.path.resolve() == target.resolve() or target.is_file():
                return dataclasses.replace(model, path=target)
            copy_file_atomic(model.path, target, sync_dir=True)
            logger.info("previous model %s kept on disk at %s", model.sha256[:12], target)
            return dataclasses.replace(model, path=target)
        except OSError as exc:
            logger.warning(
                "cannot copy %s into %s (%s); the previous model stays at its own path",
                model.path,
                self.dir,
                exc,
            )
            return model

    def prune(self, keep: Iterable[str]) -> None:
        """Delete every model file (and partial download) but those of ``keep`` and
        ``pending``, and the leftovers of interrupted copies (``TMP_LEFTOVER_AGE_S``)."""
        keep = set(keep)
        if self.pending:
            keep.add(self.pending)
        if not self.dir.is_dir():
            return
        self._remove_temp_leftovers(older_than_s=TMP_LEFTOVER_AGE_S)
        for f in self.dir.iterdir():
            name = f.name
            if name.endswith(".onnx") and not name.startswith("."):
                sha = name[: -len(".onnx")]
            elif name.startswith(".partial-"):
                sha = name[len(".partial-") :]
            else:
                continue
            if sha not in keep:
                try:
                    f.unlink()
                    logger.info("pruned old model file %s", f)
                except OSError as exc:
                    logger.warning("cannot prune %s: %s", f, exc)


__all__ = [
    "HASH_MISMATCH_ATTEMPTS",
    "MAX_REJECTED",
    "MODELS_DIR",
    "STATE_FILE",
    "TMP_LEFTOVER_AGE_S",
    "ModelStore",
    "UpdaterState",
]
