"""The camera's configuration on the agent: pulled, checked, applied while running, kept.

The gateway holds one document per camera (``docs/fleet-api.md``, "Camera configuration").
Its model lives in the gateway, which the agent may not import, so the checks are repeated
here in plain Python. ``CameraConfigChannel``:

* ``poll(client)`` — on the heartbeat thread, after each heartbeat:
  ``GET /v1/cameras/{camera_id}/config`` with ``If-None-Match`` (an unchanged config is a 304).
* ``apply(answer)`` — checks the document. Sections this agent does not know (a newer
  gateway's) and unknown keys of a known section are ignored, each
  logged once, so an older agent survives a newer document; an invalid value in a known
  section rejects the whole document: the last good one stays in force and heartbeats carry
  ``config_error`` until a later document applies.
* ``traffic`` (counting lines, zones, homography) is checked by
  ``edge_agent.traffic.geometry.parse_traffic_section`` — the gateway's own check — so a line
  outside the image or a degenerate homography is refused here too and the last good
  geometry keeps counting.
* The document in force is an immutable ``AppliedConfig``, replaced in one assignment. The
  frame loop asks ``effective_sampling()`` once per frame and resizes its own sampler
  (``FramePipeline``), so the sampler is only ever touched by the frame loop's thread.
* Boost: while the channel's clock (injectable) is before ``boost.until``, the base rate is
  multiplied by ``factor`` (capped at 1) and so is the hourly budget; afterwards the
  configured rates apply again by themselves, with no new document.
* ``privacy.mode`` (``blur`` | ``mask`` | ``off``): how the agent redacts people, faces and
  plates in sampled frames (``edge_agent.redaction``); absent: ``blur``. A change is logged
  as a WARNING (``old → new``: redaction switched off remotely leaves a trace at the edge)
  and heartbeats carry the mode in force (``privacy_mode``).
* ``boost.until`` lies in [2000-01-01, 2100-01-01) UTC, the gateway's own bound
  (``fleet.bounds.Timestamp``); a later time (``9999-12-31T23:59:59-14:00`` is year 10000 in
  UTC, which ``datetime`` cannot hold) is a bad document like any other. The gateway's
  "at most 30 days after its clock" is not repeated: it is judged on the gateway's clock, and
  a kept boost must still load after a long outage (an expired boost simply ends).
* A document that cannot be kept as JSON (a NaN or infinity anywhere, even in a section this
  agent ignores: the client's ``resp.json()`` accepts them, ``_save`` does not) is refused
  like a bad value, so what is in force is always what a restart brings back.
* Values the document leaves out keep the agent's own (its command line).
* ``<state_dir>/camera_config.json`` holds the document in force (atomic write); it is loaded
  at start, so a restarted camera keeps its configuration before the gateway answers.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import InvalidCameraConfig
from edge_agent.fsutil import write_text_atomic
from edge_agent.traffic.geometry import TrafficConfig, parse_traffic_section

if TYPE_CHECKING:
    from edge_agent.client import GatewayClient

logger = logging.getLogger(__name__)

CONFIG_FILE = "camera_config.json"
MAX_BOOST_FACTOR = 20.0
MAX_HOURLY_BUDGET = 100_000.0
MAX_BOOST_REASON = 200
MAX_NOTES = 1000
_SECTIONS = {"sampling", "notes", "traffic", "privacy"}
_PRIVACY_KEYS = {"mode"}
PRIVACY_MODES = ("blur", "mask", "off")  # edge_agent.redaction.MODES
DEFAULT_PRIVACY_MODE = "blur"
_SAMPLING_KEYS = {"base_rate", "hourly_budget", "boost"}
_BOOST_KEYS = {"factor", "until", "reason"}
# ``boost.until`` bounds: the gateway's (``fleet.bounds.EARLIEST``/``LATEST``), far inside
# what ``datetime`` can convert to UTC and back.
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2100, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SamplingBoost:
    factor: float
    until: float  # unix time
    reason: str

    @property
    def until_iso(self) -> str:
        return datetime.fromtimestamp(self.until, UTC).isoformat()


@dataclass(frozen=True)
class AppliedConfig:
    """A checked document (version 0: none). ``document`` is kept as received, for the file."""

    version: int = 0
    sha256: str | None = None
    etag: str | None = None
    base_rate: float | None = None
    hourly_budget: float | None = None
    boost: SamplingBoost | None = None
    notes: str | None = None
    traffic: TrafficConfig | None = None  # lines, zones, homography (edge_agent.traffic)
    privacy_mode: str | None = None  # blur | mask | off (edge_agent.redaction); None: default
    document: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EffectiveSampling:
    """The sampling in force at one moment."""

    base_rate: float
    hourly_budget: float | None
    boost_until: str | None  # ISO 8601 while a boost is in force, else None


# --------------------------------------------------------------------------- checks
# Every check raises ValueError (a wrong JSON type is a bad document, like a bad value): one
# kind of refusal, turned into InvalidCameraConfig by parse_config.
def _number(value: Any, where: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}"[:200])  # noqa: TRY004
    try:
        v = float(value)
    except OverflowError:  # an integer beyond any float: out of range like infinity
        v = math.inf
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValueError(f"{where} must be {low} and <= {hi:g}, got {value!r}")
    return v


def _text(value: Any, where: str, max_len: int, *, min_len: int = 0) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise ValueError(f"{where} must be a string of {min_len}-{max_len} characters")
    return value


def _aware_time(value: Any, where: str) -> float:
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004
            f"{where} must be an ISO 8601 time with a time zone, got {value!r}"[:200])
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{where} is not an ISO 8601 time: {value!r}"[:200]) from None
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{where} must carry a time zone (e.g. 'Z'), got {value!r}")
    # Aware comparisons subtract offsets without building a datetime: they cannot overflow.
    if not EARLIEST_TIME <= at < LATEST_TIME:
        raise ValueError(f"{where} must be from {EARLIEST_TIME.date().isoformat()} to before "
                         f"{LATEST_TIME.date().isoformat()} UTC, got {value!r}"[:200])
    return at.timestamp()


def _storable(doc: Mapping[str, Any]) -> None:
    """The document can be kept as strict JSON (``_save``), ignored sections included."""
    try:
        json.dumps(doc, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"config cannot be kept as JSON: {exc}"[:200]) from None


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, got {type(value).__name__}")  # noqa: TRY004
    return value


def parse_config(answer: Mapping[str, Any], *, etag: str | None = None,
                 ignored: list[str] | None = None) -> AppliedConfig:
    """The gateway's answer (``{version, sha256, config, ...}``) checked into an
    ``AppliedConfig``; raises ``InvalidCameraConfig`` naming the first bad field. Keys this
    agent does not know are appended to ``ignored`` (dotted paths) and otherwise skipped."""
    raw_version = answer.get("version") if isinstance(answer, Mapping) else None
    version = raw_version if isinstance(raw_version, int) and not isinstance(
        raw_version, bool) else None
    skipped = ignored if ignored is not None else []
    try:
        if version is None or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {raw_version!r}")
        sha = answer.get("sha256")
        if sha is not None and not isinstance(sha, str):
            raise ValueError("sha256 must be a string")
        doc = _object(answer.get("config", {}), "config")
        skipped.extend(sorted(k for k in doc if k not in _SECTIONS))
        notes = doc.get("notes")
        if notes is not None:
            notes = _text(notes, "notes", MAX_NOTES)
        traffic = (parse_traffic_section(doc["traffic"]) if doc.get("traffic") is not None
                   else None)
        privacy_mode = None
        privacy = doc.get("privacy")
        if privacy is not None:
            privacy = _object(privacy, "privacy")
            skipped.extend(f"privacy.{k}" for k in sorted(privacy) if k not in _PRIVACY_KEYS)
            mode = privacy.get("mode")
            if mode is not None and mode not in PRIVACY_MODES:
                raise ValueError(f"privacy.mode must be one of {PRIVACY_MODES}, got {mode!r}")
            privacy_mode = mode
        base_rate = hourly_budget = boost = None
        sampling = doc.get("sampling")
        if sampling is not None:
            sampling = _object(sampling, "sampling")
            skipped.extend(f"sampling.{k}" for k in sorted(sampling) if k not in _SAMPLING_KEYS)
            if sampling.get("base_rate") is not None:
                base_rate = _number(sampling["base_rate"], "sampling.base_rate", 0.0, 1.0)
            if sampling.get("hourly_budget") is not None:
                hourly_budget = _number(sampling["hourly_budget"], "sampling.hourly_budget",
                                        0.0, MAX_HOURLY_BUDGET, lo_open=True)
            if sampling.get("boost") is not None:
                b = _object(sampling["boost"], "sampling.boost")
                skipped.extend(f"sampling.boost.{k}" for k in sorted(b) if k not in _BOOST_KEYS)
                boost = SamplingBoost(
                    factor=_number(b.get("factor"), "sampling.boost.factor", 1.0,
                                   MAX_BOOST_FACTOR),
                    until=_aware_time(b.get("until"), "sampling.boost.until"),
                    reason=_text(b.get("reason"), "sampling.boost.reason", MAX_BOOST_REASON,
                                 min_len=1),
                )
        _storable(doc)  # last: a bad value in a known section is named by its own check
    except ValueError as exc:
        raise InvalidCameraConfig(version, str(exc)) from None
    return AppliedConfig(version=version, sha256=sha, etag=etag, base_rate=base_rate,
                         hourly_budget=hourly_budget, boost=boost, notes=notes,
                         traffic=traffic, privacy_mode=privacy_mode, document=dict(doc))


# --------------------------------------------------------------------------- the channel
class CameraConfigChannel:
    """The camera's configuration in force on this agent (see the module docstring).

    Thread model: ``poll``/``apply``/``load`` run on one thread (the heartbeat thread) and
    are serialised by a lock; ``effective_sampling`` and ``heartbeat_fields`` may be called
    from any thread — they read the ``AppliedConfig`` reference once."""

    def __init__(
        self,
        camera_id: str,
        state_dir: Path | str,
        *,
        base_rate: float,
        hourly_budget: float | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.camera_id = camera_id
        self.path = Path(state_dir) / CONFIG_FILE
        self.default_base_rate = base_rate
        self.default_hourly_budget = hourly_budget
        self.clock = clock
        self._applied = AppliedConfig()
        self._error: dict[str, Any] | None = None
        self._seen_etag: str | None = None  # the last document answered, applied or not
        self._ignored: set[str] = set()
        self._lock = threading.Lock()

    @property
    def applied(self) -> AppliedConfig:
        return self._applied

    @property
    def error(self) -> dict[str, Any] | None:
        return self._error

    # ---- in force
    def effective_sampling(self, now: float | None = None) -> EffectiveSampling:
        cfg = self._applied
        base = self.default_base_rate if cfg.base_rate is None else cfg.base_rate
        budget = self.default_hourly_budget if cfg.hourly_budget is None else cfg.hourly_budget
        boost = cfg.boost
        if boost is not None and (self.clock() if now is None else now) < boost.until:
            return EffectiveSampling(
                min(1.0, base * boost.factor),
                None if budget is None else budget * boost.factor,
                boost.until_iso,
            )
        return EffectiveSampling(base, budget, None)

    def privacy_mode(self) -> str:
        """The redaction method in force: the document's, else ``blur`` (on by default)."""
        return self._applied.privacy_mode or DEFAULT_PRIVACY_MODE

    def traffic_geometry(self) -> tuple[TrafficConfig | None, int]:
        """The traffic geometry in force and its configuration version."""
        cfg = self._applied
        return cfg.traffic, cfg.version

    def heartbeat_fields(self, now: float | None = None) -> dict[str, Any]:
        """``config_version``, ``config_error``, the sampling and the privacy mode in force
        (``Heartbeat``)."""
        eff = self.effective_sampling(now)
        return {
            "config_version": self._applied.version,
            "config_error": dict(self._error) if self._error else None,
            "sampling_base_rate": eff.base_rate,
            "sampling_hourly_budget": eff.hourly_budget,
            "sampling_boost_until": eff.boost_until,
            "privacy_mode": self.privacy_mode(),
        }

    def _log_privacy_change(self, old: AppliedConfig, new: AppliedConfig, how: str) -> None:
        """A WARNING whenever the redaction mode changes: switching redaction off (or on) is
        done remotely, and the edge must keep a trace of it."""
        before = old.privacy_mode or DEFAULT_PRIVACY_MODE
        after = new.privacy_mode or DEFAULT_PRIVACY_MODE
        if before != after:
            logger.warning("camera %s: privacy mode %s → %s (configuration version %d, %s)%s",
                           self.camera_id, before, after, new.version, how,
                           ": sampled frames are uploaded UNREDACTED" if after == "off" else "")

    # ---- changes
    def apply(self, answer: Mapping[str, Any], etag: str | None = None) -> bool:
        """Check and put a gateway answer in force; False (and ``config_error``) when it is
        rejected — the document in force stays."""
        with self._lock:
            self._seen_etag = etag
            ignored: list[str] = []
            try:
                if isinstance(answer, Mapping) and answer.get("camera_id") not in (
                        None, self.camera_id):
                    raise InvalidCameraConfig(
                        None, f"the document is for camera {answer.get('camera_id')!r}, "
                        f"not {self.camera_id!r}")
                new = parse_config(answer, etag=etag, ignored=ignored)
            except InvalidCameraConfig as exc:
                self._error = {"version": exc.version, "reason": exc.reason}
                logger.error("camera configuration rejected, version %s stays in force: %s",
                             self._applied.version, exc)
                return False
            for key in ignored:
                if key not in self._ignored:
                    self._ignored.add(key)
                    logger.warning("camera configuration: %r is unknown to this agent; "
                                   "ignored", key)
            old, self._applied, self._error = self._applied, new, None
            self._log_privacy_change(old, new, "from the gateway")
            if (new.version, new.sha256, new.etag) != (old.version, old.sha256, old.etag):
                self._save(new)
            if (new.version, new.sha256) != (old.version, old.sha256):
                eff = self.effective_sampling()
                logger.info("camera configuration version %d in force (was %d): base rate "
                            "%g, hourly budget %s%s", new.version, old.version, eff.base_rate,
                            eff.hourly_budget, f", boosted until {eff.boost_until}"
                            if eff.boost_until else "")
            return True

    def poll(self, client: GatewayClient) -> bool:
        """One conditional GET; True when a new answer came (applied or rejected). Raises
        ``GatewayError``/``GatewayUnavailable`` as the client does."""
        result = client.get_camera_config(self._seen_etag or self._applied.etag)
        if not result.changed or result.body is None:
            return False
        self.apply(result.body, result.etag)
        return True

    # ---- the state file
    def _save(self, cfg: AppliedConfig) -> None:
        data = {"version": cfg.version, "sha256": cfg.sha256, "etag": cfg.etag,
                "camera_id": self.camera_id, "config": dict(cfg.document),
                "saved_at": datetime.now(UTC).isoformat()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(data, indent=2, allow_nan=False),
                              sync_dir=True)
        except (OSError, ValueError, TypeError) as exc:  # the config still applies; a restart
            # falls back to the gateway (parse_config already refused what JSON cannot keep)
            logger.error("cannot keep the camera configuration in %s: %s", self.path, exc)

    def load(self) -> bool:
        """Put the document kept in the state dir in force (False when there is none or it is
        unusable: logged, and the gateway's answer replaces it)."""
        if not self.path.is_file():
            return False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004
            etag = data.get("etag") if isinstance(data.get("etag"), str) else None
            new = parse_config(data, etag=etag)
            if data.get("camera_id") not in (None, self.camera_id):
                raise ValueError(f"it is camera {data.get('camera_id')!r}'s")
        except (OSError, ValueError) as exc:
            logger.error("ignoring the kept camera configuration %s: %s", self.path, exc)
            return False
        with self._lock:
            old, self._applied = self._applied, new
        logger.info("camera configuration version %d restored from %s", new.version, self.path)
        self._log_privacy_change(old, new, f"restored from {self.path}")
        return True


__all__ = [
    "CONFIG_FILE",
    "AppliedConfig",
    "CameraConfigChannel",
    "EffectiveSampling",
    "SamplingBoost",
    "parse_config",
]
