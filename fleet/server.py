"""The gateway's HTTP server: uvicorn with the bounds it lacks on headers and on time.

uvicorn (0.49, httptools) has no limit on header size, no deadline for a request's
headers, and none for a body nobody reads: a client that connects and sends half a
request line — or one byte every few seconds, each of which cancels the keep-alive timer —
holds its connection forever, and hundreds of such clients hold hundreds. No ASGI code
runs before headers are complete, so these bounds live in the protocol:
``BoundedHttpToolsProtocol`` (a subclass of uvicorn's) answers

* 431 and closes when the request line + headers pass ``max_header_bytes``;
* 408 and closes when they are not complete ``header_timeout_s`` after the connection
  opened or the request's first byte arrived (later bytes do not extend it);
* closes a connection whose answer went out while its body was still arriving, when the
  rest has not arrived ``body_idle_timeout_s`` later (the drain of an unread body).

A body the application reads is bounded by ``fleet.ratelimit.BodyReadDeadline``;
``keep_alive_timeout_s`` and ``limit_concurrency`` are uvicorn's own settings.
"""

from __future__ import annotations

import json
import logging
import resource
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from fleet.config import GatewaySettings

logger = logging.getLogger(__name__)

PROTOCOL_PATH = "fleet.server:BoundedHttpToolsProtocol"


@dataclass(frozen=True)
class ServerBounds:
    max_header_bytes: int
    header_timeout_s: float
    drain_timeout_s: float

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ServerBounds:
        return cls(settings.max_header_bytes, settings.header_timeout_s,
                   settings.body_idle_timeout_s)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus header size, header time and drain time bounds.

    ``bounds`` is set on a subclass by ``protocol_class``; this class itself (named by
    import path for ``--workers N``, whose processes import it) reads them from the
    environment's ``GatewaySettings`` once per process.
    """

    bounds: ClassVar[ServerBounds | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls.bounds is None:
            cls.bounds = ServerBounds.from_settings(GatewaySettings())
        self._bounds = cls.bounds
        self._awaiting_headers = True  # the next bytes belong to a request's head
        self._message_complete = True  # the current request's body has fully arrived
        self._header_bytes = 0
        self._messages_begun = 0
        self._refusal: tuple[int, str] | None = None
        self._header_timer: TimerHandle | None = None
        self._drain_timer: TimerHandle | None = None

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, with refusals answered by their own status.
        self._unset_keepalive_if_required()
        inside_head = self._awaiting_headers
        begun = self._messages_begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(*self._refusal)
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        if self.transport.is_closing() or not self._awaiting_headers:
            return
        # Still inside a head. A chunk that began inside this same head is all head bytes;
        # one that began it (after the end of an earlier request, maybe) is not counted —
        # at most one read (256 KiB) — and the head is measured exactly when complete.
        if inside_head and self._messages_begun == begun:
            self._header_bytes += len(data)
            if self._header_bytes > self._bounds.max_header_bytes:
                self._refuse(431, self._too_large())
                return
        self._arm_header_timer()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self._message_complete = False
        self._messages_begun += 1
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self._bounds.max_header_bytes:
            self._refusal = (431, self._too_large())
            raise _Refused
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._message_complete = True
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._message_complete and not self.transport.is_closing():
            # Answered before its body arrived (a 401 does not read it): drain it, briefly.
            self._drain_timer = self.loop.call_later(
                self._bounds.drain_timeout_s, self._drain_expired)

    # ------------------------------------------------------------------ timers
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self._bounds.header_timeout_s, self._header_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _header_expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_header_timer()  # a pipelined head waits on the answer before it
            return
        self._refuse(408, f"request headers did not arrive within "
                          f"{self._bounds.header_timeout_s:g} s")

    def _drain_expired(self) -> None:
        self._drain_timer = None
        if not self._message_complete and not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ answers
    def _too_large(self) -> str:
        return (f"request line and headers are larger than "
                f"{self._bounds.max_header_bytes} bytes")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` (JSON ``detail``) and close — or only close, when an earlier
        answer on this connection is still being written."""
        self._cancel_timers()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps({"detail": detail}).encode()
            self.transport.write(b"".join([
                STATUS_LINE[status],
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]))
        self.transport.close()


def protocol_class(settings: GatewaySettings) -> type[BoundedHttpToolsProtocol]:
    """The protocol with these settings' bounds (one process; ``--workers N`` names
    ``PROTOCOL_PATH`` instead, which reads them from the environment)."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"bounds": ServerBounds.from_settings(settings)})


def uvicorn_options(settings: GatewaySettings, *, importable: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` that apply the bounds."""
    return {
        "http": PROTOCOL_PATH if importable else protocol_class(settings),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.limit_concurrency,
        "h11_max_incomplete_event_size": settings.max_header_bytes,  # if run with h11
    }


def raise_open_files_limit(needed: int) -> None:
    """Lift the soft file-descriptor limit towards ``needed`` (never above the hard one), so
    ``limit_concurrency`` connections can be open at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit to %d: %s", target, exc)
