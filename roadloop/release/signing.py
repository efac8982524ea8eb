"""The platform's side of model-manifest signing (``docs/fleet-api.md`` → "Model rollouts"):
the signing key, building a manifest for a model file, signing it.

The platform owns one signing key, created on first use at ``<home>/keys/model-signing.key``
(PKCS8 PEM, mode 0600) with the public key beside it (``model-signing.pub``: the raw 32
bytes as base64 on one line). The gateway and the agents hold only the public key.

The manifest format itself — canonical bytes, key id, public-key decoding, identities,
verification — has one implementation, ``edge_agent.manifest``, shared with the agents (the
agent imports nothing of the platform, so it lives there); it is re-exported here under the
platform's names (``canonical_bytes``, ``key_id``, ``manifest_sha256``, ``verify_manifest``,
``SignatureError``). ``load_public_key`` here reads a ``.pub`` file the platform's way
(base64 text, ``InvalidInputError`` naming the file).
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.manifest import (
    MANIFEST_FORMATS,
    MANIFEST_VERSION,
    REQUIRED_FIELDS,
    ModelManifest,
    PublicKeyError,
    canonical_bytes,
    decode_public_key,
    key_id,
    manifest_sha256,
    raw_public_key,
    verify_manifest,
)
from edge_agent.manifest import ManifestError as SignatureError
from roadloop.errors import InvalidInputError
from roadloop.fsutil import create_exclusive, sha256_file, write_bytes_atomic
from roadloop.settings import get_settings

logger = logging.getLogger(__name__)

KEY_FILE = "model-signing.key"
PUBLIC_KEY_FILE = "model-signing.pub"


# --------------------------------------------------------------------------- keys
def default_key_dir() -> Path:
    return get_settings().home / "keys"


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public_key(key)).decode("ascii")


def load_or_create_signing_key(key_dir: Path | None = None) -> Ed25519PrivateKey:
    """The platform's signing key, created (0600) with its ``.pub`` on first use."""
    key_dir = Path(key_dir or default_key_dir())
    key_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = key_dir / KEY_FILE, key_dir / PUBLIC_KEY_FILE
    if not key_path.exists():
        new = Ed25519PrivateKey.generate()
        pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        if create_exclusive(key_path, pem, mode=0o600):
            logger.info("created model signing key %s (key id %s)", key_path, key_id(new))
    key = load_signing_key(key_path)
    expected = (public_key_b64(key) + "\n").encode("ascii")
    if not pub_path.exists() or pub_path.read_bytes() != expected:
        write_bytes_atomic(pub_path, expected, mode=0o644)
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


def load_public_key(path: Path) -> str:
    """The base64 public key from a ``.pub`` file, validated (``InvalidInputError`` names the
    file). The agent's ``edge_agent.manifest.load_public_key`` also takes PEM and returns the
    raw bytes; the gateway keeps and hands out the base64 text."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise InvalidInputError(path, "public key file not found") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(path, "public key file is not base64 text") from exc
    try:
        decode_public_key(text)
    except PublicKeyError as exc:
        raise InvalidInputError(path, str(exc)) from exc
    return text


# --------------------------------------------------------------------------- manifests
def check_manifest_fields(manifest: Mapping[str, Any]) -> None:
    """Raise ``SignatureError`` unless the fields an agent acts on are well formed (input
    shape and variants included): what the gateway checks before it publishes.

    The manifest's own file must be square (``input_shape`` absent or ``[n, n]``): it is what
    a camera of unknown frame size gets and what every older agent serves (they ignore
    ``input_shape``/``variants``). A rectangle goes in ``variants``. (The agent's parser
    still accepts such a manifest: what older gateways published stays servable.)"""
    m = ModelManifest.parse(manifest)
    if m.input_shape is not None and m.input_shape[0] != m.input_shape[1]:
        raise SignatureError(_not_square(m.input_shape))


def _not_square(shape: Any) -> str:
    h, w = (int(v) for v in shape)
    return (
        f"manifest input_shape [{h}, {w}] is not square: the manifest's own file is the "
        "square fallback (cameras of unknown frame size, older agents); publish the square "
        f"file as the main one and {h}x{w} as a variant"
    )


def new_rollout_id() -> str:
    return f"ro-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(4)}"


def build_manifest(
    model_version: str,
    onnx_path: Path,
    input_size: int,
    class_names: list[str],
    rollout_id: str | None = None,
    fmt: str = "onnx-int8",
    *,
    input_shape: tuple[int, int] | None = None,
    variants: Mapping[tuple[int, int], Path] | None = None,
    expected_sha256: str | None = None,
    expected_variant_sha256: Mapping[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """An unsigned manifest for ``onnx_path`` (``sign_manifest`` adds key_id + signature).

    ``input_shape`` is ``onnx_path``'s ``(h, w)`` (long side ``input_size``); ``variants`` maps
    other ``(h, w)`` shapes to their files of the same model, each recorded with its SHA-256
    and size (``edge_agent.manifest``: the signature covers them).

    ``expected_sha256`` (and ``expected_variant_sha256``, then one per variant shape): the
    SHA-256 the file had when it was made and evaluated; a file whose hash differs is refused
    (``InvalidInputError``). The hash compared is the one written into the manifest, so
    nothing can change the file between the check and the hashing."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InvalidInputError(onnx_path, "model file not found")
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"format {fmt!r} unknown; use one of {MANIFEST_FORMATS}")
    if int(input_size) <= 0:
        raise ValueError(f"input_size must be > 0, got {input_size}")
    if not class_names or not all(isinstance(c, str) and c for c in class_names):
        raise ValueError("class_names must be a non-empty list of names")
    extra: dict[str, Any] = {}
    if input_shape is not None:
        hw = [int(v) for v in input_shape]
        if len(hw) != 2 or min(hw) <= 0 or max(hw) != int(input_size):
            raise ValueError(f"input_shape {input_shape} must be (h, w) with long side {input_size}")
        if hw[0] != hw[1]:
            raise ValueError(_not_square(hw))
        extra["input_shape"] = hw
    if variants:
        extra["variants"] = []
        for shape, path in variants.items():
            path = Path(path)
            if not path.is_file():
                raise InvalidInputError(path, "model file not found")
            hw = [int(v) for v in shape]
            if len(hw) != 2 or min(hw) <= 0 or hw == extra.get("input_shape"):
                raise ValueError(f"variant shape {shape} must be a new (h, w)")
            want = None
            if expected_variant_sha256 is not None:
                if shape not in expected_variant_sha256:
                    raise ValueError(f"variant shape {shape} has no expected SHA-256")
                want = expected_variant_sha256[shape]
            extra["variants"].append({"input_shape": hw, "file": path.name,
                                      "sha256": _hash_checked(path, want),
                                      "size": path.stat().st_size})
    return {
        **extra,
        "manifest_version": MANIFEST_VERSION,
        "model_version": str(model_version),
        "rollout_id": rollout_id or new_rollout_id(),
        "file": onnx_path.name,
        "sha256": _hash_checked(onnx_path, expected_sha256),
        "size": onnx_path.stat().st_size,
        "input_size": int(input_size),
        "class_names": list(class_names),
        "format": fmt,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }


def _hash_checked(path: Path, expected: str | None) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected.lower():
        raise InvalidInputError(path, f"SHA-256 {digest} is not the expected {expected}: the "
                                      "file changed since it was made")
    return digest


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``manifest`` with ``key_id`` set and ``signature`` over the canonical bytes."""
    signed = {k: v for k, v in manifest.items() if k != "signature"}
    signed["key_id"] = key_id(key)
    signed["signature"] = base64.b64encode(key.sign(canonical_bytes(signed))).decode("ascii")
    return signed


__all__ = [
    "KEY_FILE",
    "MANIFEST_FORMATS",
    "MANIFEST_VERSION",
    "PUBLIC_KEY_FILE",
    "REQUIRED_FIELDS",
    "SignatureError",
    "build_manifest",
    "canonical_bytes",
    "check_manifest_fields",
    "default_key_dir",
    "key_id",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "manifest_sha256",
    "new_rollout_id",
    "public_key_b64",
    "raw_public_key",
    "sign_manifest",
    "verify_manifest",
]
