"""FiftyOne bootstrap: import FiftyOne pointed at the right database (framework-free).

FiftyOne is imported lazily (it is slow to import and starts MongoDB on first use); the
database location is configured before the first connection (see ``configure_fiftyone``).
One process talks to one FiftyOne database.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from roadloop.errors import RoadloopError


class FiftyOneUnavailable(RoadloopError):
    """FiftyOne or its MongoDB could not be started/connected."""


def import_eta_tolerantly() -> None:
    """Import ``eta.constants`` (FiftyOne's dependency) whatever importlib_metadata does.

    voxel51-eta's METADATA has no ``Author`` field and eta reads ``_META["author"]``. Once a
    package has registered ``importlib_metadata`` (>= 8)'s finder (mlflow does, on import),
    ``importlib.metadata.metadata`` returns its ``Message``, which raises KeyError for a
    missing field, so ``import fiftyone`` fails after ``import mlflow``. Reading the few
    fields eta uses through ``.get`` avoids that.
    """
    if "eta.constants" in sys.modules:
        return
    import importlib.metadata as md

    original = md.metadata

    def tolerant(name: str):
        meta = original(name)
        if name not in ("voxel51-eta", "eta"):
            return meta
        keys = ("name", "version", "summary", "author", "author-email", "home-page", "license")
        return {k: meta.get(k) for k in keys}

    md.metadata = tolerant
    try:
        import eta.constants  # noqa: F401
    finally:
        md.metadata = original


def configure_fiftyone(database_dir: Path | str | None = None, database_uri: str | None = None):
    """Import FiftyOne pointed at ``database_dir`` (a local mongod) or ``database_uri``.

    Must run before the process's first FiftyOne database connection; a later call asking
    for a different database raises instead of silently using the first one.
    """
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    first_import = "fiftyone" not in sys.modules
    if first_import:
        if database_uri:
            os.environ["FIFTYONE_DATABASE_URI"] = database_uri
        elif database_dir:
            os.environ["FIFTYONE_DATABASE_DIR"] = str(Path(database_dir).absolute())
    try:
        import_eta_tolerantly()
        import fiftyone as fo
        import fiftyone.core.odm.database as fodb
    except Exception as exc:  # pragma: no cover - install problem
        raise FiftyOneUnavailable(f"fiftyone could not be imported: {exc}") from exc

    want_dir = str(Path(database_dir).absolute()) if database_dir else None
    if fodb._client is not None:  # already connected: only the same database will do
        same = (database_uri and fo.config.database_uri == database_uri) or (
            not database_uri
            and (want_dir is None or str(Path(fo.config.database_dir).absolute()) == want_dir)
        )
        if not same:
            raise FiftyOneUnavailable(
                f"this process is already connected to FiftyOne database "
                f"{fo.config.database_uri or fo.config.database_dir}; cannot switch to "
                f"{database_uri or want_dir} (one database per process)"
            )
        return fo
    fo.config.database_validation = False
    if database_uri:
        fo.config.database_uri = database_uri
    elif want_dir:
        Path(want_dir).mkdir(parents=True, exist_ok=True)
        fo.config.database_dir = want_dir
    return fo


__all__ = [
    "FiftyOneUnavailable",
    "configure_fiftyone",
    "import_eta_tolerantly",
]
