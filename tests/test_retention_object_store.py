"""Retention and erasure on an S3 frame store (moto's server), as a deployment runs them:
``roadloop privacy erase`` with ``ROADLOOP_FRAME_STORE_URL`` set, and the Dagster ops
``enforce_retention`` / ``erase_camera_frames`` on an S3 ``FrameStoreResource``
(docs/retention.md, docs/storage.md).

- the CLI opens the bucket (not the local image cache, which holds no records);
- retention deletes from the store's listing: no image is downloaded, the bytes reported are
  what the bucket held (image + record), leftovers (an image without its record, a record
  without its image) go too, and the cached copies' embeddings are scrubbed;
- an erasure hashes the images of its range (downloaded for that), scrubs their embeddings
  (a leftover's too), and leaves no copy in the cache;
- ``stored_frames`` has the same contract on both stores;
- a frame journalled for expiry, protected since, whose files that run had deleted: its
  gateway row is deleted (folder store and bucket).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from roadloop.data.frame_records import FrameRecord
from roadloop.data.frames import FrameStore
from roadloop.data.object_frames import open_frame_store

from .helpers import CountingS3Client as _CountingClient
from .helpers import StoredSizes, bucket_sizes, synthetic_jpeg
from .test_frames import as_stored
from .test_retention_resume import _Gateway, _Review

REPO = Path(__file__).resolve().parents[1]
W, H = 32, 24


def _record(camera: str, frame_id: str, at: datetime) -> FrameRecord:
    return FrameRecord(frame_id=frame_id, camera_id=camera, captured_at=at, source="test",
                       width=W, height=H)


class _Bucket(StoredSizes):
    """One bucket on moto's server, seen by a writer (the gateway) and through the raw
    client (what the bucket holds, sizes included)."""

    def __init__(self, s3: Any, tmp_path: Path, name: str) -> None:
        self.s3, self.name = s3, s3.new_bucket(name)
        self.url = f"s3://{self.name}/frames"
        self.raw = s3.client()
        self.writer = open_frame_store(self.url, cache_dir=tmp_path / f"{name}-gateway-cache",
                                       client=s3.client())
        self.sha: dict[str, str] = {}

    def put(self, frame_id: str, at: datetime, camera: str = "cam-a", seed: int = 0) -> None:
        jpeg = synthetic_jpeg(seed, (W, H))
        self.writer.write_frame(_record(camera, frame_id, at), jpeg)
        self.sha[frame_id] = hashlib.sha256(jpeg).hexdigest()

    def put_raw(self, key: str, body: bytes) -> None:
        """An object no writer made whole: a crash's image without its record, etc."""
        self.raw.put_object(Bucket=self.name, Key=f"frames/{key}", Body=body)
        if key.endswith(".jpg"):
            self.sha[Path(key).stem] = hashlib.sha256(body).hexdigest()

    def sizes(self) -> dict[str, int]:
        """Object key (under the prefix) -> size."""
        return bucket_sizes(self.raw, self.name, "frames/")


def _cache_table(artifacts: Path, shas: list[str]) -> Path:
    from roadloop.labeling.embeddings import _save_cache, cache_path

    path = cache_path(artifacts / "embedding_cache", "m1")
    _save_cache(path, {s: np.ones(4, np.float32) for s in shas},
                {"model_version": "m1", "imgsz": 320, "layers": [9]})
    return path


def _cached_keys(path: Path) -> set[str]:
    with np.load(path, allow_pickle=False) as z:
        return {str(k) for k in z["keys"]}


def _jpgs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))


@pytest.fixture()
def deployment(s3_server: Any, tmp_path: Path, roadloop_home: Path,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An S3 deployment's settings (env through monkeypatch) and a bucket in it."""
    from roadloop.settings import get_settings

    bucket = _Bucket(s3_server, tmp_path, "privacy")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cache = tmp_path / "platform-cache"
    monkeypatch.setenv("ROADLOOP_FRAME_STORE_URL", bucket.url)
    monkeypatch.setenv("ROADLOOP_FRAME_STORE", str(cache))
    monkeypatch.setenv("ROADLOOP_S3_ENDPOINT_URL", s3_server.endpoint_url)
    get_settings.cache_clear()
    return {"bucket": bucket, "cache": cache, "artifacts": roadloop_home / "artifacts",
            "privacy": roadloop_home / "privacy"}


# --------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("where", ["folder", "object_store"])
def test_stored_frames_lists_frames_and_leftovers_with_sizes_without_reading_images(
        where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    day1 = datetime(2026, 3, 1, 10, tzinfo=UTC)
    day2 = day1 + timedelta(days=1)
    jpeg = synthetic_jpeg(0, (W, H))
    gets: list[str] = []
    if where == "folder":
        store: Any = FrameStore(tmp_path / "frames")
        bucket = None
    else:
        bucket = _Bucket(request.getfixturevalue("s3_server"), tmp_path, "contract")
        store = open_frame_store(bucket.url, cache_dir=tmp_path / "cache",
                                 client=_CountingClient(bucket.raw, gets))

    def raw(key: str, body: bytes) -> None:  # a file or object no store writer made
        if bucket is None:
            (store.root / key).parent.mkdir(parents=True, exist_ok=True)
            (store.root / key).write_bytes(body)
        else:
            bucket.put_raw(key, body)
    written_from = datetime.now(UTC).replace(microsecond=0)  # S3 keeps whole seconds
    for fid, at in (("a1", day1), ("a2", day1 + timedelta(hours=1)), ("b1", day2)):
        store.write_frame(_record("cam-a", fid, at), jpeg)
    raw("cam-a/2026-03-01/orphan.jpg", jpeg)  # an image without its record
    raw("cam-a/2026-03-01/junk.json", b"{not json")  # a record without its image
    raw("cam-a/2026-03-01/bad.jpg", jpeg)  # a record that does not parse
    raw("cam-a/2026-03-01/bad.json", b"{not json")
    gets.clear()

    listed = store.stored_frames("cam-a", start=day1, end=day1 + timedelta(hours=2))
    assert [(f.frame_id, f.day, f.record is not None) for f in listed] == [
        ("a1", "2026-03-01", True), ("a2", "2026-03-01", True), ("bad", "2026-03-01", False),
        ("junk", "2026-03-01", False), ("orphan", "2026-03-01", False)]
    record_size = len(as_stored(_record("cam-a", "a1", day1), jpeg)
                      .model_dump_json(indent=2).encode())
    sizes = {f.frame_id: f.size_bytes for f in listed}
    assert sizes == {"a1": len(jpeg) + record_size, "a2": len(jpeg) + record_size,
                     "orphan": len(jpeg), "junk": len(b"{not json"),
                     "bad": len(jpeg) + len(b"{not json")}
    assert all(f.image == store.root / "cam-a" / f.day / f"{f.frame_id}.jpg" for f in listed)
    # When each was last written, by the store's clock (what tells an upload in flight).
    assert all(f.modified is not None and written_from <= f.modified <= datetime.now(UTC)
               for f in listed), [f.modified for f in listed]
    # A date folder outside [start, end) is not listed; without bounds, all are.
    assert {f.frame_id for f in store.stored_frames("cam-a", start=day2)} == {"b1"}
    assert len(store.stored_frames("cam-a")) == 6
    if where == "object_store":
        assert not [k for k in gets if k.endswith(".jpg")]  # records only
        assert _jpgs(store.root) == []  # nothing downloaded into the cache


# --------------------------------------------------------------------------- the CLI
def _fake_gateway(monkeypatch: pytest.MonkeyPatch, cameras: list[str]) -> list[dict]:
    """``httpx.request`` answering the gateway's two privacy calls (what any gateway client
    of the CLI sends); returns the erase requests it got."""
    import httpx

    erased: list[dict] = []

    def answer(method: str, url: str, **kw: Any) -> httpx.Response:
        req = httpx.Request(method, url)
        if url.endswith("/v1/devices"):
            return httpx.Response(200, json=[{"camera_id": c, "last_seen_at": None}
                                             for c in cameras], request=req)
        if url.endswith("/v1/privacy/erase"):
            erased.append(kw["json"])
            return httpx.Response(200, json={"frames_deleted": 0, "bytes_deleted": 0,
                                             "files_without_row": 0}, request=req)
        return httpx.Response(404, json={"detail": "not here"}, request=req)

    monkeypatch.setattr(httpx, "request", answer)
    monkeypatch.setenv("ROADLOOP_FLEET_ADMIN_TOKEN", "test-admin-token")
    return erased


@pytest.mark.usefixtures("leftovers_settled")
def test_privacy_cli_erases_from_the_bucket_and_scrubs_embeddings(
        deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to open the local image cache as a folder store: no records there, so it
    planned nothing, erased nothing from the bucket, hashed no image (the embeddings stayed)
    and reported success."""
    from typer.testing import CliRunner

    from launch.cli import app

    bucket, cache = deployment["bucket"], deployment["cache"]
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
    for i in range(3):
        bucket.put(f"e{i}", t0 + timedelta(minutes=i), seed=i)
    bucket.put("later", t0 + timedelta(days=3), seed=7)
    bucket.put_raw("cam-a/2026-05-01/orphan.jpg", synthetic_jpeg(9, (W, H)))
    emb = _cache_table(deployment["artifacts"], list(bucket.sha.values()))
    erased_bytes = bucket.bytes_of("e0", "e1", "e2", "orphan")
    erased = _fake_gateway(monkeypatch, ["cam-a"])

    result = CliRunner().invoke(app, [
        "privacy", "erase", "--camera", "cam-a", "--since", (t0 - timedelta(hours=1)).isoformat(),
        "--until", (t0 + timedelta(hours=1)).isoformat(), "--by", "dpo@city", "--no-review"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])
    assert out["frames_deleted"] == 4 and out["bytes_deleted"] == erased_bytes
    assert bucket.frame_ids() == {"later"}
    assert [e["camera_id"] for e in erased] == ["cam-a"]
    assert _cached_keys(emb) == {bucket.sha["later"]}  # the orphan's vector too
    assert out["derived"]["embeddings_removed"] == 4
    assert _jpgs(cache) == []  # the copies hashed for the scrub went with the frames


def test_privacy_cli_does_not_load_dagster(tmp_path: Path) -> None:
    """``roadloop privacy erase`` called the gateway through ``resources.FleetResource``:
    importing it loads the ``resources`` package, Dagster and MLflow (seconds)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from launch.cli import app\n"
        "r = CliRunner().invoke(app, ['privacy', 'erase', '--camera', 'cam-a', '--since',\n"
        "    '2026-05-01T00:00:00+00:00', '--until', '2026-05-02T00:00:00+00:00',\n"
        "    '--by', 'dpo', '--no-review'])\n"
        "assert r.exit_code == 2 and 'unreachable' in r.output, r.output\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'dagster', 'mlflow', 'resources', 'fiftyone', 'torch'})))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ROADLOOP_HOME": str(tmp_path / "home"),
           "ROADLOOP_PROFILE": "test", "ROADLOOP_GATEWAY_URL": "http://127.0.0.1:9",
           "ROADLOOP_FLEET_ADMIN_TOKEN": "t"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- the ops
def _op_resources(deployment: dict[str, Any], gateway: _Gateway, review: _Review,
                  gets: list[str], cameras: set[str] = frozenset()) -> dict[str, Any]:
    from resources import FiftyOneResource, FleetResource, FrameStoreResource
    from roadloop.settings import get_settings

    settings = get_settings()

    class CountingFrameStore(FrameStoreResource):
        def store(self) -> Any:
            store = super().store()
            if hasattr(store, "client"):  # the object store
                store.client = _CountingClient(store.client, gets)
            return store

    class Review(FiftyOneResource):
        def store(self) -> Any:
            return review

    class Fleet(FleetResource):
        def expire(self, frames: list[tuple[str, str]], heartbeats_before: Any,
                   traffic_before: Any, batch: int = 1000) -> dict[str, int]:
            return gateway.expire(frames)

        def cameras(self) -> set[str]:
            return set(cameras)

        def erase_frames(self, camera_id: str, since: datetime, until: datetime) -> int:
            gateway.calls.append([(camera_id, since.isoformat())])
            return 0

    return {"frame_store": CountingFrameStore(root=str(settings.frame_store),
                                              url=settings.frame_store_url,
                                              s3_endpoint_url=settings.s3_endpoint_url),
            "fiftyone": Review(),
            "fleet": Fleet(gateway_url="http://gateway.invalid", admin_token="t")}


@pytest.fixture()
def ledger(deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    import ops.retention as retention_ops
    from roadloop.retention.ledger import PrivacyLedger

    ledger = PrivacyLedger(deployment["privacy"])
    monkeypatch.setattr(retention_ops, "_ledger", lambda: ledger)
    return ledger


def _retention(resources: dict[str, Any]) -> dict[str, Any]:
    import dagster as dg

    from ops.retention import enforce_retention

    return enforce_retention(dg.build_op_context(resources=resources)).value


@pytest.mark.usefixtures("leftovers_settled")
def test_retention_op_on_s3_downloads_nothing_and_reports_the_bucket_bytes(
        deployment: dict[str, Any], ledger: Any) -> None:
    """It walked ``iter_frames``, which downloads every expired image into the cache just to
    delete it (twice: once to choose, once to delete), and summed local file sizes (the
    records are never cached: wrong bytes)."""
    from roadloop.settings import get_settings

    bucket, cache = deployment["bucket"], deployment["cache"]
    now = datetime.now(UTC)
    old = now - timedelta(days=40)
    bucket.put("old-embedded", old, seed=1)
    bucket.put("old-never-read", old + timedelta(minutes=1), seed=2)
    bucket.put("young", now - timedelta(days=1), seed=3)
    bucket.put_raw(f"cam-a/{old:%Y-%m-%d}/orphan.jpg", synthetic_jpeg(4, (W, H)))
    bucket.put_raw(f"cam-a/{old:%Y-%m-%d}/lost.json", b"{}")  # a record without its image
    # The platform read (and embedded) two frames: their copies are in its cache, and its
    # frame index names them.
    platform = open_frame_store(bucket.url, cache_dir=cache, client=bucket.raw)
    lines = []
    for fid in ("old-embedded", "young"):
        image = platform.find_frame("cam-a", fid)
        lines.append(json.dumps({"record": json.loads(platform.read_record(
            "cam-a", fid).model_dump_json()), "image": str(image)}) + "\n")
    index = deployment["artifacts"] / "sampled_edge_frames" / "cam-a.jsonl"
    index.parent.mkdir(parents=True)
    index.write_text("".join(lines))
    emb = _cache_table(deployment["artifacts"], [bucket.sha["old-embedded"], bucket.sha["young"]])
    expired_bytes = bucket.bytes_of("old-embedded", "old-never-read", "orphan", "lost")
    assert get_settings().frame_store_url == bucket.url

    gets: list[str] = []
    gateway = _Gateway({("cam-a", "old-embedded"), ("cam-a", "old-never-read"),
                        ("cam-a", "young")})
    out = _retention(_op_resources(deployment, gateway, _Review(), gets))
    assert [k for k in gets if k.endswith(".jpg")] == []  # no image downloaded
    assert bucket.frame_ids() == {"young"}
    assert out["frames_deleted"] == 4 and out["frame_bytes_deleted"] == expired_bytes
    assert gateway.rows == {("cam-a", "young")}
    assert _jpgs(cache) == [f"cam-a/{(now - timedelta(days=1)):%Y-%m-%d}/young.jpg"]
    assert _cached_keys(emb) == {bucket.sha["young"]}
    assert [json.loads(x)["record"]["frame_id"] for x in index.read_text().splitlines()] == [
        "young"]
    assert ledger.pending_expired_frames() == []


@pytest.mark.usefixtures("leftovers_settled")
def test_erasure_op_on_s3_hashes_the_range_scrubs_and_leaves_no_copy(
        deployment: dict[str, Any], ledger: Any) -> None:
    """Its sizes were local ``stat`` s of cache files (the records never there, a leftover's
    image neither: 0), and a leftover image in the bucket was deleted without its hash, so
    its embedding stayed."""
    import dagster as dg

    from ops.retention import ErasureConfig, erase_camera_frames

    bucket, cache = deployment["bucket"], deployment["cache"]
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
    bucket.put("in1", t0, seed=1)
    bucket.put("in2", t0 + timedelta(minutes=5), seed=2)
    bucket.put("out", t0 + timedelta(days=2), seed=3)
    bucket.put_raw("cam-a/2026-05-01/orphan.jpg", synthetic_jpeg(4, (W, H)))
    emb = _cache_table(deployment["artifacts"], list(bucket.sha.values()))
    erased_bytes = bucket.bytes_of("in1", "in2", "orphan")

    gets: list[str] = []
    gateway = _Gateway(set())
    resources = _op_resources(deployment, gateway, _Review(), gets)
    config = ErasureConfig(camera_id="cam-a", since=(t0 - timedelta(hours=1)).isoformat(),
                           until=(t0 + timedelta(hours=1)).isoformat(), requested_by="dpo")
    out = erase_camera_frames(dg.build_op_context(resources=resources), config).value
    assert out["frames_deleted"] == 3 and out["bytes_deleted"] == erased_bytes
    assert bucket.frame_ids() == {"out"}
    assert _cached_keys(emb) == {bucket.sha["out"]}
    assert out["derived"]["embeddings_removed"] == 3
    assert _jpgs(cache) == []  # downloaded to be hashed, deleted with the frames
    assert not any(k.endswith("/out.jpg") for k in gets)  # only the range's images
    assert [c[0][0] for c in gateway.calls] == ["cam-a"]  # the gateway's rows and files too


# --------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("where", ["folder", "object_store"])
def test_a_pending_frame_protected_since_whose_files_are_gone_loses_its_gateway_row(
        where: str, deployment: dict[str, Any], ledger: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run journalled ``gone`` and ``kept`` for expiry, deleted ``gone`` 's files and was cut
    off; both were then taken into a dataset version. ``kept`` is still in the store: kept,
    gateway row included. ``gone`` cannot be kept (its bytes are gone): its gateway row used
    to stay for good, serving the metadata and preview of a frame that no longer exists."""
    from roadloop.settings import get_settings

    if where == "folder":
        monkeypatch.delenv("ROADLOOP_FRAME_STORE_URL")
        get_settings.cache_clear()
        store: Any = FrameStore(get_settings().frame_store)
    else:
        bucket = deployment["bucket"]
        store = bucket.writer
    old = datetime.now(UTC) - timedelta(days=40)
    for i, fid in enumerate(("gone", "kept")):
        store.write_frame(_record("cam-a", fid, old + timedelta(minutes=i)),
                          synthetic_jpeg(i, (W, H)))
    ledger.add_pending_expired([("cam-a", "gone"), ("cam-a", "kept")])
    store.remove_frame(store.find_frame("cam-a", "gone"))  # ... then the run was cut off
    ledger.record_version_frames("v1", ["cam-a/gone", "cam-a/kept"])

    gateway = _Gateway({("cam-a", "gone"), ("cam-a", "kept")})
    out = _retention(_op_resources(deployment, gateway, _Review(), []))
    assert gateway.calls == [[("cam-a", "gone")]]
    assert gateway.rows == {("cam-a", "kept")}
    assert out["gateway_frames_protected_but_gone"] == 1
    assert out["gateway_frames_pending_from_earlier_runs"] == 1
    assert out["frames_deleted"] == 0 and out["frames_kept_with_dataset_versions"] == 1
    assert store.read_record("cam-a", "kept") is not None
    assert ledger.pending_expired_frames() == []
