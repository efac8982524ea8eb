"""The bounds on reading one gateway answer (``edge_agent.client``, ``edge_agent.model_store``).

Every answer is read streamed, at most ``MAX_RESPONSE_BYTES`` of it (decoded) and within the
request's deadline (``DEADLINE_TIMEOUTS`` × ``timeout_s`` from the request's start, at least
``timeout_s`` after the last byte sent and after the headers arrive; httpx's own ``timeout_s``
bounds each connect, write and read): an answer over either is an unreadable answer
(``GatewayUnavailable``, so ``retry``). The deadline covers the whole answer, status line and
headers included: the client's transport cuts every network read to the time left
(``request_budget``, ``_DeadlineStream``), so a gateway trickling its headers a byte at a time
cannot hold the calling thread past it. That holds for every ``httpx.HTTPTransport`` the
client sends through: its default one, one passed in, and those of the proxies the
environment names (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``: honoured); another kind of
transport (a test's ``MockTransport``) meets the deadline between body chunks only. Model
downloads (``stream_model``) are the exception: their headers meet that deadline, their body
is the caller's to read and bound.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpcore
import httpx

from edge_agent.errors import GatewayUnavailable

logger = logging.getLogger(__name__)

# The most bytes of one answer the client reads (after Content-Encoding is undone, so a gzip
# bomb is bounded too). Real answers are a few KiB: the largest, a batch's ``results``, is one
# ``{"frame_id", "status", "detail"}`` entry per frame — a frame id (ID_PATTERN, < 200 chars) and
# a one-line error detail, well under 4 KiB an entry — for at most the gateway's
# ``max_batch_frames`` (32 by default, 1024 at most; the agent sends 64 at most): 1024 × 4 KiB
# = 4 MiB. A camera's configuration was itself accepted under the gateway's ``max_json_bytes``
# (1 MiB), and a signed manifest is ~1 KiB. So 4 MiB is above any real answer, and reading it
# is harmless on the device; anything longer is not the gateway's answer.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# The deadline of one request, in multiples of ``timeout_s`` from its start: connecting, sending
# and the first byte of the answer each take under ``timeout_s`` from a healthy gateway, and
# the answer's body (a few KiB) arrives with its headers, so a healthy request ends well inside
# ``timeout_s``; two leave room for a slow link without letting a byte-at-a-time answer (each
# read inside ``timeout_s``) hold the calling thread. Past it, the answer is dropped (retry).
# A request whose upload alone took longer (a large batch on a slow uplink) still gets
# ``timeout_s`` after its headers to read the answer, so such a batch is not retried forever.
DEADLINE_TIMEOUTS = 2.0


class AnswerTooLarge(GatewayUnavailable):
    """An answer longer than the cap: not the gateway's (or a broken one's); try again later."""


class AnswerTooSlow(GatewayUnavailable):
    """An answer still arriving at the request's deadline; try again later."""


def read_capped(resp: httpx.Response, limit: int = MAX_RESPONSE_BYTES,
                deadline: float | None = None) -> bytes:
    """The body of the streamed ``resp`` (decoded), read until ``limit`` bytes or the
    ``time.monotonic()`` ``deadline``; ``AnswerTooLarge`` / ``AnswerTooSlow`` past either
    (the rest is not read). Each read is bounded by the client's own timeout, so the deadline is
    overshot by at most one read. The caller closes ``resp``."""
    chunks: list[bytes] = []
    got = 0
    for chunk in resp.iter_bytes():
        got += len(chunk)
        if got > limit:
            raise AnswerTooLarge(f"answer {resp.status_code} longer than {limit} bytes: not read")
        chunks.append(chunk)
        if deadline is not None and time.monotonic() > deadline:
            raise AnswerTooSlow(f"answer {resp.status_code} still arriving at the request's "
                                f"deadline ({got} bytes read): dropped")
    return b"".join(chunks)


class _Budget:
    """The deadline (``time.monotonic()``) the network reads of one request must meet; each
    write that completes moves it to at least ``grace`` seconds later (a large upload on a
    slow uplink still gets ``timeout_s`` for its answer)."""

    __slots__ = ("deadline", "grace")

    def __init__(self, deadline: float, grace: float) -> None:
        self.deadline, self.grace = deadline, grace


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "edge_agent_request_budget", default=None)


@contextlib.contextmanager
def request_budget(deadline: float, grace: float = 0.0) -> Iterator[_Budget]:
    """Bound every network read (connect, the status line and headers, the body) that this
    thread makes through a ``GatewayClient``'s own transport by ``deadline`` (see
    ``_DeadlineStream``); past it a read raises ``AnswerTooSlow``. The budget may be moved
    (``budget.deadline = …``) while it is in force."""
    budget = _Budget(deadline, grace)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _left(timeout: float | None) -> tuple[float | None, bool]:
    """``timeout`` cut to the time left in this thread's budget; and whether the budget is
    what bounds it. ``AnswerTooSlow`` when none is left."""
    budget = _BUDGET.get()
    if budget is None:
        return timeout, False
    left = budget.deadline - time.monotonic()
    if left <= 0:
        raise AnswerTooSlow("answer still arriving at the request's deadline: dropped")
    if timeout is not None and timeout <= left:
        return timeout, False
    return left, True


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads meet the request's budget (``request_budget``): httpx's own
    timeout bounds each read only, so an answer — headers included — trickled a byte at a
    time would otherwise hold the calling thread for as long as the peer likes."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        bound, by_budget = _left(timeout)
        try:
            return self._inner.read(max_bytes, bound)
        except httpcore.ReadTimeout:
            if by_budget:
                raise AnswerTooSlow(
                    "answer still arriving at the request's deadline: dropped") from None
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)
        budget = _BUDGET.get()
        if budget is not None:
            budget.deadline = max(budget.deadline, time.monotonic() + budget.grace)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        bound, _ = _left(timeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bound))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with ``_DeadlineStream`` connections."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        bound, _ = _left(timeout)
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, bound, local_address=local_address, socket_options=socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        bound, _ = _left(timeout)
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, bound, socket_options=socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bound_transport(transport: httpx.BaseTransport | None) -> httpx.BaseTransport | None:
    """``transport`` with its connections bounded by the request's budget, when it is an
    ``httpx.HTTPTransport`` (direct, or through an HTTP or SOCKS proxy: its pool is httpcore's
    ``ConnectionPool``, ``HTTPProxy`` or ``SOCKSProxy``, each with a network backend). httpx
    has no public hook for the backend: the pool's is wrapped where httpcore 1.x keeps it
    (checked), else the transport stays as it is (each read bounded by ``timeout_s`` only, and
    ``read_capped``'s deadline for the body) and a warning says so. Another kind of transport
    (a test's ``MockTransport``) is returned as it is: its answer's body meets
    ``read_capped``'s deadline, one chunk at a time."""
    if not isinstance(transport, httpx.HTTPTransport):
        return transport
    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if isinstance(inner, _DeadlineBackend):
        return transport
    if isinstance(inner, httpcore.NetworkBackend):
        pool._network_backend = _DeadlineBackend(inner)  # type: ignore[union-attr]
    else:  # pragma: no cover - another httpcore
        logger.warning("httpcore without a network backend to wrap: a trickled answer's "
                       "headers are bounded per read only")
    return transport


class _BoundedClient(httpx.Client):
    """``httpx.Client`` whose every ``HTTPTransport`` — the one passed in, the default one,
    and those of the proxies the environment names (``HTTP(S)_PROXY``, ``ALL_PROXY``, minus
    ``NO_PROXY``) — meets the request's budget (``_bound_transport``). Passing a transport of
    our own to ``httpx.Client`` instead would switch the environment's proxies off (httpx
    honours them only when no transport is given): an agent behind a site proxy could not
    reach the gateway at all."""

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx.BaseTransport:
        return _bound_transport(super()._init_transport(*args, **kwargs))  # type: ignore[return-value]

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx.BaseTransport:
        return _bound_transport(  # type: ignore[return-value]
            super()._init_proxy_transport(*args, **kwargs))
