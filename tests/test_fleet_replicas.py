"""Two gateway replicas (real processes, each with its own home folder) on one PostgreSQL
database and one S3-compatible object store (moto's server): any replica serves any agent,
and replays and one-device-per-camera hold across them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from launch.localfleet import GatewayProcess
from resources.storage import FrameStoreResource

from . import test_fleet_gateway as gateway_tests
from .test_fleet_gateway import assert_clear_4xx, bearer, meta, post_frame

frame_jpeg = gateway_tests.frame_jpeg  # the gateway tests' fixture, reused by name


@pytest.mark.e2e
def test_two_replicas_share_postgres_and_the_object_store(
    postgres_server: Any, s3_server: Any, tmp_path: Path, frame_jpeg: bytes
) -> None:
    bucket = s3_server.new_bucket("fleet")
    env = {**s3_server.env,
           "ROADLOOP_GATEWAY_DATABASE_URL": postgres_server.new_database("replicas"),
           "ROADLOOP_FRAME_STORE_URL": f"s3://{bucket}/frames",
           "ROADLOOP_S3_ENDPOINT_URL": s3_server.endpoint_url}
    a = GatewayProcess(tmp_path / "a", env=env, log_path=tmp_path / "a.log")
    b = GatewayProcess(tmp_path / "b", env=env, log_path=tmp_path / "b.log")
    admin = a.admin_token()
    a.start()
    try:
        b.start()
        with httpx.Client(base_url=a.url, timeout=30) as ca, \
                httpx.Client(base_url=b.url, timeout=30) as cb:
            tokens = [ca.post("/v1/enrollment-tokens", json={}, headers=bearer(admin))
                      .json()["enrollment_token"] for _ in range(2)]
            dev = ca.post("/v1/enroll", json={"enrollment_token": tokens[0],
                                              "camera_id": "cam-r", "agent_version": "1"})
            assert dev.status_code == 201, dev.text
            access = dev.json()["access_token"]
            # The device enrolled on A posts to A, then replays the same frame to B.
            assert post_frame(ca, access, meta("f-1", "cam-r"), frame_jpeg).status_code == 201
            assert_clear_4xx(post_frame(cb, access, meta("f-1", "cam-r"), frame_jpeg),
                             409, "already stored")
            # Replayed under another capture day, it is refused and B removes the copy its
            # write made (every reader would see the frame twice: the frames below).
            next_day = (gateway_tests.T0 + timedelta(days=1)).isoformat()
            assert_clear_4xx(post_frame(cb, access, meta("f-1", "cam-r", captured_at=next_day),
                                        frame_jpeg), 409, "already stored")
            # Any replica takes any agent: B stores the next frame of A's device.
            assert post_frame(cb, access, meta("f-2", "cam-r"), frame_jpeg).status_code == 201
            # A second device for the same camera is refused on B as it would be on A.
            second = cb.post("/v1/enroll", json={"enrollment_token": tokens[1],
                                                 "camera_id": "cam-r", "agent_version": "1"})
            assert_clear_4xx(second, 409, "already enrolled")
            # B reads the frame A stored (its own cache starts empty) for the preview.
            preview = cb.get("/v1/cameras/cam-r/preview.jpg", headers=bearer(admin))
            assert preview.status_code == 200 and preview.content[:3] == b"\xff\xd8\xff"
    finally:
        b.stop()
        a.stop()
    assert not (tmp_path / "a" / "frames" / "cam-r").exists()  # nothing on A's local disk
    # The Dagster side reads both frames from the object store.
    store = FrameStoreResource(root=str(tmp_path / "dagster-cache"), url=env[
        "ROADLOOP_FRAME_STORE_URL"], s3_endpoint_url=s3_server.endpoint_url)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        frames = list(store.store().iter_frames("cam-r"))
    assert [(r.frame_id, p.read_bytes() == frame_jpeg) for r, p in frames] == [
        ("f-1", True), ("f-2", True)]
