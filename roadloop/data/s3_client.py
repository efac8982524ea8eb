"""The S3 client of the object frame store (``roadloop.data.object_frames``): its timeouts,
and what a botocore error means to the store (missing, a failed condition, or a failure the
gateway answers with 503 like a disk's)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# The S3 client's timeouts (docs/storage.md "Timeouts"). An agent gives up on an upload after
# 10 s (``edge_agent.agent_config.AgentConfig.http_timeout_s``); an upload is up to five
# requests in a row (HEAD record, PUT image, PUT record, and the read-back GET + HEAD; a few
# more when a JPEG is already there: ``S3FrameStore._put_image``), and a stalled store stalls
# the first of them, which then fails the upload. One stalled request
# costs at most ``max_attempts * (connect_s + read_s)`` plus the jittered backoff before the
# retry (< 1 s): a store that accepts connections and never answers costs 2 * 2 s + < 1 s,
# one that does not accept them 2 * 1 s + < 1 s, one that refuses them about the backoff, and
# even a connect that takes all of its second before a stall stays under 2 * 3 s + 1 s = 7 s,
# so the gateway answers 503 ("retry later") with 3 s or more to spare before the agent gives
# up (the upload's body and the rest of the request). 1 s to connect is 100 times an
# in-cluster or same-region connect (a lost SYN is retransmitted after 1 s: that attempt
# fails, the retry connects); 2 s for the first byte of an answer is 10 times an S3 PUT or
# GET of a frame in its slow tail, and one slow answer is retried.
DEFAULT_CONNECT_TIMEOUT_S = 1.0
DEFAULT_READ_TIMEOUT_S = 2.0
DEFAULT_MAX_ATTEMPTS = 2  # the first try and one retry (botocore's total_max_attempts)


@dataclass(frozen=True)
class S3Timeouts:
    """The S3 client's connect and read timeouts (seconds) and its attempts per request
    (standard retry mode: the first try included)."""

    connect_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_s: float = DEFAULT_READ_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not (self.connect_s > 0 and self.read_s > 0 and self.max_attempts >= 1):
            raise ValueError(f"S3 timeouts must be positive and attempts >= 1: {self}")

    def client_config(self) -> Any:
        """The ``botocore.config.Config`` of these timeouts."""
        from botocore.config import Config

        # total_max_attempts, not max_attempts: botocore's client-config max_attempts counts
        # the retries only (2 would be 3 attempts).
        return Config(connect_timeout=self.connect_s, read_timeout=self.read_s,
                      retries={"total_max_attempts": self.max_attempts, "mode": "standard"})


def error_code(exc: Exception) -> str:
    """The error code of a botocore ``ClientError`` ("" for anything else: a timeout or a
    connection error has no answer, its ``response`` is None)."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def is_missing(exc: Exception) -> bool:
    """True when a botocore ``ClientError`` says the object is not there."""
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


def is_conflict(exc: Exception) -> bool:
    """True when a botocore ``ClientError`` says a conditional PUT's condition failed (412),
    or that a conflicting conditional write was in progress (S3's 409)."""
    return error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


@contextmanager
def as_os_error(what: str) -> Iterator[None]:
    """Object-store failures (network, 5xx, denied) as ``OSError``, as a disk's would be:
    the gateway answers 503 ("retry later") for both."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise OSError(errno.EIO, f"object store {what} failed: {exc}") from exc
