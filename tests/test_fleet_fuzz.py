"""Schema-driven fuzz of the gateway: every operation of its OpenAPI document, with data that
fits the schema and data that does not (schemathesis + hypothesis), sent with no token, a
device token and an admin token. Asserts what must hold for any input:

* no 5xx — bad input is a 4xx with a message;
* no unauthorised 2xx — a route answers 2xx only to a caller allowed to use it, a device only
  about its own camera.

Deterministic (``derandomize=True``, no example database) and bounded: a fixed number of
examples per operation, identity and mode — many where the identity may use the operation,
a few where it is refused anyway. Path parameters and the heartbeat's camera are sometimes
swapped for real ones (the device's camera and id, a published model, a live rollout) so the
fuzz reaches past the 404s into the code behind them; ``date-time`` values span the whole
range Python can hold, with offsets (where a conversion to UTC overflows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.formats import STRING_FORMATS

from fleet.app import create_app
from fleet.auth import create_admin_token
from fleet.config import GatewaySettings
from fleet.intake_batch import BATCH_CONTENT_TYPE
from roadloop.release.signing import (
    PUBLIC_KEY_FILE,
    build_manifest,
    load_or_create_signing_key,
    sign_manifest,
)

# Examples per operation, identity and mode: where the identity may use the operation / not.
EXAMPLES = int(os.environ.get("ROADLOOP_FUZZ_EXAMPLES", "20"))
EXAMPLES_REFUSED = 3
CAMERA = "cam-fuzz"

# Who may get a 2xx from which operation (random tokens in enroll/refresh bodies never work).
PUBLIC = {("GET", "/healthz"), ("GET", "/")}
# the camera-scoped reads a device may make about its own camera
OWN_CAMERA_READS = {("GET", "/v1/cameras/{camera_id}/heartbeats"),
                    ("GET", "/v1/cameras/{camera_id}/config"),
                    ("GET", "/v1/cameras/{camera_id}/config/history")}
# posts whose JSON body names the camera (a device may post about its own camera only)
OWN_CAMERA_POSTS = {("POST", "/v1/heartbeats"), ("POST", "/v1/traffic/intervals")}
DEVICE = {("POST", "/v1/frames"), ("POST", "/v1/frames/batch"), ("GET", "/v1/manifest"), ("GET", "/v1/models/{sha256}"),
          *OWN_CAMERA_POSTS, *OWN_CAMERA_READS}
NOBODY = {("POST", "/v1/enroll"), ("POST", "/v1/token/refresh")}
DEVICE_ONLY = {("POST", "/v1/frames"), ("POST", "/v1/frames/batch"), ("GET", "/v1/manifest"),
               *OWN_CAMERA_POSTS}


@schemathesis.serializer(BATCH_CONTENT_TYPE)
def _frame_batch(ctx: Any, value: Any) -> dict[str, Any]:
    """The frame batch's raw body, as schemathesis sends any binary body."""
    return {"data": value if isinstance(value, bytes) else str(value).encode()}


@dataclass
class Fuzzed:
    client: TestClient
    operations: list[Any]
    tokens: dict[str, str | None]
    real: dict[str, str]
    failures: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _datetimes() -> st.SearchStrategy[str]:
    """ISO 8601 texts over Python's whole range, with and without offsets, some in a fixed
    plausible window (fixed, so the fuzz is the same on every run)."""
    zones = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12)),
                             timezone(timedelta(hours=1)), timezone(timedelta(hours=-1))])
    plausible = datetime(2026, 1, 1)
    anywhere = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31),
                            timezones=zones)
    recent = st.datetimes(min_value=plausible - timedelta(days=2), max_value=plausible,
                          timezones=zones)
    edges = st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                             "1999-12-31T23:59:59Z", "2026-01-01T00:00:00"])
    return st.one_of(edges, anywhere.map(datetime.isoformat), recent.map(datetime.isoformat))


@pytest.fixture(scope="module", autouse=True)
def _wide_datetimes() -> Iterator[None]:
    saved = STRING_FORMATS.get("date-time")
    schemathesis.openapi.format("date-time", _datetimes())
    yield
    if saved is not None:
        STRING_FORMATS["date-time"] = saved


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    key = load_or_create_signing_key(tmp / "keys")
    settings_ = GatewaySettings(
        home=tmp / "home", model_public_key_file=tmp / "keys" / PUBLIC_KEY_FILE,
        rate_limit_per_s=1e6, rate_limit_burst=1_000_000, sqlite_synchronous="NORMAL",
        fsync_directories=False,
        # Every in-process request comes from one address ("testclient"): without this the
        # unattributed-request buckets answer 429 before the routes see the fuzzed bodies.
        address_rate_limit_per_s=1e6, address_rate_limit_burst=1_000_000,
        unattributed_rate_limit_per_s=1e6, unattributed_rate_limit_burst=1_000_000,
    )
    app = create_app(settings_)
    with TestClient(app, raise_server_exceptions=False) as client:
        gw = app.state.gateway
        with gw.db.write() as session:
            admin, _ = create_admin_token(session, gw.now(), ttl_s=86400, actor="fuzz")
            session.commit()
        auth = {"Authorization": f"Bearer {admin}"}
        enrollment = client.post("/v1/enrollment-tokens", headers=auth,
                                 json={"scopes": ["camera:read", "camera:write"]})
        device = client.post("/v1/enroll", json={
            "enrollment_token": enrollment.json()["enrollment_token"], "camera_id": CAMERA,
            "agent_version": "fuzz"}).json()
        model = tmp / "model.onnx"
        model.write_bytes(os.urandom(2048))
        manifest = sign_manifest(build_manifest("1", model, 320, ["car"], "ro-fuzz"), key)
        published = client.post("/v1/models", headers=auth,
                                files={"file": ("m.onnx", model.read_bytes())},
                                data={"manifest": json.dumps(manifest)})
        assert published.status_code == 201, published.text
        rollout = client.post("/v1/rollouts", headers=auth,
                              json={"model_version": "1", "hold_seconds": 1})
        assert rollout.status_code == 201, rollout.text
        schema = schemathesis.openapi.from_dict(app.openapi())
        yield Fuzzed(
            client,
            [result.ok() for result in schema.get_all_operations()],
            {"none": None, "device": device["access_token"], "admin": admin},
            {"camera_id": CAMERA, "device_id": device["device_id"], "rollout_id": "ro-fuzz",
             "sha256": manifest["sha256"]},
        )


def _httpx_kwargs(kwargs: dict[str, Any], token: str | None) -> dict[str, Any]:
    """schemathesis' requests-style call -> the ``TestClient`` (httpx) one, with our token."""
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items()
               if k.lower() not in ("authorization", "connection", "accept-encoding")}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    out: dict[str, Any] = {"method": kwargs["method"], "url": kwargs["url"], "headers": headers,
                           "params": kwargs.get("params") or None}
    if kwargs.get("json") is not None or "json" in kwargs:
        out["content"] = json.dumps(kwargs["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    if kwargs.get("files"):  # httpx sends str/bytes parts only: other values as their text
        out["files"] = [(name, (filename, value if isinstance(value, (str, bytes)) else
                                json.dumps(value), *rest))
                        for name, (filename, value, *rest) in kwargs["files"]]
        if isinstance(kwargs.get("data"), dict):
            out["data"] = kwargs["data"]
    elif isinstance(kwargs.get("data"), dict):
        out["data"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content"] = data.encode() if isinstance(data, str) else data
    return out


def _own_camera(case: Any, key: tuple[str, str]) -> bool:
    """Whether a device's request is about its own camera (only those may succeed)."""
    if case is None:
        return True
    if key in OWN_CAMERA_READS:
        return (case.path_parameters or {}).get("camera_id") == CAMERA
    if key in OWN_CAMERA_POSTS:
        return isinstance(case.body, dict) and case.body.get("camera_id") == CAMERA
    return True  # frames: the metadata's camera is checked by the gateway itself (403)


def _allowed(identity: str, key: tuple[str, str], case: Any) -> bool:
    if key in PUBLIC:
        return True
    if key in NOBODY or identity == "none":
        return False
    if identity == "device":
        return key in DEVICE and _own_camera(case, key)
    return key not in DEVICE_ONLY  # admin


def _fuzz_operation(fz: Fuzzed, operation: Any, identity: str, mode: GenerationMode) -> None:
    key = (operation.method.upper(), operation.path)
    usable = key in PUBLIC | NOBODY or _allowed(identity, key, None)

    @settings(max_examples=EXAMPLES if usable else EXAMPLES_REFUSED, derandomize=True,
              database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), swap=st.booleans())
    def run(case: Any, swap: bool) -> None:
        if swap:
            for name in list(case.path_parameters or {}):
                if name in fz.real:
                    case.path_parameters[name] = fz.real[name]
            if key in OWN_CAMERA_POSTS and isinstance(case.body, dict):
                case.body["camera_id"] = CAMERA
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        response = fz.client.request(**_httpx_kwargs(kwargs, fz.tokens[identity]))
        fz.counts[str(response.status_code)] = fz.counts.get(str(response.status_code), 0) + 1
        what = f"{identity} {mode.value} {key[0]} {kwargs['url']}"
        if response.status_code >= 500:
            fz.failures.append(f"{what} -> {response.status_code} {response.text[:200]}\n"
                               f"    {_short(kwargs)}")
        elif 200 <= response.status_code < 300 and not _allowed(identity, key, case):
            fz.failures.append(f"{what} -> unauthorised {response.status_code} "
                               f"{response.text[:200]}\n    {_short(kwargs)}")

    try:
        run()
    except Unsatisfiable:  # negative mode: an operation without inputs has nothing to break
        assert mode is GenerationMode.NEGATIVE, key


def _short(kwargs: dict[str, Any]) -> str:
    return repr({k: v for k, v in kwargs.items() if k not in ("headers", "cookies")})[:500]


@pytest.mark.parametrize("identity", ["none", "device", "admin"])  # admin last: it may revoke
def test_fuzz_gateway_no_5xx_no_unauthorised_2xx(fuzzed: Fuzzed, identity: str) -> None:
    operations = fuzzed.operations
    assert len(operations) >= 20, "the gateway's OpenAPI document lost its operations"
    fuzzed.counts.clear()
    fuzzed.failures.clear()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(fuzzed, operation, identity, mode)
    sent = sum(fuzzed.counts.values())
    print(f"fuzz {identity}: {sent} requests, answers {sorted(fuzzed.counts.items())}")
    assert sent >= len(operations) * EXAMPLES_REFUSED, f"only {sent} requests were generated"
    assert not fuzzed.failures, (f"{len(fuzzed.failures)} bad answers out of {sent}:\n"
                                 + "\n".join(fuzzed.failures[:20]))
    if identity != "none":  # the fuzz got past validation somewhere, not only 4xx
        assert any(code.startswith("2") for code in fuzzed.counts), fuzzed.counts
