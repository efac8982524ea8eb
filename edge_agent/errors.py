"""Errors the edge agent raises on purpose (kept free of roadloop so the agent ships alone)."""

from __future__ import annotations

from pathlib import Path


class EdgeAgentError(Exception):
    """Base class of every deliberate edge-agent failure."""


class InvalidModelError(EdgeAgentError, ValueError):
    """A model file cannot serve as a detector; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UpdateRejected(EdgeAgentError):
    """A model update was refused (``edge_agent.updater``). ``status`` is ``rejected`` (the
    manifest or the file failed verification) or ``rolled_back`` (a verified model could not
    serve); ``key`` is what the refusal is remembered under (a model SHA-256 or
    ``manifest:<digest>``); ``permanent=False`` allows another try on a later poll."""

    def __init__(
        self,
        reason: str,
        *,
        status: str = "rejected",
        key: str | None = None,
        permanent: bool = True,
        rollout_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.key = key
        self.permanent = permanent
        self.rollout_id = rollout_id


class DownloadIncomplete(EdgeAgentError):
    """A model download stopped early (network, gateway busy); the next poll resumes it."""


class InvalidCameraConfig(EdgeAgentError, ValueError):
    """A camera configuration document the agent will not apply (``edge_agent.camera_config``):
    ``version`` is the document's, ``reason`` names the field and what is wrong with it."""

    def __init__(self, version: int | None, reason: str) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"camera configuration version {version}: {reason}")


# What a gateway call raises (``edge_agent.client``): ``RuntimeError``s, not ``EdgeAgentError``s.


class GatewayError(RuntimeError):
    """A gateway call failed in a way the caller must hear about (message says what to do)."""


class EnrollmentError(GatewayError):
    """Enrollment was refused (bad, used or expired token; wrong camera)."""


class AuthError(GatewayError):
    """The device cannot authenticate any more (refresh token revoked or expired)."""


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached or answered 5xx (or 408/425/429: not now); try again
    later, not before ``retry_after`` seconds when the gateway said so (``Retry-After``)."""

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
