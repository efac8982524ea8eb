"""roadloop.fsutil: the platform's one atomic write and file hash."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from roadloop import fsutil
from roadloop.fsutil import (
    SyncFsHandle,
    atomic_path,
    create_exclusive,
    ext4_without_journal,
    mount_of,
    sha256_file,
    write_bytes_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture(params=["unnamed", "renamed"])
def write_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways ``write_bytes_atomic`` writes: Linux's unnamed file linked into place, and
    the temporary sibling renamed over the target (elsewhere, or a file system without
    ``O_TMPFILE``)."""
    if request.param == "unnamed" and fsutil._O_TMPFILE is None:
        pytest.skip("no O_TMPFILE here")
    if request.param == "renamed":
        monkeypatch.setattr(fsutil, "_O_TMPFILE", None)
    return str(request.param)


def test_write_replaces_whole_file_and_sets_exact_mode(tmp_path: Path, write_way: str) -> None:
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "old", parents=True)
    old_umask = os.umask(0o077)
    try:
        write_bytes_atomic(target, b"new", durable=True, mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _leftovers(target.parent) == []


def test_write_makes_missing_folders_only_when_asked(tmp_path: Path, write_way: str) -> None:
    """``parents=True`` creates the folders the first open finds missing (the gateway writes
    into folders that exist, so the common case costs no ``makedirs``); without it a
    missing folder is an error and nothing is left behind."""
    deep = tmp_path / "a" / "b" / "c.bin"
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(deep, b"x")
    assert list(tmp_path.iterdir()) == []
    write_bytes_atomic(deep, b"x", parents=True)
    write_bytes_atomic(deep, b"y", parents=True)  # the folders exist now
    assert deep.read_bytes() == b"y" and _leftovers(deep.parent) == []


def test_a_write_that_fails_to_name_its_file_leaves_the_old_one_and_nothing_else(
        tmp_path: Path, write_way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step (the link of the unnamed file, or the rename of the temporary one)
    fails: the error comes back, the target keeps its old bytes (or stays absent), and the
    folder holds nothing more."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"good")
    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "link", refuse)
    for target in (old, new):
        with pytest.raises(OSError, match="No space"):
            write_bytes_atomic(target, b"half", durable=True)
    assert old.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]


def test_a_file_system_without_unnamed_files_gets_the_renamed_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``O_TMPFILE`` open refused as unsupported (an old kernel, a file system without
    it) is not an error: the temporary sibling is written and renamed instead."""
    if fsutil._O_TMPFILE is None:
        pytest.skip("no O_TMPFILE here")
    real_open, tried = os.open, []

    def no_tmpfile(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & fsutil._O_TMPFILE == fsutil._O_TMPFILE:
            tried.append(path)
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    renamed: list[object] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "open", no_tmpfile)
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(b), real_replace(a, b)))
    write_bytes_atomic(tmp_path / "a.bin", b"data")
    assert tried and renamed == [str(tmp_path / "a.bin")]
    assert (tmp_path / "a.bin").read_bytes() == b"data" and _leftovers(tmp_path) == []


def test_failed_writer_leaves_target_untouched_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"good"
    assert _leftovers(tmp_path) == []


def test_atomic_path_suffix_for_writers_that_append_one(tmp_path: Path) -> None:
    import numpy as np

    target = tmp_path / "cache.npz"
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, a=np.arange(3))  # np.savez would append .npz to any other name
    with np.load(target) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_create_exclusive_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    assert create_exclusive(key, b"first", mode=0o600) is True
    assert create_exclusive(key, b"second", mode=0o600) is False
    assert key.read_bytes() == b"first"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- syncfs handle
class FakeSyncfs:
    """libc's syncfs as the kernel would answer: the descriptors it was given, an errno."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.fail_with: int | None = None

    def __call__(self, fd: int) -> int:
        import ctypes

        self.fds.append(fd)
        if self.fail_with is not None:
            ctypes.set_errno(self.fail_with)
            return -1
        return 0


@pytest.fixture
def fake_syncfs(monkeypatch: pytest.MonkeyPatch) -> FakeSyncfs:
    fake = FakeSyncfs()
    monkeypatch.setattr(fsutil, "_syncfs_fn", lambda: fake)
    return fake


def test_syncfs_handle_keeps_one_descriptor_and_reports_errors(
    tmp_path: Path, fake_syncfs: FakeSyncfs
) -> None:
    import errno

    handle = SyncFsHandle(tmp_path)
    handle.arm()
    fd = handle._fd
    assert fd is not None
    assert handle.sync() and handle.sync()
    assert fake_syncfs.fds == [fd, fd]  # the descriptor opened before the writes, each time
    fake_syncfs.fail_with = errno.EIO
    with pytest.raises(OSError) as err:
        handle.sync()
    assert err.value.errno == errno.EIO and str(tmp_path) in str(err.value)
    handle.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_syncfs_handle_opens_its_own_descriptor_after_a_fork(
    tmp_path: Path, fake_syncfs: FakeSyncfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = SyncFsHandle(tmp_path)
    handle.arm()
    real_pid = os.getpid()
    monkeypatch.setattr(fsutil.os, "getpid", lambda: real_pid + 1)  # as in a forked worker
    opened: list[int] = []
    real_open = fsutil.os.open
    monkeypatch.setattr(fsutil.os, "open", lambda *a: opened.append(1) or real_open(*a))
    handle.sync()
    handle.sync()
    assert opened == [1]  # one new descriptor for the new process, then kept
    assert handle._pid == real_pid + 1 and fake_syncfs.fds == [handle._fd] * 2
    fd = handle._fd
    monkeypatch.undo()
    assert fd is not None
    os.close(fd)  # the finalizer leaves a descriptor of "another process" alone


def test_syncfs_handle_closes_when_collected(tmp_path: Path, fake_syncfs: FakeSyncfs) -> None:
    import gc

    handle = SyncFsHandle(tmp_path)
    handle.arm()
    fd = handle._fd
    assert fd is not None
    os.fstat(fd)
    del handle
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_syncfs_handle_without_syncfs_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsutil, "_syncfs_fn", lambda: None)
    handle = SyncFsHandle(tmp_path)
    handle.arm()
    assert handle._fd is None and handle.sync() is False


def test_frame_store_arms_before_its_first_unsynced_write(
    tmp_path: Path, fake_syncfs: FakeSyncfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The descriptor must predate the writes: syncfs(2) reports only write-back errors
    since the descriptor it gets was opened."""
    import errno
    from datetime import UTC, datetime

    import cv2
    import numpy as np

    from roadloop.data import frames as frames_mod
    from roadloop.data.frame_records import FrameRecord
    from roadloop.data.frames import FrameStore

    store = FrameStore(tmp_path / "store")
    armed_at_write: list[bool] = []
    real_write = frames_mod.write_bytes_atomic

    def spy(path: Path, data: bytes, **kw: object) -> None:
        armed_at_write.append(store._syncfs._fd is not None)
        real_write(path, data, **kw)

    monkeypatch.setattr(frames_mod, "write_bytes_atomic", spy)
    ok, jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 90, np.uint8))
    assert ok
    rec = FrameRecord(
        frame_id="f-1",
        camera_id="cam-a",
        captured_at=datetime.now(UTC),
        source="test",
        width=160,
        height=120,
    )
    store.write_frame(rec, jpeg.tobytes(), decoded_size=(160, 120), durable=False)
    assert armed_at_write == [True, True]  # image and sidecar
    fake_syncfs.fail_with = errno.EIO
    with pytest.raises(OSError):
        store.sync()  # a write-back error: nothing since the last good sync may be acked
    fake_syncfs.fail_with = None
    store.sync()  # the frames stayed pending and are flushed again
    assert fake_syncfs.fds == [store._syncfs._fd] * 2


def _fake_host(tmp_path: Path, target: Path, fstype: str, journal_task: str | None) -> tuple[Path, Path]:
    """/proc/self/mountinfo and /sys entries describing ``target``'s device."""
    st = os.stat(target)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        f"22 1 0:99 / /other rw - tmpfs tmpfs rw\n"
        f"23 1 {dev} / / rw,relatime shared:1 - {fstype} /dev/vdz rw,discard\n")
    (sysfs / "devices" / "vdz").mkdir(parents=True)
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / dev).symlink_to(Path("..") / ".." / "devices" / "vdz")
    if journal_task is not None:
        (sysfs / "fs" / "ext4" / "vdz").mkdir(parents=True)
        (sysfs / "fs" / "ext4" / "vdz" / "journal_task").write_text(journal_task + "\n")
    return proc, sysfs


@pytest.mark.parametrize(("fstype", "journal_task", "expected"), [
    ("ext4", "<none>", True), ("ext4", "1234", False), ("xfs", None, False),
    ("ext4", None, None)])
def test_ext4_without_journal(tmp_path: Path, fstype: str, journal_task: str | None,
                              expected: bool | None) -> None:
    target = tmp_path / "frames"
    target.mkdir()
    proc, sysfs = _fake_host(tmp_path / "host", target, fstype, journal_task)
    assert ext4_without_journal(target, proc=proc, sysfs=sysfs) is expected
    assert ext4_without_journal(tmp_path / "missing", proc=proc, sysfs=sysfs) is None
    st = os.stat(target)  # the mount is found by device, not by a path prefix
    assert mount_of(target, proc=proc) == (f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
                                           "/", fstype)
    assert mount_of(tmp_path / "missing", proc=proc) is None
