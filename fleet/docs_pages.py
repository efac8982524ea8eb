"""The gateway's human pages: Swagger UI and ReDoc served from the gateway itself, and a
landing page at ``/``.

FastAPI's default ``/docs`` and ``/redoc`` load their JavaScript and CSS from a public CDN,
so on a site without Internet access they are blank pages. Here the assets come from the
``fastapi-offline`` wheel (Swagger UI's bundle and CSS, ReDoc's standalone bundle), mounted
under ``/static/docs`` the way FastAPI documents it ("Custom Docs UI Static Assets").
"""

from __future__ import annotations

import html
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_PREFIX = "/static/docs"
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"
# Declared public in the OpenAPI document: an empty list overrides any requirement.
PUBLIC: dict[str, Any] = {"security": []}

# Tag order and descriptions of the OpenAPI document (Swagger UI and ReDoc group by tag).
TAGS: list[dict[str, str]] = [
    {"name": "health", "description": "The gateway's landing page, liveness and Prometheus "
     "metrics. No token (metrics: a metrics token, or loopback only)."},
    {"name": "enrollment", "description": "Devices trade a one-time enrollment token for "
     "an identity and tokens, and rotate them. The credential travels in the body: no "
     "bearer token."},
    {"name": "frames", "description": "Sampled frames uploaded by devices (DeviceToken)."},
    {"name": "heartbeats", "description": "Device heartbeats (DeviceToken) and their "
     "history per camera (DeviceToken for its own camera, or AdminToken)."},
    {"name": "device updates", "description": "What an edge agent polls: its manifest "
     "(which model to serve or shadow) and the signed model files (DeviceToken; operators "
     "may download models too)."},
    {"name": "rollouts (operator)", "description": "Operators publish signed models and "
     "steer staged rollouts: create, pause, resume, advance, roll back, evaluate "
     "(AdminToken)."},
    {"name": "camera config", "description": "Per-camera configuration: operators set it "
     "(AdminToken), a device reads its own camera's (DeviceToken)."},
    {"name": "traffic", "description": "Traffic intervals posted by devices (DeviceToken) "
     "and the queries operators run on them (AdminToken)."},
    {"name": "admin", "description": "Devices, enrollment tokens, the audit log and "
     "gateway statistics (AdminToken)."},
    {"name": "drift", "description": "Per-camera drift verdicts reported by the platform, "
     "exported on /metrics (AdminToken)."},
    {"name": "privacy", "description": "Erasure and expiry of stored frames (AdminToken)."},
]


def assets_dir() -> Path:
    """Where the installed ``fastapi-offline`` wheel keeps the docs assets."""
    return Path(str(files("fastapi_offline") / "static"))


def _landing(title: str, version: str, metrics: bool) -> str:
    rows = [
        ("/docs", "API documentation (Swagger UI): try requests with Authorize"),
        ("/redoc", "API documentation (ReDoc)"),
        ("/openapi.json", "OpenAPI document"),
        ("/healthz", "Liveness and database reachability"),
    ]
    if metrics:
        rows.append(("/metrics", "Prometheus metrics (metrics token, or loopback only)"))
    items = "\n".join(f'    <li><a href="{href}">{href}</a>: {html.escape(what)}</li>'
                      for href, what in rows)
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title>
<link rel="icon" href="{ASSETS_PREFIX}/{FAVICON}"></head>
<body style="font-family: sans-serif; max-width: 48em; margin: 2em auto">
  <h1>{html.escape(title)}</h1>
  <p>API version <strong>{html.escape(version)}</strong>.</p>
  <ul>
{items}
  </ul>
  <p>Tokens: devices send the access token from <code>POST /v1/enroll</code>
  (<em>DeviceToken</em>); operators an admin token from
  <code>roadloop fleet admin-token create</code> (<em>AdminToken</em>), both as
  <code>Authorization: Bearer &lt;token&gt;</code>. Each operation in the docs names the
  one it needs. The contract: <code>docs/fleet-api.md</code>.</p>
</body>
</html>
"""


def install(app: FastAPI, *, metrics: bool) -> None:
    """Add ``/``, ``/docs``, ``/redoc`` and the assets they load (the app was built with
    ``docs_url=None, redoc_url=None``)."""
    assert app.openapi_url is not None
    openapi_url = app.openapi_url
    app.mount(ASSETS_PREFIX, StaticFiles(directory=assets_dir()), name="docs-assets")
    page = _landing(app.title, app.version, metrics)

    @app.get("/", tags=["health"], response_class=Response, openapi_extra=PUBLIC,
             responses={200: {"content": {"text/html": {}},
                              "description": "Links to the docs, health and metrics."}})
    def landing() -> HTMLResponse:
        """This gateway: its version and where its docs, health and metrics are."""
        return HTMLResponse(page)

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_PREFIX}/{SWAGGER_JS}",
            swagger_css_url=f"{ASSETS_PREFIX}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{ASSETS_PREFIX}/{FAVICON}",
            # No badge that asks the public validator about the document.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_PREFIX}/{REDOC_JS}",
            redoc_favicon_url=f"{ASSETS_PREFIX}/{FAVICON}", with_google_fonts=False,
        )
