"""Two writers of one frame on the S3 frame store (moto's server): a frame's JPEG and record
always come from the same upload (``S3FrameStore.write_frame`` / ``_put_image``).

The JPEG used to be PUT unconditionally before the create-only record: a replica that found
no record, then PUT its JPEG after another replica had written the whole frame, replaced
that frame's pixels and was told ``already_existed`` (its record PUT refused). The bucket
held the first upload's record (and the first gateway's row: size, SHA-256) beside the
second upload's pixels. The races are staged by running one writer's steps inside the
other's (hooks on its requests), never by timing.
"""

from __future__ import annotations

import errno
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from roadloop.data.frame_records import FrameRecord
from roadloop.data.object_frames import FrameWriteInProgress, S3FrameStore

from . import test_fleet_gateway as gateway_tests
from .helpers import encode_jpeg, synthetic_image
from .test_fleet_gateway import meta, post_frame
from .test_frames import as_stored, record

make_env = gateway_tests.make_env  # fixture: an in-process gateway
frame_jpeg = gateway_tests.frame_jpeg

IMAGE = "fleet/cam_a/2026-03-01/f1.jpg"
RECORD = "fleet/cam_a/2026-03-01/f1.json"


def _frame(seed: int, size: tuple[int, int], source: str) -> tuple[FrameRecord, bytes]:
    img = synthetic_image(seed, size)
    return (record("f1", image=img).model_copy(update={"source": source}),
            encode_jpeg(img))


A_RECORD, A_JPEG = _frame(1, (160, 120), "agent:A")
B_RECORD, B_JPEG = _frame(2, (320, 240), "agent:B")


@pytest.fixture()
def bucket(s3_server: Any) -> str:
    return s3_server.new_bucket("race")


def _replica(s3_server: Any, bucket: str, name: str, tmp_path: Path,
             client: Any = None) -> S3FrameStore:
    """One gateway replica's store: its own client and cache folder, the shared bucket."""
    return S3FrameStore(bucket, "fleet", cache_dir=tmp_path / name,
                        client=client or s3_server.client())


def _object(s3_server: Any, bucket: str, key: str) -> bytes | None:
    try:
        return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        if "NoSuchKey" in str(exc):
            return None
        raise


def _stored(s3_server: Any, bucket: str) -> tuple[bytes | None, str | None]:
    """The JPEG in the bucket and the ``source`` of the record beside it."""
    side = _object(s3_server, bucket, RECORD)
    return (_object(s3_server, bucket, IMAGE),
            None if side is None else FrameRecord.model_validate_json(side).source)


class _Hooked:
    """A client that runs ``hook`` (once) right before the first call ``when(name, kw)``
    matches, then passes every call on: one replica's step at a fixed point of another's."""

    def __init__(self, client: Any, when: Any, hook: Any) -> None:
        self._client, self._when, self._hook = client, when, hook
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        if not callable(real) or name.startswith("_") or name == "meta":
            return real

        def call(**kw: Any) -> Any:
            self.calls.append(name)
            if self._hook is not None and self._when(name, kw):
                hook, self._hook = self._hook, None
                hook()
            return real(**kw)

        return call


def _is_put(key: str, **condition: str) -> Any:
    return lambda name, kw: (name == "put_object" and kw["Key"] == key
                             and all(kw.get(k) == v for k, v in condition.items()))


@pytest.fixture()
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG without its record counts as a crash leftover at once (``IN_FLIGHT_GRACE``
    0): moto's ``LastModified`` cannot be set back."""
    monkeypatch.setattr("roadloop.data.frame_records.IN_FLIGHT_GRACE", timedelta(0))


# --------------------------------------------------------------------------- the races
def test_a_frame_completed_meanwhile_keeps_its_pixels(s3_server: Any, bucket: str,
                                                      tmp_path: Path) -> None:
    """B finds no record, then A writes its whole frame, then B PUTs its JPEG: the JPEG PUT
    is refused, B sees A's record and reports ``already_existed``; A's pixels stay."""
    a = _replica(s3_server, bucket, "a", tmp_path)
    done: dict[str, Any] = {}
    hooked = _Hooked(s3_server.client(), _is_put(IMAGE),
                     lambda: done.setdefault("a", a.write_frame(A_RECORD, A_JPEG)))
    b = _replica(s3_server, bucket, "b", tmp_path, hooked)

    wb = b.write_frame(B_RECORD, B_JPEG)

    assert not done["a"].already_existed and wb.already_existed
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")
    assert a.read_record("cam_a", "f1") == as_stored(A_RECORD, A_JPEG)


def test_a_write_between_anothers_two_puts_is_retried_later(s3_server: Any, bucket: str,
                                                            tmp_path: Path) -> None:
    """A's JPEG is in, its record not yet, when B writes other pixels: B writes nothing and
    fails retryably (an ``OSError``: the gateway's 503); A completes; B's retry is told the
    frame exists."""
    b = _replica(s3_server, bucket, "b", tmp_path)
    refused: list[BaseException] = []

    def b_writes() -> None:
        with pytest.raises(FrameWriteInProgress) as exc:
            b.write_frame(B_RECORD, B_JPEG)
        refused.append(exc.value)

    a = _replica(s3_server, bucket, "a", tmp_path,
                 _Hooked(s3_server.client(), _is_put(RECORD), b_writes))
    wa = a.write_frame(A_RECORD, A_JPEG)

    assert not wa.already_existed and len(refused) == 1
    assert isinstance(refused[0], OSError) and refused[0].errno == errno.EBUSY
    assert "another upload" in str(refused[0])
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")
    assert b.write_frame(B_RECORD, B_JPEG).already_existed  # the retry
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")


@pytest.mark.usefixtures("settled")
def test_a_leftover_replaced_by_another_replica_first_is_not_replaced_again(
        s3_server: Any, bucket: str, tmp_path: Path) -> None:
    """Both replicas find the same old leftover with other pixels; B replaces it and writes
    its frame while A is about to: A's replace is conditional on the leftover's ETag, is
    refused, and A is told the frame exists. B's pixels stay under B's record."""
    raw = s3_server.client()
    raw.put_object(Bucket=bucket, Key=IMAGE, Body=encode_jpeg(synthetic_image(9)))
    b = _replica(s3_server, bucket, "b", tmp_path)
    done: dict[str, Any] = {}
    hooked = _Hooked(raw, lambda name, kw: name == "put_object" and "IfMatch" in kw,
                     lambda: done.setdefault("b", b.write_frame(B_RECORD, B_JPEG)))
    a = _replica(s3_server, bucket, "a", tmp_path, hooked)

    assert a.write_frame(A_RECORD, A_JPEG).already_existed
    assert not done["b"].already_existed
    assert _stored(s3_server, bucket) == (B_JPEG, "agent:B")


# --------------------------------------------------------------------------- leftovers
def test_a_retry_after_a_crash_between_the_puts_completes(s3_server: Any, bucket: str,
                                                          tmp_path: Path) -> None:
    """The same upload's JPEG without its record (a crash between the PUTs, just now): the
    retry keeps it and writes the record."""
    s3_server.client().put_object(Bucket=bucket, Key=IMAGE, Body=A_JPEG)
    a = _replica(s3_server, bucket, "a", tmp_path)
    assert not a.write_frame(A_RECORD, A_JPEG).already_existed
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")
    assert a.fsck().clean and a.count("cam_a") == 1


@pytest.mark.usefixtures("settled")
def test_an_old_crash_leftover_of_the_same_upload_is_kept_and_made_young(
        s3_server: Any, bucket: str, tmp_path: Path) -> None:
    """Older than the grace, the same bytes are PUT again over themselves (``If-Match``):
    young again, so the start-up reconcile and retention leave it alone while the record
    follows."""
    s3_server.client().put_object(Bucket=bucket, Key=IMAGE, Body=A_JPEG)
    hooked = _Hooked(s3_server.client(), lambda name, kw: False, None)
    a = _replica(s3_server, bucket, "a", tmp_path, hooked)
    assert not a.write_frame(A_RECORD, A_JPEG).already_existed
    assert hooked.calls == ["head_object", "put_object", "head_object", "put_object",
                            "put_object"]
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")


class _OpaqueEtags:
    """A store whose ETags are no MD5 of the body (SSE-KMS): every ETag it answers is
    replaced by an opaque one."""

    def __init__(self, client: Any, gets: list[str]) -> None:
        self._client, self._gets = client, gets

    @staticmethod
    def _opaque(answer: dict) -> dict:
        if "ETag" in answer:
            answer["ETag"] = '"kms-0123456789abcdef0123456789abcdef"'
        return answer

    def head_object(self, **kw: Any) -> Any:
        return self._opaque(self._client.head_object(**kw))

    def get_object(self, **kw: Any) -> Any:
        self._gets.append(kw["Key"])
        return self._opaque(self._client.get_object(**kw))

    def put_object(self, **kw: Any) -> Any:
        return self._opaque(self._client.put_object(**kw))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_retry_completes_on_a_store_whose_etags_are_no_md5(s3_server: Any, bucket: str,
                                                              tmp_path: Path) -> None:
    """SSE-KMS: the JPEG found cannot be matched by its ETag, so it is read and compared
    (one GET, only when the JPEG PUT was refused)."""
    s3_server.client().put_object(Bucket=bucket, Key=IMAGE, Body=A_JPEG)
    gets: list[str] = []
    a = _replica(s3_server, bucket, "a", tmp_path, _OpaqueEtags(s3_server.client(), gets))
    assert not a.write_frame(A_RECORD, A_JPEG).already_existed
    assert gets == [IMAGE]
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")
    s3_server.client().put_object(Bucket=bucket, Key=IMAGE.replace("f1", "f2"), Body=B_JPEG)
    with pytest.raises(FrameWriteInProgress):  # other pixels, young: still refused
        a.write_frame(A_RECORD.model_copy(update={"frame_id": "f2"}), A_JPEG)


@pytest.mark.usefixtures("settled")
def test_an_old_leftover_with_other_pixels_is_replaced(s3_server: Any, bucket: str,
                                                       tmp_path: Path) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=IMAGE, Body=B_JPEG)
    a = _replica(s3_server, bucket, "a", tmp_path)
    assert not a.write_frame(A_RECORD, A_JPEG).already_existed
    assert _stored(s3_server, bucket) == (A_JPEG, "agent:A")
    assert a.fsck().clean


def test_a_young_leftover_with_other_pixels_is_left_alone(s3_server: Any, bucket: str,
                                                          tmp_path: Path) -> None:
    """Younger than ``IN_FLIGHT_GRACE`` it may be another replica's upload in flight: kept,
    nothing written, a retryable error."""
    s3_server.client().put_object(Bucket=bucket, Key=IMAGE, Body=B_JPEG)
    a = _replica(s3_server, bucket, "a", tmp_path)
    with pytest.raises(OSError) as exc:
        a.write_frame(A_RECORD, A_JPEG)
    assert isinstance(exc.value, FrameWriteInProgress) and exc.value.errno == errno.EBUSY
    assert _stored(s3_server, bucket) == (B_JPEG, None)


def test_the_common_path_is_one_put_per_object(s3_server: Any, bucket: str,
                                                tmp_path: Path) -> None:
    hooked = _Hooked(s3_server.client(), lambda name, kw: False, None)
    a = _replica(s3_server, bucket, "a", tmp_path, hooked)
    assert not a.write_frame(A_RECORD, A_JPEG).already_existed
    assert hooked.calls == ["head_object", "put_object", "put_object"]
    hooked.calls.clear()
    assert a.write_frame(A_RECORD, A_JPEG).already_existed  # a replay: one HEAD
    assert hooked.calls == ["head_object"]


# --------------------------------------------------------------------------- the gateway
def _gateway_with_a_jpeg_in_flight(s3_server: Any, make_env: Any,
                                   monkeypatch: pytest.MonkeyPatch, name: str,
                                   ) -> tuple[Any, str, Any, str, str, bytes]:
    """A gateway on a fresh bucket where f-1 of cam-a has a young JPEG with other pixels and
    no record (another upload between its two PUTs): (env, device token, raw client, bucket,
    the JPEG's key, its bytes)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.new_bucket(name)
    env = make_env("home", frame_store_url=f"s3://{bucket}/frames",
                   s3_endpoint_url=s3_server.endpoint_url)
    token = env.enroll("cam-a")["access_token"]
    key = f"frames/cam-a/{gateway_tests.T0:%Y-%m-%d}/f-1.jpg"
    other = encode_jpeg(synthetic_image(7, (gateway_tests.W, gateway_tests.H)))
    raw = s3_server.client()
    raw.put_object(Bucket=bucket, Key=key, Body=other)
    return env, token, raw, bucket, key, other


def test_the_gateway_answers_503_while_another_upload_is_in_flight(
        s3_server: Any, make_env: Any, frame_jpeg: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``POST /v1/frames``: a young JPEG with other pixels and no record is another
    replica's upload in flight: 503 (retry later), nothing stored; once it is a leftover
    (older than the grace), the retry replaces it."""
    env, token, raw, bucket, key, other = _gateway_with_a_jpeg_in_flight(
        s3_server, make_env, monkeypatch, "gw-race")

    r = post_frame(env.client, token, meta("f-1"), frame_jpeg)
    assert r.status_code == 503 and "retry later" in r.json()["detail"], r.text
    assert raw.get_object(Bucket=bucket, Key=key)["Body"].read() == other
    assert env.rows() == []

    monkeypatch.setattr("roadloop.data.frame_records.IN_FLIGHT_GRACE", timedelta(0))
    r = post_frame(env.client, token, meta("f-1"), frame_jpeg)
    assert r.status_code == 201, r.text
    assert raw.get_object(Bucket=bucket, Key=key)["Body"].read() == frame_jpeg


def test_a_frame_in_flight_elsewhere_does_not_sink_the_rest_of_its_batch(
        s3_server: Any, make_env: Any, frame_jpeg: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The busy frame is that frame's own 503: the store has not failed, so the frames after
    it in the batch are written (a failed store would give them its 503 untried)."""
    from .test_frame_batch import batch_body, post_batch

    env, token, *_ = _gateway_with_a_jpeg_in_flight(s3_server, make_env, monkeypatch,
                                                     "gw-race-batch")
    r = post_batch(env, token, batch_body([(meta("f-1"), frame_jpeg), (meta("f-2"), frame_jpeg)]))
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == [503, 201]
    assert [x.frame_id for x in env.rows()] == ["f-2"]
