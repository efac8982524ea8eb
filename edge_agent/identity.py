"""The device identity: what enrollment returned (device id, access and refresh tokens, their
expiry), persisted in ``<state_dir>/identity.json`` with mode 0600, written atomically (temp
file + ``os.replace``, and a directory fsync), so a restarted agent keeps its identity and the
one-time enrollment token is needed once (``edge_agent.client`` enrolls and refreshes it)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_agent.errors import GatewayError
from edge_agent.fsutil import write_text_atomic

IDENTITY_FILE = "identity.json"


@dataclass
class DeviceIdentity:
    """What enrollment returned, persisted in the state dir (0600)."""

    device_id: str
    camera_id: str
    gateway_url: str
    access_token: str
    refresh_token: str
    expires_at: float  # unix time the access token expires
    scopes: list[str] = field(default_factory=list)
    enrolled_at: float = field(default_factory=time.time)
    gateway_public_key: str | None = None
    ttl_s: float = 3600.0  # lifetime of the access token as issued
    # Ed25519 key that signs model manifests (base64 raw), pinned at enrollment.
    model_public_key: str | None = None

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        target = state_dir / IDENTITY_FILE
        # sync_dir: the rename itself survives a power cut (a rotated refresh token that came
        # back as the previous one after a reboot would be reuse: the gateway revokes the device)
        write_text_atomic(target, json.dumps(asdict(self), indent=2), mode=0o600, sync_dir=True)
        return target

    @classmethod
    def load(cls, state_dir: Path) -> DeviceIdentity | None:
        path = state_dir / IDENTITY_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            ident = cls(**known)
            ident._check()
            return ident
        except (OSError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            raise GatewayError(
                f"{path}: unreadable device identity ({exc}); move it away and enroll again"
            ) from exc

    def _check(self) -> None:
        """``TypeError``/``ValueError`` naming the first field of a loaded identity that is not
        what ``save`` writes (a hand-edited or damaged file): used as it is, it would fail every
        request later as an "unreadable answer" (an ``expires_at`` string) or send a broken
        ``Authorization`` header (a ``null`` token)."""
        for name in ("device_id", "camera_id", "gateway_url", "access_token", "refresh_token"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} is not a non-empty string")
        for name in ("access_token", "refresh_token"):
            if not getattr(self, name).isascii() or not getattr(self, name).isprintable():
                raise ValueError(f"{name} is not printable ASCII")
        for name in ("expires_at", "enrolled_at", "ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise TypeError(f"{name} is not a finite number")
        if not self.ttl_s > 0:
            raise ValueError("ttl_s is not positive")
        if not isinstance(self.scopes, list) or not all(isinstance(x, str) for x in self.scopes):
            raise TypeError("scopes is not a list of strings")
        for name in ("gateway_public_key", "model_public_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is not a string")
