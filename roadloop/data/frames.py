"""Frame store: where edge frames land before curation.

On-disk layout (the contract with the fleet gateway, which writes the same thing)::

    <root>/<camera_id>/<YYYY-MM-DD>/<frame_id>.jpg    the frame, JPEG
    <root>/<camera_id>/<YYYY-MM-DD>/<frame_id>.json   its FrameRecord (pydantic JSON)

* ``YYYY-MM-DD`` is the UTC date of ``FrameRecord.captured_at``.
* ``camera_id`` and ``frame_id`` match ``[A-Za-z0-9_.-]{1,64}`` and do not start with a dot
  (so ``.``/``..`` and hidden names are impossible); a frame is identified by the pair
  ``(camera_id, frame_id)``, unique across all date folders of that camera.
* Write order: the image is written first, the sidecar last, each atomically
  (``roadloop.fsutil.write_bytes_atomic``: on Linux an unnamed file in the same folder
  linked into place once written, elsewhere a dot-prefixed temporary file
  ``.<name>.tmp-<random>`` followed by ``os.replace``).
  **A sidecar's presence means the frame is complete.** Readers only look at
  ``<frame_id>.json`` files whose ``<frame_id>.jpg`` exists; temporary files left behind
  by a crash and images without a sidecar are ignored (``FrameStore.fsck`` reports them).
* Writing a frame id that already exists is a no-op, so replays and gateway retries are
  idempotent.
* ``FrameRecord.schema_version`` is 1; readers ignore unknown fields.
* Every number in a record is finite: the models refuse NaN and ±Infinity (JSON has no
  spelling for them, so such a sidecar would not read back), and ``write_frame`` checks
  that the sidecar it is about to write reads back before writing anything.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from roadloop.data.frame_records import (
    ID_RE,
    JPEG_MAGIC,
    FrameRecord,
    FrameWrite,
    FsckReport,
    StoredFrame,
    checked_sidecar,
    date_folder,
    day_overlaps,
    in_window,
    is_date_folder,
    parse_sidecar,
    validate_id,
)
from roadloop.fsutil import SyncFsHandle, fsync_dir, write_bytes_atomic

logger = logging.getLogger(__name__)


def _image_problem(image: Path) -> str | None:
    """Why ``image`` is no frame's pixels (lstat only: no read), or None. A symlink is
    refused as well as a missing or empty file: the store writes none, and one planted in
    it would hand a file from anywhere to every reader (training, review, uploads)."""
    try:
        st = os.lstat(image)
    except OSError:
        return "is missing"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (the store writes none)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty"
    return None


def jpeg_ends_problem(image: Path) -> str | None:
    """Why ``image`` is not a whole JPEG by its ends (no decode), or None: another format
    renamed ``.jpg`` (no start-of-image marker) or a file cut short (no end-of-image marker
    in its last KB: some cameras pad after it, so it need not be the very last bytes)."""
    try:
        with open(image, "rb") as fh:
            head = fh.read(3)
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 1024))
            tail = fh.read(1024)
    except OSError as exc:
        return f"does not read ({exc.strerror})"
    if head != JPEG_MAGIC:
        return "is not a JPEG"
    if b"\xff\xd9" not in tail:
        return "is cut short (no JPEG end-of-image marker)"
    return None


def _date_folders(camera_dir: Path) -> list[Path]:
    """The camera folder's date folders, sorted (``is_date_folder``); others are skipped."""
    days = []
    for p in camera_dir.iterdir():
        if is_date_folder(p.name) and p.is_dir():
            days.append(p)
        elif not p.name.startswith("."):
            logger.debug("skipping %s: not a date folder", p)
    return sorted(days)


def _regular_file_at(dir_fd: int, relative: str) -> bool:
    """``os.path.isfile`` of ``relative`` under the open folder ``dir_fd``."""
    try:
        return stat.S_ISREG(os.stat(relative, dir_fd=dir_fd).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


class FrameStore:
    """Camera frames on a local (or mounted) file system; see the module docstring."""

    is_local = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._unsynced: set[str] = set()  # written with durable=False, not yet synced
        self._unsynced_lock = threading.Lock()
        # Opened before the first non-durable write, so that sync() hears of a write-back
        # error on any of those files, also one from the kernel's own background flush.
        self._syncfs = SyncFsHandle(self.root)

    def image_path(self, relative: str, *, sha256: str | None = None) -> Path:
        """The image at ``relative`` (a ``frames.path`` value) as a local file (``sha256``
        is for the object store's cache: this folder is the store, nothing to check)."""
        return self.root / relative

    # ---- paths
    def _camera_dir(self, camera_id: str) -> Path:
        validate_id("camera_id", camera_id, where=self.root)
        return self.root / camera_id

    def frame_path(self, record: FrameRecord) -> Path:
        """Where ``record``'s image goes (its sidecar is the same path with ``.json``)."""
        return self._path_of(record.camera_id, record.frame_id, record.captured_at)

    def _path_of(self, camera_id: str, frame_id: str, captured_at: datetime) -> Path:
        return Path(self._image_at(camera_id, frame_id, captured_at))

    def _image_at(self, camera_id: str, frame_id: str, captured_at: datetime) -> str:
        """The image's path as a ``str`` (ids validated): ``write_frame`` runs once per
        upload, and building ``Path`` objects there cost more than its system calls (the
        gateway's profile at load)."""
        validate_id("camera_id", camera_id, where=self.root)
        validate_id("frame_id", frame_id, where=self.root)
        return os.path.join(self.root, camera_id, date_folder(captured_at), f"{frame_id}.jpg")

    def find_frame(self, camera_id: str, frame_id: str) -> Path | None:
        """Image path of a complete frame (sidecar + image present), in any date folder."""
        cam = self._camera_dir(camera_id)
        validate_id("frame_id", frame_id, where=cam)
        # The gateway calls this once per upload, and a new frame is looked for in every date
        # folder: under the default 30-day retention, 30 of them. Built with pathlib (a Path
        # and a full path walk per folder) that took 234 µs an upload at 30 folders against
        # 15 µs at one; with the camera folder opened once and each sidecar a stat relative
        # to it, 58 and 10 µs (benchmarks/results/find-frame-lookup/). scandir, not
        # Path.glob, whose pattern machinery once cost ~10 % of a stored frame's CPU.
        sidecar_name = f"{frame_id}.json"
        try:
            fd = os.open(cam, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            with os.scandir(fd) as entries:
                days = sorted(e.name for e in entries if is_date_folder(e.name) and e.is_dir())
            for day in days:
                if (_regular_file_at(fd, f"{day}/{sidecar_name}")
                        and _regular_file_at(fd, f"{day}/{frame_id}.jpg")):
                    return cam / day / f"{frame_id}.jpg"
        finally:
            os.close(fd)
        return None

    @staticmethod
    def is_complete(image_path: Path | str) -> bool:
        """A complete frame is at ``image_path``: its sidecar and its image are files."""
        sidecar = f"{os.path.splitext(image_path)[0]}.json"
        return os.path.isfile(sidecar) and os.path.isfile(image_path)

    # ---- writing
    def write_frame(
        self,
        record: FrameRecord,
        jpeg_bytes: bytes,
        *,
        decoded_size: tuple[int, int] | None = None,
        durable: bool = True,
        look_in_other_days: bool = True,
        sidecar: bytes | None = None,
    ) -> FrameWrite:
        """Store one frame atomically; a frame id already in the store is left untouched.

        ``look_in_other_days=False`` looks for the frame id in the record's own date folder
        only (two stats, instead of ``find_frame``'s one per date folder of the camera: 30
        under the default retention). For a caller with its own authority on frame ids: the
        gateway's database refuses an id stored under another day (409) and the gateway then
        removes the copy this wrote (``fleet.intake``), as it does on the object store, whose
        ``write_frame`` always looks in the record's own folder only.

        ``durable=True`` fsyncs each file before its rename (the caller fsyncs the folder);
        ``durable=False`` only renames, and the frame is durable after the next ``sync()``
        (one barrier for many frames: the gateway's group commit calls it once per batch).

        Raises ``InvalidInputError`` (naming the frame) when the bytes are not a decodable
        JPEG, its size differs from ``record.width`` x ``record.height``, or the sidecar would
        not read back. A caller that has already decoded ``jpeg_bytes`` (the gateway, at reduced
        scale) passes the full ``(width, height)`` it verified as ``decoded_size``; the bytes
        are then not decoded again. ``sidecar``: the record's sidecar bytes when the caller has
        made them and checked that they read back (``frame_sidecar``; the gateway does, before
        it writes anything); otherwise they are made and checked here.
        """
        image = self._image_at(record.camera_id, record.frame_id, record.captured_at)
        folder = os.path.dirname(image)
        sidecar_path = f"{os.path.splitext(image)[0]}.json"
        if look_in_other_days:
            existing = self.find_frame(record.camera_id, record.frame_id)
        else:
            existing = Path(image) if self.is_complete(image) else None
        if existing is not None:
            logger.debug("frame %s/%s already stored", record.camera_id, record.frame_id)
            return FrameWrite(existing, True)

        data = checked_sidecar(record, jpeg_bytes, decoded_size, where=image, sidecar=sidecar)
        if not durable:
            try:
                self._syncfs.arm()
            except FileNotFoundError:  # the store's first frame: its root does not exist yet
                os.makedirs(folder, exist_ok=True)
                self._syncfs.arm()
        write_bytes_atomic(image, bytes(jpeg_bytes), parents=True, durable=durable)
        # Sidecar last: its presence marks the frame complete.
        write_bytes_atomic(sidecar_path, data, durable=durable)
        if not durable:
            with self._unsynced_lock:
                self._unsynced.update((image, sidecar_path, folder, os.path.dirname(folder)))
        return FrameWrite(Path(image), False)

    def sync(self) -> None:
        """Make every frame written with ``durable=False`` so far durable: ``syncfs(2)`` of
        the store's file system on Linux (one call, however many frames), else an fsync of
        each file and folder written since the last sync. Raises ``OSError`` on failure
        (then nothing written since the last successful sync may be acknowledged)."""
        with self._unsynced_lock:
            pending, self._unsynced = self._unsynced, set()
        if not pending:
            return
        try:
            if self._syncfs.sync():
                return
            # files first, then folders, deepest first
            for path in sorted(pending, key=lambda p: (os.path.isdir(p), -p.count(os.sep))):
                fsync_dir(Path(path))  # an fsync of the path: files and folders alike
        except OSError:
            with self._unsynced_lock:  # still not durable: the next sync tries again
                self._unsynced.update(pending)
            raise

    def remove_frame(self, image_path: Path) -> None:
        """Delete one frame: sidecar first (the frame stops being complete), then the image."""
        image_path.with_suffix(".json").unlink(missing_ok=True)
        image_path.unlink(missing_ok=True)

    # ---- reading
    def cameras(self) -> list[str]:
        """Camera ids with a folder in the store (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and ID_RE.fullmatch(p.name)
        )

    def _sidecars(self, camera_id: str) -> Iterator[Path]:
        cam = self._camera_dir(camera_id)
        if not cam.is_dir():
            return
        for day in _date_folders(cam):
            for sidecar in sorted(day.glob("*.json")):
                if ID_RE.fullmatch(sidecar.stem):
                    yield sidecar

    def read_record(self, camera_id: str, frame_id: str, *,
                    captured_at: datetime | None = None) -> FrameRecord | None:
        """The record of one complete frame as every reader here sees it (``iter_frames``,
        ``fsck``); ``None`` when the frame is absent or its sidecar does not read back.
        With ``captured_at``, only that time's date folder is looked in (the gateway's
        read-back of a frame it wrote or found there: a cost that does not grow with the
        date folders an agent's capture times have made)."""
        if captured_at is None:
            image = self.find_frame(camera_id, frame_id)
        else:
            image = self._path_of(camera_id, frame_id, captured_at)
            if not self.is_complete(image):
                return None
        if image is None:
            return None
        return self._load(image.with_suffix(".json"), camera_id)

    def _load(self, sidecar: Path, camera_id: str) -> FrameRecord | None:
        """Parse one sidecar; ``None`` (and a warning) when it is unusable."""
        try:
            data = sidecar.read_bytes()
        except OSError as exc:
            logger.warning("skipping corrupt frame sidecar %s: %s", sidecar, str(exc)[:200])
            return None
        return parse_sidecar(data, camera_id, sidecar.stem, where=sidecar)

    def iter_frames(
        self,
        camera_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> Iterator[tuple[FrameRecord, Path]]:
        """Complete frames of one camera in ``captured_at`` order, optionally ``start <= t < end``.

        Corrupt sidecars and sidecars without an image are skipped with a warning.
        """
        items: list[tuple[FrameRecord, Path]] = []
        for sidecar in self._sidecars(camera_id):
            image = sidecar.with_suffix(".jpg")
            problem = _image_problem(image)
            if problem is not None:
                logger.warning("skipping frame sidecar %s: its image %s", sidecar, problem)
                continue
            record = self._load(sidecar, camera_id)
            if record is None:
                continue
            if in_window(record, start, end):
                items.append((record, image))
        items.sort(key=lambda it: (it[0].captured_at, it[0].frame_id))
        yield from items

    def count(self, camera_id: str) -> int:
        """Number of complete, readable frames of one camera."""
        return sum(1 for _ in self.iter_frames(camera_id))

    def stored_frames(self, camera_id: str, *, start: datetime | None = None,
                      end: datetime | None = None) -> list[StoredFrame]:
        """Every frame of one camera in the date folders that overlap ``[start, end)``, with
        its record (None: unreadable, as ``fsck`` reports it) and the bytes it takes, in
        (date folder, frame id) order; no image is read (an ``lstat`` each). What deleting
        needs: the caller picks the readable frames by ``captured_at`` (``in_window``)."""
        cam = self._camera_dir(camera_id)
        if not cam.is_dir():
            return []
        out: list[StoredFrame] = []
        for day in _date_folders(cam):
            if not day_overlaps(day.name, start, end):
                continue
            stems = sorted({p.stem for p in day.iterdir()
                            if p.suffix in (".jpg", ".json") and not p.name.startswith(".")})
            for stem in stems:
                image, sidecar = day / f"{stem}.jpg", day / f"{stem}.json"
                record = (self._load(sidecar, camera_id)
                          if ID_RE.fullmatch(stem) and sidecar.is_file()
                          and _image_problem(image) is None else None)
                size, mtime = 0, None
                for path in (image, sidecar):
                    try:
                        st = os.lstat(path)
                    except OSError:
                        continue
                    size += 0 if stat.S_ISDIR(st.st_mode) else st.st_size
                    mtime = st.st_mtime if mtime is None else max(mtime, st.st_mtime)
                modified = None if mtime is None else datetime.fromtimestamp(mtime, UTC)
                out.append(StoredFrame(camera_id, stem, day.name, image, size, record,
                                       modified))
        return out

    def day_sizes(self, camera_id: str, day: str) -> dict[str, int]:
        """``{frame_id: bytes}`` (image + record, a symbolic link's own size) of the files in
        one date folder of one camera: sizes only, no record read (an ``lstat`` each)."""
        folder = self._camera_dir(camera_id) / day
        if not is_date_folder(day):
            return {}
        sizes: dict[str, int] = {}
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return sizes
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or ext not in ("jpg", "json") or entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                sizes[stem] = sizes.get(stem, 0) + st.st_size
        return sizes

    def fsck(self, camera_id: str | None = None) -> FsckReport:
        """Report incomplete or unreadable entries (changes nothing)."""
        report = FsckReport()
        for cam in [camera_id] if camera_id is not None else self.cameras():
            cam_dir = self._camera_dir(cam)
            if not cam_dir.is_dir():
                continue
            for day in _date_folders(cam_dir):
                for path in sorted(day.iterdir()):
                    if path.name.startswith("."):
                        if ".tmp-" in path.name:
                            report.temp_files.append(path)
                        continue
                    if path.suffix == ".jpg" and not path.with_suffix(".json").is_file():
                        report.orphan_images.append(path)
                    elif path.suffix == ".json":
                        image = path.with_suffix(".jpg")
                        if not image.is_file() and not image.is_symlink():
                            report.sidecars_without_image.append(path)
                        elif _image_problem(image) is not None:
                            report.bad_images.append(path)
                        elif self._load(path, cam) is None:
                            report.corrupt_sidecars.append(path)
                        else:
                            report.frames_ok += 1
        return report
