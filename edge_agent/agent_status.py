"""What a running agent shows of itself: the uploader's per-frame events counted into its
summary and telemetry, and the status line (frames/s, queue depth, last upload)."""

from __future__ import annotations

import logging
import time
from typing import Protocol, TextIO

from edge_agent.agent_config import AgentConfig, AgentSummary
from edge_agent.client import UploadOutcome
from edge_agent.heartbeat import TelemetryWindow
from edge_agent.outbox import Outbox
from edge_agent.uploader import UploadEvents


class RunningAgent(Protocol):
    """What these read and count of ``edge_agent.agent.EdgeAgent`` (a Protocol, so that this
    module need not import the agent that imports it)."""

    config: AgentConfig
    summary: AgentSummary | None
    telemetry: TelemetryWindow
    outbox: Outbox
    _last_upload_at: float | None
    _is_tty: bool
    _status_stream: TextIO


logger = logging.getLogger("edge_agent.agent")  # the agent's own log, as before the split


class AgentUploadEvents(UploadEvents):
    """The uploader's per-frame events into the agent's summary and telemetry."""

    def __init__(self, agent: RunningAgent) -> None:
        self.agent = agent

    def acknowledged(self, frame_id: str, duplicate: bool) -> None:
        a = self.agent
        a.telemetry.record_upload(True)
        a._last_upload_at = time.time()
        if a.summary is not None:
            a.summary.uploads_ok += 1
            a.summary.duplicates_absorbed += int(duplicate)

    def failed(self, frame_id: str, outcome: UploadOutcome) -> None:
        self.agent.telemetry.record_upload(False)
        if self.agent.summary is not None:
            self.agent.summary.upload_failures += 1

    def rejected(self, frame_id: str, reason: str) -> None:
        self.agent.telemetry.record_error()
        if self.agent.summary is not None:
            self.agent.summary.rejected += 1

    def unreadable(self, frame_id: str, error: str) -> None:
        self.agent.telemetry.record_error()


class StatusLine:
    """frames/s, queue depth and last upload on stderr: \\r-refreshed on a TTY, else logged."""

    def __init__(self, agent: RunningAgent, interval_s: float) -> None:
        self.agent = agent
        self.interval = interval_s
        self._last = time.monotonic()
        self._last_frames = 0
        self._printed = False

    def line(self) -> str:
        a, s = self.agent, self.agent.summary
        now = time.monotonic()
        frames = s.frames_processed if s else 0
        fps = (frames - self._last_frames) / max(now - self._last, 1e-6)
        self._last, self._last_frames = now, frames
        last = a._last_upload_at
        last_txt = "never" if last is None else f"{time.time() - last:.0f}s ago"
        return (
            f"[{a.config.camera_id}] {fps:5.1f} fps | frames {frames} | dropped "
            f"{a.telemetry.dropped_total} | sampled "
            f"{s.frames_sampled if s else 0} | outbox {a.outbox.depth()} | uploaded "
            f"{s.uploads_ok if s else 0} (last {last_txt}) | {a.telemetry.density_state}"
        )

    def maybe_print(self) -> None:
        if time.monotonic() - self._last < self.interval:
            return
        text = self.line()
        if self.agent._is_tty:
            self.agent._status_stream.write("\r\x1b[2K" + text)
            self.agent._status_stream.flush()
            self._printed = True
        else:
            logger.info("%s", text)

    def finish(self) -> None:
        if self._printed:
            self.agent._status_stream.write("\n")
            self.agent._status_stream.flush()


__all__ = ["AgentUploadEvents", "RunningAgent", "StatusLine"]
