"""Dataset versions in DVC (``--no-scm`` repo) pushed to any DVC remote (local by default).

Layout of the DVC repo (``settings.dvc_repo``):

    .dvc/            DVC config + cache (remote ``storage`` is the default)
    .dvcignore       ignores versions/ and Ultralytics' *.cache label caches
    data/curated/    the tracked dataset folder (``data/curated.dvc`` beside it)
    versions/<md5>.dvc   a copy of the .dvc file of every version ever pushed

Without Git, the ``.dvc`` file is the only pointer to a version, so each one is kept
under ``versions/``; ``restore`` puts that pointer in a scratch folder inside the repo and
``dvc pull``s it, which fetches from the remote when the local cache lacks the files. A
version not recorded here (another machine pushed it) is restored from its md5 alone: the
remote holds the ``.dir`` object that lists its files.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import yaml
from pydantic import BaseModel

from roadloop.errors import InvalidInputError, MissingDataError, RoadloopError
from roadloop.fsutil import atomic_path, swap_dir_into_place

logger = logging.getLogger(__name__)

REMOTE_NAME = "storage"
VERSIONS_DIR = "versions"
_SCRATCH_PREFIX = ".restore-"
# dvc-s3 remote options and the AWS variables they are read from (``_configure_s3``).
_S3_CREDENTIALS = (("access_key_id", "AWS_ACCESS_KEY_ID"),
                   ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                   ("session_token", "AWS_SESSION_TOKEN"))
_DVCIGNORE = f"# managed by roadloop.data.versioning\n/{VERSIONS_DIR}/\n*.cache\n"


class DvcError(RoadloopError):
    """A dvc command failed; the message carries the command and dvc's stderr."""


class DatasetVersion(BaseModel):
    """One pushed dataset version. ``md5`` is DVC's directory hash without the ``.dir`` suffix."""

    md5: str
    nfiles: int
    size: int
    dvc_file: Path
    remote_url: str


def _normalise_md5(md5: str) -> str:
    md5 = md5.strip().removesuffix(".dir")
    if not md5 or not all(c in "0123456789abcdef" for c in md5.lower()):
        raise InvalidInputError(Path(md5 or "<empty>"), "not a DVC md5 hash")
    return md5.lower()


class DvcStore:
    """A DVC repo without Git plus its default remote, driven through the ``dvc`` CLI."""

    def __init__(self, repo_dir: Path, remote_url: str,
                 s3_endpoint_url: str | None = None) -> None:
        """``remote_url``: a folder or any DVC remote URL; an ``s3://`` remote on a non-AWS
        server (MinIO, Ceph) gets ``s3_endpoint_url`` as its ``endpointurl`` (pushing to S3
        goes through the ``dvc-s3`` plugin; credentials: see ``_configure_s3``)."""
        self.repo_dir = Path(repo_dir).absolute()
        self.remote_url = str(remote_url)
        self.s3_endpoint_url = s3_endpoint_url

    # ------------------------------------------------------------------ plumbing

    def _dvc(self, *args: str, wait_for_lock: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``dvc *args`` in the repo. ``wait_for_lock`` (the commands that take DVC's repo
        lock: add, push, pull) passes DVC's global ``--wait-for-lock``: a second run queues
        behind another run's long ``dvc push`` instead of failing after DVC's 3 s retry."""
        wait = ["--wait-for-lock"] if wait_for_lock else []
        cmd = [sys.executable, "-m", "dvc", *wait, *args]
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        logger.debug("running %s in %s", " ".join(cmd[2:]), self.repo_dir)
        proc = subprocess.run(
            cmd, cwd=self.repo_dir, env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            msg = (proc.stderr.strip() or proc.stdout.strip())[-4000:]
            raise DvcError(
                f"`dvc {' '.join(args)}` failed in {self.repo_dir} (exit {proc.returncode}): {msg}"
            )
        return proc

    @property
    def versions_dir(self) -> Path:
        return self.repo_dir / VERSIONS_DIR

    def ensure(self) -> None:
        """Create the DVC repo (``--no-scm``) and point remote ``storage`` at remote_url (idempotent)."""
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        if not (self.repo_dir / ".dvc" / "config").exists():
            logger.info("initialising DVC repo (no SCM) at %s", self.repo_dir)
            self._dvc("init", "--no-scm", "-q")
        if "://" not in self.remote_url:  # a local remote: make sure the folder exists
            Path(self.remote_url).expanduser().mkdir(parents=True, exist_ok=True)
        # Each dvc call costs ~0.5 s of start-up; skip them when the config already says so.
        config = (self.repo_dir / ".dvc" / "config").read_text(encoding="utf-8")
        if "analytics = false" not in config:
            self._dvc("config", "core.analytics", "false")
        if f"remote = {REMOTE_NAME}" not in config or f"url = {self.remote_url}\n" not in config:
            self._dvc("remote", "add", "--default", "--force", REMOTE_NAME, self.remote_url)
            config = (self.repo_dir / ".dvc" / "config").read_text(encoding="utf-8")
        if self.remote_url.startswith("s3://"):
            self._configure_s3(config)
        ignore = self.repo_dir / ".dvcignore"
        if not ignore.exists() or "managed by roadloop" not in ignore.read_text():
            ignore.write_text(_DVCIGNORE + (ignore.read_text() if ignore.exists() else ""))
        self.versions_dir.mkdir(exist_ok=True)

    def _configure_s3(self, config: str) -> None:
        """An ``s3://`` remote as the dvc-s3 docs configure one: ``endpointurl`` (a non-AWS
        server) in ``.dvc/config``; the standard AWS credentials found in the environment in
        ``.dvc/config.local`` (``dvc remote modify --local``: the file DVC keeps secrets in,
        never shared), so a ``dvc`` run without them (a shell, a restore) still signs in.
        Without those variables DVC falls back to the AWS config files or an IAM role."""
        if self.s3_endpoint_url and f"endpointurl = {self.s3_endpoint_url}\n" not in config:
            self._dvc("remote", "modify", REMOTE_NAME, "endpointurl", self.s3_endpoint_url)
        local_file = self.repo_dir / ".dvc" / "config.local"
        local = local_file.read_text(encoding="utf-8") if local_file.exists() else ""
        for option, variable in _S3_CREDENTIALS:
            value = os.environ.get(variable)
            if value and f"{option} = {value}\n" not in local:
                self._dvc("remote", "modify", "--local", REMOTE_NAME, option, value)
        if local_file.exists():
            local_file.chmod(0o600)

    # ------------------------------------------------------------------ versions

    def add_and_push(self, data_dir: Path) -> DatasetVersion:
        """Track ``data_dir`` (a folder inside the repo), push it, and record the version."""
        self.ensure()
        data_dir = Path(data_dir).absolute()
        try:
            rel = data_dir.relative_to(self.repo_dir)
        except ValueError:
            raise InvalidInputError(
                data_dir, f"must be inside the DVC repo {self.repo_dir}"
            ) from None
        if not data_dir.is_dir():
            raise MissingDataError(f"dataset folder not found: {data_dir}", data_dir)
        logger.info("dvc add %s", rel)
        self._dvc("add", str(rel), wait_for_lock=True)
        dvc_file = data_dir.with_name(data_dir.name + ".dvc")
        version = self._read_dvc_file(dvc_file)
        logger.info(
            "dvc push %s (md5 %s, %d files) to %s",
            rel,
            version.md5,
            version.nfiles,
            self.remote_url,
        )
        self._dvc("push", str(dvc_file.relative_to(self.repo_dir)), wait_for_lock=True)
        kept = self.versions_dir / f"{version.md5}.dvc"
        with atomic_path(kept) as tmp:
            shutil.copyfile(dvc_file, tmp)
        return version.model_copy(update={"dvc_file": kept})

    def _read_dvc_file(self, dvc_file: Path) -> DatasetVersion:
        try:
            doc = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
            out = doc["outs"][0]
            md5 = str(out["md5"])
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
            raise InvalidInputError(dvc_file, f"not a readable .dvc file: {exc}") from exc
        if not md5.endswith(".dir"):
            raise InvalidInputError(dvc_file, "tracks a file, not a directory")
        return DatasetVersion(
            md5=_normalise_md5(md5),
            nfiles=int(out.get("nfiles", 0)),
            size=int(out.get("size", 0)),
            dvc_file=dvc_file,
            remote_url=self.remote_url,
        )

    def versions(self) -> list[DatasetVersion]:
        """Every version pushed from this repo (from ``versions/``)."""
        if not self.versions_dir.is_dir():
            return []
        return [self._read_dvc_file(p) for p in sorted(self.versions_dir.glob("*.dvc"))]

    def restore(self, md5: str, target_dir: Path, overwrite: bool = False) -> Path:
        """Bring version ``md5`` back into ``target_dir``, from the remote if not cached.

        ``target_dir`` must not exist unless ``overwrite`` (then it is replaced whole). The
        files are checked out in a scratch folder inside the repo and renamed into place, so
        a failed restore leaves ``target_dir`` untouched.
        """
        md5 = _normalise_md5(md5)
        pointer = self.versions_dir / f"{md5}.dvc"
        recorded = pointer.is_file()
        target_dir = Path(target_dir).absolute()
        if target_dir.exists() and not overwrite:
            raise InvalidInputError(
                target_dir, "restore target already exists (pass overwrite=True; roadloop dataset restore --overwrite)"
            )
        self.ensure()
        scratch = self.repo_dir / f"{_SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            scratch.mkdir()
            if recorded:
                doc = yaml.safe_load(pointer.read_text(encoding="utf-8"))
            else:
                # Not pushed from this repo (e.g. a fresh machine): the directory hash alone
                # is enough for DVC to find the version's file list on the remote.
                doc = {"outs": [{"md5": f"{md5}.dir", "hash": "md5", "path": "dataset"}]}
            out_name = Path(doc["outs"][0]["path"]).name
            doc["outs"][0]["path"] = out_name
            (scratch / f"{out_name}.dvc").write_text(yaml.safe_dump(doc, sort_keys=False))
            logger.info("restoring dataset version %s from %s", md5, self.remote_url)
            try:
                self._dvc("pull", str((scratch / f"{out_name}.dvc").relative_to(self.repo_dir)),
                          wait_for_lock=True)
            except DvcError as exc:
                if recorded or f"{md5}.dir" not in str(exc):
                    raise
                known = [v.md5 for v in self.versions()]
                raise MissingDataError(
                    f"unknown dataset version {md5}: not in {self.versions_dir} nor on the "
                    f"remote {self.remote_url} (versions pushed from here: {known or 'none'})",
                    pointer,
                ) from exc
            restored = scratch / out_name
            if not restored.is_dir():
                raise DvcError(f"dvc pull of version {md5} produced no folder at {restored}")
            target_dir.parent.mkdir(parents=True, exist_ok=True)
            staged = target_dir.parent / f".tmp-{target_dir.name}-{uuid.uuid4().hex[:12]}"
            shutil.move(str(restored), str(staged))  # a copy when crossing filesystems
            try:
                swap_dir_into_place(staged, target_dir)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target_dir


__all__ = ["DatasetVersion", "DvcError", "DvcStore"]
