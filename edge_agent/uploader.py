"""Drains due outbox frames into the gateway: one ``POST /v1/frames/batch`` when several are
due, ``POST /v1/frames`` for a lone frame (``docs/fleet-api.md`` "Batched frame uploads").

Every frame is settled on its own, whichever route carried it: acknowledged (201, or 409 =
already stored) → ``Outbox.ack``; refused for good → ``Outbox.reject``; a transient failure
→ ``Outbox.fail`` (backoff, at least the server's ``Retry-After`` up to
``outbox.MAX_RETRY_AFTER_S``, an hour), and the uploader pauses. Only the gateway's 201/409
acknowledge a frame and only its refusals (4xx) drop one: an answer outside the contract
(a redirect, a proxy's 200 page, a per-frame status such as 0 or 302) is a transient failure.

Version compatibility: a gateway without the batch route answers 404/405/415; the uploader
then sends frame by frame and tries the batch route again ``BATCH_ROUTE_RETRY_S`` (10 min)
later, logging the switch once. Batch bodies stay under ``batch_max_bytes`` (2 MiB by default);
a whole-request 413 — a gateway configured smaller, a proxy's body cap, or an older gateway
without the route, whose cap for routes it does not know is 1 MiB — halves that budget,
another refusal (422: more frames than its ``max_batch_frames``) halves ``batch_max``, and
the frames of that round go one by one. So an older gateway costs one refused batch: the
next, under 1 MiB, gets its 404 and the uploader goes frame by frame.

Fault injection (tests): with ``kill_after_acks`` = N the process SIGKILLs itself once the
gateway acknowledged its N-th frame, before the outbox forgets that frame.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence

from edge_agent.client import BatchOutcome, GatewayClient, UploadOutcome
from edge_agent.outbox import Outbox, OutboxItem

logger = logging.getLogger(__name__)

MAX_UPLOAD_LINGER_S = 3600.0  # holding sampled frames longer than an hour helps nobody
BATCH_ROUTE_RETRY_S = 600.0  # after a 404/405/415, frame by frame for this long
# A request costs the gateway 2-3 ms of CPU besides its frames' (the group commit, the HTTP
# exchange, the thread hand-offs), so a frame in a request of 32 -- the gateway's default
# ``max_batch_frames`` -- cost it 10 % less than in one of 16 (benchmarks/results/
# intake-1129-s21/). 32 frames of a 640-px camera (~46 KB each) fit the byte budget; a 1080p
# camera's (~150 KB) go ~13 to a request, and a batch on a slow uplink still gets
# ``timeout_s`` after its last byte.
DEFAULT_BATCH_MAX = 32
DEFAULT_BATCH_MAX_BYTES = 2 * 1024 * 1024
MIN_BATCH_BYTES = 64 * 1024  # a 413 never shrinks the budget below this
_ENTRY_OVERHEAD = 64  # manifest bytes per frame besides its metadata JSON


def linger_wait(items: Sequence[OutboxItem], batch_max: int, linger_s: float, now: float) -> float:
    """Seconds to hold ``items`` back so that more frames join their batch; 0: send now.

    A camera sampling 0.1 frame/s almost never has two frames due at once, so without a
    linger every frame is its own request (the gateway's costliest path). Held: fresh frames
    (never tried) while fewer than ``batch_max`` are due and the oldest waited less than
    ``linger_s``. A retry, a full batch or ``linger_s`` = 0 goes at once.
    """
    if linger_s <= 0 or not items or len(items) >= batch_max:
        return 0.0
    if any(item.attempts > 0 for item in items):
        return 0.0
    oldest = min(item.created_at for item in items)
    return max(0.0, oldest + linger_s - now)


class UploadEvents:
    """Per-frame notifications for the agent's counters and telemetry (no-ops here)."""

    def acknowledged(self, frame_id: str, duplicate: bool) -> None:
        """The gateway stored the frame (or already had it); the outbox forgot it."""

    def failed(self, frame_id: str, outcome: UploadOutcome) -> None:
        """A transient failure: the frame stays queued."""

    def rejected(self, frame_id: str, reason: str) -> None:
        """The gateway refused the frame for good: dropped from the outbox."""

    def unreadable(self, frame_id: str, error: str) -> None:
        """Its spool file cannot be read: dropped from the outbox."""


class FrameUploader:
    """Sends due outbox frames; ``upload`` returns the pause to take after a failure."""

    def __init__(
        self,
        client: GatewayClient,
        outbox: Outbox,
        *,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES,
        events: UploadEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        kill_after_acks: int = 0,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be >= 1 (1 disables batches), got {batch_max}")
        self.client = client
        self.outbox = outbox
        self.batch_max = batch_max
        self.batch_max_bytes = max(int(batch_max_bytes), MIN_BATCH_BYTES)
        self.events = events or UploadEvents()
        self.clock = clock
        self.kill_after_acks = kill_after_acks
        self.acks = 0  # frames acknowledged by the gateway in this process
        self.batches_sent = 0  # batch requests the gateway took (kind "results")
        self._batch_retry_at: float | None = None  # batch route unsupported until then
        self._fallback_logged = False
        self._consecutive = 0  # failed rounds in a row: the uploader's own backoff

    # ------------------------------------------------------------------ route choice
    @property
    def batch_route_usable(self) -> bool:
        if self.batch_max < 2:
            return False
        return self._batch_retry_at is None or self.clock() >= self._batch_retry_at

    def _chunks(self, items: Sequence[tuple[OutboxItem, bytes]]
                ) -> list[list[tuple[OutboxItem, bytes]]]:
        """Consecutive groups of at most ``batch_max`` frames and ``batch_max_bytes``."""
        chunks: list[list[tuple[OutboxItem, bytes]]] = []
        size = 0
        for item, data in items:
            cost = len(data) + len(json.dumps(item.metadata)) + _ENTRY_OVERHEAD
            if (not chunks or len(chunks[-1]) >= self.batch_max
                    or size + cost > self.batch_max_bytes):
                chunks.append([])
                size = 4
            chunks[-1].append((item, data))
            size += cost
        return chunks

    # ------------------------------------------------------------------ one round
    def upload(self, items: Sequence[OutboxItem], stop: Callable[[], bool] = lambda: False
               ) -> float | None:
        """Send ``items`` (due frames, in outbox order) and settle each one in the outbox.
        Returns the pause before the next round when a frame failed transiently (the rest of
        the round is left for later), else None."""
        loaded: list[tuple[OutboxItem, bytes]] = []
        for item in items:
            try:
                loaded.append((item, item.read_bytes()))
            except OSError as exc:
                self.outbox.reject(item.frame_id, f"spool file unreadable: {exc}")
                self.events.unreadable(item.frame_id, str(exc))
        for chunk in self._chunks(loaded):
            if stop():
                return None
            if len(chunk) > 1 and self.batch_route_usable:
                outcomes = self._send_batch(chunk)
            else:
                outcomes = None
            pause = (self._settle(chunk, outcomes) if outcomes is not None
                     else self._send_singly(chunk, stop))
            if pause is not None:
                return pause
        return None

    def _send_batch(self, chunk: list[tuple[OutboxItem, bytes]]) -> list[UploadOutcome] | None:
        """The per-frame outcomes of one batch request; None: send these frames one by one."""
        batch: BatchOutcome = self.client.upload_frames([(d, i.metadata) for i, d in chunk])
        if batch.kind in ("results", "retry"):
            if batch.kind == "results":
                self.batches_sent += 1
            return list(batch.results)
        if batch.kind == "unsupported":
            self._batch_retry_at = self.clock() + BATCH_ROUTE_RETRY_S
            log = logger.debug if self._fallback_logged else logger.warning
            log("the gateway has no batch route (%s on /v1/frames/batch): uploading frame by "
                "frame, trying batches again in %.0f min", batch.status_code,
                BATCH_ROUTE_RETRY_S / 60)
            self._fallback_logged = True
        elif batch.status_code == 413:
            self.batch_max_bytes = max(MIN_BATCH_BYTES, batch.body_bytes // 2)
            logger.warning("the gateway refused a %d-byte batch (413: %s): batches now stay "
                           "under %d bytes", batch.body_bytes, batch.detail[:200],
                           self.batch_max_bytes)
        else:  # e.g. 422: more frames than the gateway's max_batch_frames
            self.batch_max = max(2, min(self.batch_max, len(chunk) // 2))
            logger.warning("the gateway refused a batch of %d frames (%s: %s): sending them one "
                           "by one; batches now hold at most %d", len(chunk), batch.status_code,
                           batch.detail[:200], self.batch_max)
        return None

    def _send_singly(self, chunk: list[tuple[OutboxItem, bytes]],
                     stop: Callable[[], bool]) -> float | None:
        for item, data in chunk:
            if stop():
                return None
            pause = self._settle([(item, data)], [self.client.upload_frame(data, item.metadata)])
            if pause is not None:
                return pause
        return None

    # ------------------------------------------------------------------ settling
    def _settle(self, chunk: list[tuple[OutboxItem, bytes]],
                outcomes: list[UploadOutcome]) -> float | None:
        """Ack/reject/fail each frame; the uploader's pause if any frame must be retried."""
        retry: list[tuple[str, UploadOutcome]] = []
        for (item, _), outcome in zip(chunk, outcomes, strict=True):
            if outcome.acknowledged:
                self.acks += 1
                if self.kill_after_acks and self.acks >= self.kill_after_acks:
                    logger.warning("fault injection: SIGKILL after %d acks", self.acks)
                    os.kill(os.getpid(), signal.SIGKILL)
                duplicate = outcome.kind == "duplicate"
                self.outbox.ack(item.frame_id, duplicate=duplicate)
                self._consecutive = 0
                self.events.acknowledged(item.frame_id, duplicate)
                if duplicate:
                    logger.info("frame %s was already stored (409): acknowledged", item.frame_id)
            elif outcome.kind == "retry":
                self.outbox.fail(item.frame_id, outcome.detail, retry_after=outcome.retry_after)
                self.events.failed(item.frame_id, outcome)
                retry.append((item.frame_id, outcome))
            else:
                self._reject(item.frame_id, f"{outcome.status_code}: {outcome.detail}")
        if not retry:
            return None
        # The whole uploader backs off (a dead gateway fails every frame alike); each frame
        # is rescheduled by the outbox with its own attempt count.
        # Retry-After comes bounded (gateway_answers.parse_retry_after: outbox.MAX_RETRY_AFTER_S).
        retry_after = max((o.retry_after or 0.0 for _, o in retry), default=0.0)
        pause = max(self.outbox.backoff.delay(self._consecutive), retry_after)
        self._consecutive += 1
        frame_id, first = retry[0]
        logger.warning("upload of %s failed (%s %s); %d queued, retrying in %.1fs",
                       frame_id if len(retry) == 1 else f"{len(retry)} frames",
                       first.status_code or "network", first.detail[:200],
                       self.outbox.depth(), pause)
        return pause

    def _reject(self, frame_id: str, reason: str) -> None:
        self.outbox.reject(frame_id, reason)
        self.events.rejected(frame_id, reason)
