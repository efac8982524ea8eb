"""The gateway's human pages and what its OpenAPI document says about tokens: /docs and
/redoc load only assets the gateway serves itself (they work offline), / is a landing page,
every operation names the token it takes (or is explicitly public), and that declaration
matches what the gateway enforces; operator and device rollout endpoints have their own
tags."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet.app import API_VERSION, create_app
from fleet.auth import create_admin_token
from fleet.config import GatewaySettings

# Operations that take no token, and why: health/landing for anyone, enrollment and refresh
# carry their credential in the body.
PUBLIC = {("get", "/"), ("get", "/healthz"), ("post", "/v1/enroll"),
          ("post", "/v1/token/refresh")}
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@dataclass
class Gw:
    client: TestClient
    admin: str
    device: str
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    """One gateway for the module: no test changes its state (refusals and 404s only)."""
    app = create_app(GatewaySettings(home=tmp_path_factory.mktemp("docs") / "home"))
    with TestClient(app) as client:
        gateway = app.state.gateway
        with gateway.db.write() as session:
            admin, _ = create_admin_token(session, gateway.now(), ttl_s=3600, actor="test")
            session.commit()
        auth = {"Authorization": f"Bearer {admin}"}
        enrollment = client.post("/v1/enrollment-tokens", headers=auth, json={
            "camera_id": "cam-a", "scopes": ["camera:read", "camera:write"]})
        device = client.post("/v1/enroll", json={
            "enrollment_token": enrollment.json()["enrollment_token"], "camera_id": "cam-a",
            "agent_version": "1"})
        assert device.status_code == 201, device.text
        yield Gw(client, admin, device.json()["access_token"], client.get("/openapi.json").json())


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method, path, op


@pytest.mark.parametrize(("page", "bundle"), [("/docs", "swagger-ui-bundle.js"),
                                              ("/redoc", "redoc.standalone.js")])
def test_docs_pages_reference_no_external_host_and_their_assets_are_served(
        gw: Gw, page: str, bundle: str) -> None:
    r = gw.client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    assets = ASSET.findall(r.text)
    assert any(a.endswith(bundle) for a in assets), assets
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        got = gw.client.get(asset)
        assert got.status_code == 200 and len(got.content) > 1000, (asset, got.status_code)
    assert "/openapi.json" in r.text


def test_landing_page_names_docs_health_metrics_and_version(gw: Gw) -> None:
    r = gw.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    links = set(ASSET.findall(r.text))
    assert {"/docs", "/redoc", "/openapi.json", "/healthz", "/metrics"} <= links
    assert API_VERSION in r.text
    for link in links - {"/metrics"}:  # /metrics: loopback or its token only
        assert gw.client.get(link).status_code == 200, link


def test_every_operation_declares_its_token_or_is_explicitly_public(gw: Gw) -> None:
    schemes = gw.doc["components"]["securitySchemes"]
    assert {"DeviceToken", "AdminToken"} <= set(schemes)
    assert all(s == {"type": "http", "scheme": "bearer", "description": s["description"]}
               for s in schemes.values())
    seen = 0
    for method, path, op in _operations(gw.doc):
        assert "security" in op, (method, path, "no security declaration")
        security = op["security"]
        if (method, path) in PUBLIC:
            assert security == [], (method, path)
            continue
        assert security, (method, path, "empty security on a protected operation")
        for requirement in security:
            assert set(requirement) <= set(schemes), (method, path, requirement)
        seen += 1
    assert seen >= 30
    assert {} in gw.doc["paths"]["/metrics"]["get"]["security"]  # loopback: no token


def test_declared_tokens_are_the_ones_the_gateway_accepts(gw: Gw) -> None:
    """An operation declared for AdminToken only refuses a device token (403); one declared
    for DeviceToken only refuses an admin token (403); one that lists AdminToken lets an
    admin past authentication. The body is malformed: authentication answers first."""
    checked = 0
    for method, path, op in _operations(gw.doc):
        names = {name for requirement in op["security"] for name in requirement}
        if not names or "MetricsToken" in names:
            continue
        url = path.replace("{", "x-").replace("}", "")

        def call(token: str, url: str = url, method: str = method) -> int:
            return gw.client.request(method.upper(), url, content=b"{broken", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            }).status_code

        if names == {"AdminToken"}:
            assert call(gw.device) == 403, (method, path)
        if names == {"DeviceToken"}:
            assert call(gw.admin) == 403, (method, path)
        if "AdminToken" in names:
            assert call(gw.admin) not in (401, 403), (method, path)
        checked += 1
    assert checked >= 30


def test_operator_and_device_rollout_endpoints_have_their_own_described_tags(gw: Gw) -> None:
    paths = gw.doc["paths"]
    device = {tuple(paths["/v1/manifest"]["get"]["tags"]),
              tuple(paths["/v1/models/{sha256}"]["get"]["tags"])}
    operator = {tuple(paths["/v1/rollouts"]["post"]["tags"]),
                tuple(paths["/v1/models"]["post"]["tags"]),
                tuple(paths["/v1/rollouts/{rollout_id}/advance"]["post"]["tags"])}
    assert len(device) == 1 and len(operator) == 1 and device != operator
    described = {t["name"]: t.get("description") for t in gw.doc["tags"]}
    used = {tag for _, _, op in _operations(gw.doc) for tag in op.get("tags", [])}
    assert used <= set(described) and all(described[t] for t in used), used - set(described)
