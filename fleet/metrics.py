"""Prometheus metrics of the gateway: ``GET /metrics`` (``prometheus_client`` text format).

Three sources, every label set bounded:

* requests, counted by a pure ASGI middleware (``MetricsMiddleware``, outermost, so it also
  sees the limits' 413/429): method (known verbs, else ``OTHER``), route *template*
  (``/v1/cameras/{camera_id}/heartbeats``; a path no route matches is ``<unmatched>``) and
  status code; a latency histogram by method and route. Never a raw path, id or token. A
  client that went away before its body arrived is status ``499`` (``CLIENT_CLOSED``,
  nginx's "client closed request"): its own doing, not a 5xx the error-rate alerts count.
* intake counters bumped where the work is done (frames and bytes stored, traffic records),
  and the gateway's own event counters (``Gateway.stats``, names fixed in the code).
* fleet state read from the database at scrape time (``FleetCollector``): per live camera
  (one with an active, not revoked device: a camera in maintenance or retired has no
  per-camera series, so it does not alert) when the gateway last heard from it
  (``Device.last_seen_at``, the gateway's clock; kept when retention deletes heartbeats) and
  the fps, detector P50/P95 latency, outbox depth and problems of its latest heartbeat (latest
  as the gateway received them: ``latest_heartbeat``); devices by status; rollouts by status
  and the stage and health of the open ones. Per-camera series are bounded by the number of
  enrolled cameras, per-rollout series by the number of active or paused rollouts; drift
  series (``fleet.drift``) by the cameras times a fixed set of metric names; being read from
  the database, they are the same from any worker and survive a restart.

Access: with ``metrics_token`` set, ``/metrics`` needs ``Authorization: Bearer <token>``
(a scrape-only secret: Prometheus never holds a token that can write); without one it
answers loopback clients only (Prometheus on the gateway's host, or an SSH tunnel).
With ``--workers N`` (``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to an emptied folder before
the workers start), prometheus_client's multiprocess mode is on: each worker writes its
counters and histograms to its own files there, and a scrape, whichever worker answers it,
sums every worker's files (``MultiProcessCollector``), those of workers that exited included,
so totals never go backwards. The gateway's event counters follow (a ``Counter`` fed by
``Stats`` instead of ``EventsCollector``); the database-derived series are read at scrape time
as always. One ``GatewayMetrics`` per process in that mode (two would write the same files).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from fastapi import HTTPException, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.routing import compile_path

from fleet.db import (
    CameraDriftRow,
    Database,
    Device,
    DeviceStatus,
    HeartbeatRow,
    RolloutRow,
    RolloutStatus,
)

logger = logging.getLogger(__name__)

UNMATCHED = "<unmatched>"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds: the intake's own latency is a few ms; slow reads and model downloads reach seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OPEN_ROLLOUTS = (RolloutStatus.active.value, RolloutStatus.paused.value)
VERDICTS = ("pass", "fail", "insufficient")  # fleet.rollout_policy.StageHealth.verdict
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The status label of a request whose client disconnected before it was answered (nginx's
# 499): nothing was sent, and a dropped link is not a server error.
CLIENT_CLOSED = 499


def multiprocess_mode() -> bool:
    """Whether this process's metric values live in ``PROMETHEUS_MULTIPROC_DIR`` files:
    prometheus_client decides when it is first imported, from that variable."""
    return bool(os.environ.get(MULTIPROC_ENV)) and (
        prometheus_values.ValueClass is not prometheus_values.MutexValue)


def prepare_multiprocess_dir(default: os.PathLike[str] | str) -> str:
    """Before ``--workers N`` start: the folder in ``PROMETHEUS_MULTIPROC_DIR`` (``default``
    when unset), created and emptied of an earlier run's files, named in the environment the
    workers inherit. Returns the folder."""
    folder = os.environ.get(MULTIPROC_ENV) or os.fspath(default)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.unlink(os.path.join(folder, name))
    os.environ[MULTIPROC_ENV] = folder
    return folder


def method_label(method: str) -> str:
    """A request's method as a label: one of ``METHODS`` or ``OTHER`` (clients choose it)."""
    return method if method in METHODS else "OTHER"


def route_label(scope: dict[str, Any], templates: RouteTemplates | None = None) -> str:
    """The route template a request matched, or ``UNMATCHED``.

    FastAPI puts the matched route in the scope; a request refused by a middleware before
    routing has none, and its path is matched against ``templates`` (those requests only)."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    return templates.match(scope.get("path", "")) if templates is not None else UNMATCHED


class RouteTemplates:
    """Path templates compiled once (``/v1/cameras/{camera_id}/heartbeats``); ``match`` gives
    the first template a path fits, else ``UNMATCHED``."""

    def __init__(self, templates: Iterable[str]) -> None:
        self._compiled = [(compile_path(t)[0], t) for t in dict.fromkeys(templates)]

    @classmethod
    def of_app(cls, app: Any) -> RouteTemplates:
        """The app's OpenAPI paths (routers' prefixes included) and its other routes."""
        paths = list(app.openapi().get("paths", {}))
        paths += [r.path for r in app.routes if isinstance(getattr(r, "path", None), str)]
        return cls(paths)

    def match(self, path: str) -> str:
        for regex, template in self._compiled:
            if regex.match(path):
                return template
        return UNMATCHED


class GatewayMetrics:
    """The gateway's metrics, in a registry of its own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_mode()
        self._collectors: list[Collector] = []
        r = self.registry
        self.requests = Counter(
            "roadloop_gateway_requests", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "roadloop_gateway_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route template.",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.frames = Counter(
            "roadloop_gateway_intake_frames", "Frames stored (acknowledged 201).", registry=r)
        self.frame_bytes = Counter(
            "roadloop_gateway_intake_bytes", "JPEG bytes of the frames stored.", registry=r)
        self.traffic_records = Counter(
            "roadloop_gateway_traffic_records", "Traffic interval records stored.", registry=r)
        self.events = Counter(
            "roadloop_gateway_events", "Gateway event counters since start (Stats).",
            ["event"], registry=r) if self.multiprocess else None
        # (method, route, status) -> (counter child, histogram child): labels() costs a few
        # microseconds (a lock and a dict of tuples); this dict is bounded like the labels.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)),
                        self.latency.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def frame_stored(self, size: int) -> None:
        self.frames.inc()
        self.frame_bytes.inc(size)

    def count_event(self, name: str, n: int = 1) -> None:
        """``Stats.count``'s listener in multiprocess mode (names are fixed in the code)."""
        if self.events is not None:
            self.events.labels(name).inc(n)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)
        self._collectors.append(collector)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        # Every worker's counters and histograms from the files, plus the scrape-time ones.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry)


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by ``(method, route template, status)``.

    Per request: two ``perf_counter`` calls, one dict lookup, a counter increment and a
    histogram observation (a few microseconds; ``docs/monitoring.md`` has the measurement)."""

    def __init__(self, app: Any, metrics: GatewayMetrics,
                 templates: Callable[[], RouteTemplates]) -> None:
        self.app = app
        self.metrics = metrics
        self._templates = templates
        self._compiled: RouteTemplates | None = None

    def templates(self) -> RouteTemplates:
        if self._compiled is None:  # after start-up: every route is included by then
            self._compiled = self._templates()
        return self._compiled

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception with no response started is answered 500 by the server

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_label(scope, None if "route" in scope else self.templates())
            self.metrics.observe(method_label(scope.get("method", "")), route, status,
                                 time.perf_counter() - t0)


class EventsCollector(Collector):
    """``Gateway.stats`` counters (refusals, duplicates, decode waits...) as one family."""

    def __init__(self, counters: Callable[[], dict[str, int]]) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "roadloop_gateway_events", "Gateway event counters since start (Stats).",
            labels=["event"])
        for name, value in sorted(self.counters().items()):
            family.add_metric([name], value)
        yield family


# Heartbeat fields an agent sets while something keeps it from doing its job (edge_agent's
# heartbeat module): the configuration it refused (the previous one stays in force), the
# traffic geometry that does not fit its stream (counting off), redaction unavailable
# (sampled frames withheld), kinds its redaction cannot remove (frames uploaded with them
# unredacted: ``redaction_gaps``, e.g. ["plate"]).
CAMERA_PROBLEMS = ("config_error", "traffic_error", "redaction_error", "redaction_gap")
# A problem kind whose heartbeat field is named otherwise (default: the kind itself).
PROBLEM_FIELDS = {"redaction_gap": "redaction_gaps"}


def latest_heartbeat(session: Session, camera_id: str) -> HeartbeatRow | None:
    """The camera's heartbeat the gateway received last (``received_at``, then ``id``), or None.

    Not the greatest ``sent_at``: that is the agent's clock, and one heartbeat sent up to a day
    ahead (accepted: ``fleet.bounds.CLOCK_SKEW``) would stay "the latest" until that day came,
    freezing the camera's gauges. One lookup of ``ix_heartbeats_camera_received``."""
    return session.scalars(
        select(HeartbeatRow).where(HeartbeatRow.camera_id == camera_id)
        .order_by(HeartbeatRow.received_at.desc(), HeartbeatRow.id.desc()).limit(1)).first()


class FleetCollector(Collector):
    """Fleet state from the database, read at each scrape (one indexed query per live camera,
    ``latest_heartbeat``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must not fail because the database blinked
            logger.exception("fleet metrics could not be read from the database")
            up = GaugeMetricFamily("roadloop_fleet_metrics_up",
                                   "1 when the fleet state was read from the database.")
            up.add_metric([], 0)
            yield up

    def _collect(self) -> Iterator[Any]:
        last = GaugeMetricFamily(
            "roadloop_camera_last_heartbeat_timestamp_seconds",
            "When the gateway last heard from the camera (a heartbeat, frame or traffic "
            "record; the gateway's clock, Unix time); live cameras only.",
            labels=["camera_id"])
        fps = GaugeMetricFamily("roadloop_camera_fps", "Frames/s in the latest heartbeat.",
                                labels=["camera_id"])
        p95 = GaugeMetricFamily(
            "roadloop_camera_detector_latency_p95_seconds",
            "Detector P95 latency in the latest heartbeat.", labels=["camera_id"])
        p50 = GaugeMetricFamily(
            "roadloop_camera_detector_latency_p50_seconds",
            "Detector P50 latency in the latest heartbeat.", labels=["camera_id"])
        outbox = GaugeMetricFamily(
            "roadloop_camera_outbox_depth", "Frames queued on the agent (latest heartbeat).",
            labels=["camera_id"])
        problem = GaugeMetricFamily(
            "roadloop_camera_problem",
            "1 per problem the camera's latest heartbeat reports (CAMERA_PROBLEMS: a camera "
            "configuration it refused, a traffic geometry that does not fit its stream, "
            "redaction unavailable so nothing is uploaded, kinds its redaction cannot remove "
            "so frames show them unredacted); absent when there is none.",
            labels=["camera_id", "kind"])
        devices = GaugeMetricFamily("roadloop_devices", "Enrolled devices by status.",
                                    labels=["status"])
        rollouts = GaugeMetricFamily("roadloop_rollouts", "Rollouts by status.",
                                     labels=["status"])
        stage = GaugeMetricFamily(
            "roadloop_rollout_stage", "Stage index of an active or paused rollout.",
            labels=["rollout_id", "model_version", "status"])
        percent = GaugeMetricFamily(
            "roadloop_rollout_stage_percent", "Share of devices in the current stage's cohort.",
            labels=["rollout_id"])
        healthy = GaugeMetricFamily(
            "roadloop_rollout_stage_health",
            "1 on the verdict (pass, fail, insufficient) of the current stage's last health "
            "check, 0 on the others (absent before the first check).",
            labels=["rollout_id", "stage", "verdict"])
        drift_score = GaugeMetricFamily(
            "roadloop_camera_drift_score",
            "Drift score of the camera's latest reported window, by metric (docs/drift.md).",
            labels=["camera_id", "feature"])
        drifted = GaugeMetricFamily(
            "roadloop_camera_drifted",
            "1 when the camera's latest reported window drifted (minor or significant).",
            labels=["camera_id"])
        drift_end = GaugeMetricFamily(
            "roadloop_camera_drift_window_end_timestamp_seconds",
            "End of the camera's latest reported drift window (Unix time).",
            labels=["camera_id"])
        with self.db.read() as session:
            for status, n in session.execute(
                    select(Device.status, func.count()).group_by(Device.status)):
                devices.add_metric([str(status)], n)
            live: set[str] = set()  # cameras with an active, not revoked device
            heard: dict[str, datetime] = {}  # camera -> when any of its devices was last heard
            for camera_id, status, revoked_at, seen in session.execute(select(
                    Device.camera_id, Device.status, Device.revoked_at, Device.last_seen_at)):
                if status == DeviceStatus.active.value and revoked_at is None:
                    live.add(camera_id)
                if seen is not None and (camera_id not in heard or seen > heard[camera_id]):
                    heard[camera_id] = seen
            for camera_id in sorted(live):
                if camera_id not in heard:  # never heard from: no series (nothing to compare)
                    continue
                last.add_metric([camera_id], heard[camera_id].timestamp())
                row = latest_heartbeat(session, camera_id)
                if row is None:  # none yet, or retention deleted them
                    continue
                if row.fps is not None:
                    fps.add_metric([camera_id], row.fps)
                if row.latency_p95_ms is not None:
                    p95.add_metric([camera_id], row.latency_p95_ms / 1000.0)
                if row.latency_p50_ms is not None:
                    p50.add_metric([camera_id], row.latency_p50_ms / 1000.0)
                if row.outbox_depth is not None:
                    outbox.add_metric([camera_id], row.outbox_depth)
                payload = row.payload if isinstance(row.payload, dict) else {}
                for kind in CAMERA_PROBLEMS:
                    # {version, reason}, a message or a non-empty list; null/[] when none
                    if payload.get(PROBLEM_FIELDS.get(kind, kind)):
                        problem.add_metric([camera_id, kind], 1.0)
            counts = dict(session.execute(
                select(RolloutRow.status, func.count()).group_by(RolloutRow.status)).all())
            for status in RolloutStatus:
                rollouts.add_metric([status.value], counts.get(status.value, 0))
            for ro in session.scalars(
                    select(RolloutRow).where(RolloutRow.status.in_(OPEN_ROLLOUTS))):
                stage.add_metric([ro.rollout_id, ro.model_version, ro.status], ro.stage_index)
                current = ro.stages[ro.stage_index] if ro.stage_index < len(ro.stages) else {}
                if "percent" in current:
                    percent.add_metric([ro.rollout_id], float(current["percent"]))
                name = str(current.get("name", ""))
                checked = (ro.health or {}).get(name)
                verdict = checked.get("verdict") if isinstance(checked, dict) else None
                if verdict in VERDICTS:
                    for v in VERDICTS:
                        healthy.add_metric([ro.rollout_id, name, v], float(v == verdict))
            for report in session.scalars(select(CameraDriftRow)
                                          .order_by(CameraDriftRow.camera_id)):
                if report.camera_id not in live:  # in maintenance or retired: no alert
                    continue
                drifted.add_metric([report.camera_id], float(report.drifted))
                drift_end.add_metric([report.camera_id], report.window_end.timestamp())
                for feature, score in sorted(report.scores.items()):
                    drift_score.add_metric([report.camera_id, feature], float(score))
        up = GaugeMetricFamily("roadloop_fleet_metrics_up",
                               "1 when the fleet state was read from the database.")
        up.add_metric([], 1)
        yield from (last, fps, p95, p50, outbox, problem, devices, rollouts, stage, percent,
                    healthy, drift_score, drifted, drift_end, up)


# --------------------------------------------------------------------------- access
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in LOOPBACK)


def check_access(request: Request, token: str | None) -> None:
    """The ``/metrics`` access rule (module docstring); raises 401/403."""
    if token:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise HTTPException(401, "metrics need 'Authorization: Bearer <metrics token>' "
                                "(ROADLOOP_GATEWAY_METRICS_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        return
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise HTTPException(403, "metrics are served to loopback clients only; set "
                            "ROADLOOP_GATEWAY_METRICS_TOKEN to scrape from elsewhere")


def metrics_response(request: Request, metrics: GatewayMetrics, token: str | None) -> Response:
    check_access(request, token)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
