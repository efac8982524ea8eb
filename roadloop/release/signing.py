"""Ed25519 signing of model manifests (``docs/fleet-api.md`` → "Model rollouts").

The platform owns one signing key, created on first use at ``<home>/keys/model-signing.key``
(PKCS8 PEM, mode 0600) with the public key beside it (``model-signing.pub``: the raw 32
bytes as base64 on one line). The gateway and the agents hold only the public key.

Canonical bytes of a manifest: ``json.dumps(manifest_without_signature, sort_keys=True,
separators=(",", ":"), ensure_ascii=False).encode("utf-8")``; ``signature`` is the base64
Ed25519 signature over those bytes and ``key_id`` (signed too) the first 16 hex digits of
the SHA-256 of the raw public key. ``edge_agent/updater.py`` implements the same form
independently (the agent cannot import ``roadloop``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from roadloop.errors import InvalidInputError
from roadloop.fsutil import sha256_file
from roadloop.settings import get_settings

logger = logging.getLogger(__name__)

KEY_FILE = "model-signing.key"
PUBLIC_KEY_FILE = "model-signing.pub"
MANIFEST_VERSION = 1
MANIFEST_FORMATS = ("onnx-int8", "onnx-fp32")
REQUIRED_FIELDS = (
    "manifest_version", "model_version", "rollout_id", "file", "sha256", "size", "input_size",
    "class_names", "format", "created_at", "key_id",
)
_CHUNK = 1 << 20


class SignatureError(ValueError):
    """A manifest is unsigned, malformed, signed by another key, or its signature is wrong."""


# --------------------------------------------------------------------------- keys
def default_key_dir() -> Path:
    return get_settings().home / "keys"


def _write_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` atomically unless it exists; True when this call made it.

    Written to a temp file (``mode`` from the start, fsynced), then hard-linked into place:
    ``link`` fails when the target exists, so two first runs never overwrite each other's key
    and nobody ever sees a half-written file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public_key(key)).decode("ascii")


def key_id(public_key: Ed25519PrivateKey | Ed25519PublicKey | bytes | str) -> str:
    """First 16 hex digits of SHA-256 of the raw 32-byte public key."""
    if isinstance(public_key, str):
        raw = _decode_public_key(public_key)
    elif isinstance(public_key, bytes):
        raw = public_key
    else:
        raw = raw_public_key(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_or_create_signing_key(key_dir: Path | None = None) -> Ed25519PrivateKey:
    """The platform's signing key, created (0600) with its ``.pub`` on first use."""
    key_dir = Path(key_dir or default_key_dir())
    key_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = key_dir / KEY_FILE, key_dir / PUBLIC_KEY_FILE
    if not key_path.exists():
        new = Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        if _write_exclusive(key_path, pem, 0o600):
            logger.info("created model signing key %s (key id %s)", key_path, key_id(new))
    key = load_signing_key(key_path)
    expected = (public_key_b64(key) + "\n").encode("ascii")
    if not pub_path.exists() or pub_path.read_bytes() != expected:
        tmp = pub_path.with_name(f".{pub_path.name}.{secrets.token_hex(6)}.tmp")
        tmp.write_bytes(expected)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pub_path)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise InvalidInputError(path, "signing key not found") from None
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(path, f"not a PKCS8 PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(path, f"expected an Ed25519 key, got {type(key).__name__}")
    return key


def _decode_public_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"public key is not base64 ({exc})") from exc
    if len(raw) != 32:
        raise ValueError(f"public key must be 32 raw bytes, got {len(raw)}")
    return raw


def load_public_key(path: Path) -> str:
    """The base64 public key from a ``.pub`` file (validated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise InvalidInputError(path, "public key file not found") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(path, "public key file is not base64 text") from exc
    try:
        _decode_public_key(text)
    except ValueError as exc:
        raise InvalidInputError(path, str(exc)) from exc
    return text


# --------------------------------------------------------------------------- manifests
def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: every field except ``signature``, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """Identity of a signed manifest: SHA-256 of its canonical JSON *with* the signature."""
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def new_rollout_id() -> str:
    return f"ro-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(4)}"


def build_manifest(
    model_version: str,
    onnx_path: Path,
    input_size: int,
    class_names: list[str],
    rollout_id: str | None = None,
    fmt: str = "onnx-int8",
) -> dict[str, Any]:
    """An unsigned manifest for ``onnx_path`` (``sign_manifest`` adds key_id + signature)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InvalidInputError(onnx_path, "model file not found")
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"format {fmt!r} unknown; use one of {MANIFEST_FORMATS}")
    if int(input_size) <= 0:
        raise ValueError(f"input_size must be > 0, got {input_size}")
    if not class_names or not all(isinstance(c, str) and c for c in class_names):
        raise ValueError("class_names must be a non-empty list of names")
    return {
        "manifest_version": MANIFEST_VERSION,
        "model_version": str(model_version),
        "rollout_id": rollout_id or new_rollout_id(),
        "file": onnx_path.name,
        "sha256": sha256_file(onnx_path),
        "size": onnx_path.stat().st_size,
        "input_size": int(input_size),
        "class_names": list(class_names),
        "format": fmt,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``manifest`` with ``key_id`` set and ``signature`` over the canonical bytes."""
    signed = {k: v for k, v in manifest.items() if k != "signature"}
    signed["key_id"] = key_id(key)
    signed["signature"] = base64.b64encode(key.sign(canonical_bytes(signed))).decode("ascii")
    return signed


def verify_manifest(manifest: dict[str, Any], public_key: str | bytes) -> None:
    """Raise ``SignatureError`` unless ``manifest`` is complete and signed by ``public_key``
    (base64 text or raw bytes)."""
    if not isinstance(manifest, dict):
        raise SignatureError("manifest is not a JSON object")
    missing = [f for f in (*REQUIRED_FIELDS, "signature") if f not in manifest]
    if missing:
        raise SignatureError(f"manifest lacks field(s): {', '.join(missing)}")
    try:
        raw = _decode_public_key(public_key) if isinstance(public_key, str) else public_key
        pub = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SignatureError(f"public key unusable: {exc}") from exc
    if manifest["key_id"] != key_id(raw):
        raise SignatureError(
            f"manifest signed by key {manifest['key_id']}, not by the trusted key {key_id(raw)}"
        )
    try:
        sig = base64.b64decode(str(manifest["signature"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"signature is not base64 ({exc})") from exc
    try:
        pub.verify(sig, canonical_bytes(manifest))
    except InvalidSignature:
        raise SignatureError("signature does not verify: manifest altered or forged") from None
