"""The agent's Prometheus endpoint (``roadloop-agent run --metrics-port N``).

Read at scrape time from what the agent already keeps (``TelemetryWindow`` totals, the
outboxes, the traffic stage), so the frame loop pays nothing beyond a bisect per frame for
the latency histogram. Every series carries one label, ``camera_id`` (one per agent).
The server listens on ``--metrics-host`` (default loopback) without authentication: bind it
to an address only the scraper reaches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from edge_agent.heartbeat import INFERENCE_BUCKETS_MS

logger = logging.getLogger(__name__)


class AgentCollector(Collector):
    """One agent's state as metrics; parts the agent has not built yet are left out."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        a = self.agent
        cam = [a.config.camera_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["camera_id"])
            g.add_metric(cam, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["camera_id"])
            c.add_metric(cam, value)
            return c

        t = getattr(a, "telemetry", None)
        if t is not None:
            yield counter("roadloop_agent_frames", "Frames the detector ran on.", t.frames_total)
            yield gauge("roadloop_agent_fps", "Frames/s in the current heartbeat window.",
                        t.window_fps())
            yield counter("roadloop_agent_errors", "Errors (detector, outbox, uploads).",
                          t.errors_total)
            yield counter("roadloop_agent_dropped_frames", "Frames the reader dropped.",
                          t.dropped_total)
            yield counter("roadloop_agent_uploads_ok", "Frames the gateway acknowledged.",
                          t.uploads_ok_total)
            yield counter("roadloop_agent_uploads_failed", "Upload attempts that failed.",
                          t.upload_failures_total)
            buckets, total = [], 0
            for bound, n in zip((*INFERENCE_BUCKETS_MS, float("inf")), list(t.inference_buckets),
                                strict=True):
                total += n
                buckets.append((str(bound / 1000.0) if bound != float("inf") else "+Inf", total))
            h = HistogramMetricFamily("roadloop_agent_detector_latency_seconds",
                                      "Detector inference time per frame.", labels=["camera_id"])
            h.add_metric(cam, buckets, t.inference_sum_ms / 1000.0)
            yield h
        outbox = getattr(a, "outbox", None)
        if outbox is not None:
            yield gauge("roadloop_agent_outbox_depth", "Frames queued for upload.", outbox.depth())
            yield gauge("roadloop_agent_outbox_bytes", "Bytes queued for upload.",
                        outbox.total_bytes())
        records = getattr(a, "records", None)
        if records is not None:
            yield gauge("roadloop_agent_record_outbox_depth", "Traffic records queued.",
                        records.depth())
        traffic = getattr(a, "traffic", None)
        if traffic is not None:
            yield counter("roadloop_agent_traffic_crossings", "Vehicles counted on lines.",
                          traffic.crossings_total)


class MetricsServer:
    """``prometheus_client``'s HTTP server on its own registry; ``close`` stops it."""

    def __init__(self, agent: Any, port: int, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(agent))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._server.server_port
        logger.info("agent metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
