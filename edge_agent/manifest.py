"""The signed model manifest: its format, its identities and its verification — the one
implementation of the contract in ``docs/fleet-api.md`` ("Model rollouts").

Three parties use it: the platform signs (``roadloop/release/signing.py`` builds the fields, holds the
private key and imports everything else from here), the gateway checks a manifest before it
publishes it (``verify_manifest``), and the agent checks every manifest it is assigned against
its pinned key before it downloads anything (``ManifestVerifier``). This module lives on the
edge side because the agent may import nothing of the platform; the platform may import it.

The format:

* Fields: ``manifest_version`` (``MANIFEST_VERSION``), ``model_version``, ``rollout_id``,
  ``file``, ``sha256`` (64 lowercase hex digits of the model file), ``size`` (bytes),
  ``input_size``, ``class_names``, ``format`` (``MANIFEST_FORMATS``), ``created_at``,
  ``key_id`` and ``signature``.
* Optional (older manifests lack them; the signature covers them when present):
  ``input_shape`` (``[h, w]`` of the model file above; ``input_size`` is its long side) and
  ``variants`` — the same model exported at other input shapes, each
  ``{"input_shape": [h, w], "file", "sha256", "size"}``. The gateway tells each device which
  shape fits its camera (``assignment.input_shape``); the agent takes that variant from the
  verified manifest (``ModelManifest.for_shape``). An agent that ignores both serves the top-level
  file, as before.
* Canonical bytes (what is signed, ``canonical_bytes``): every field except ``signature``,
  ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in UTF-8.
* ``signature``: the base64 Ed25519 signature over the canonical bytes.
* ``key_id`` (signed too, ``key_id``): the first 16 hex digits of the SHA-256 of the raw
  32-byte public key.
* The public key travels as the raw 32 bytes in base64 on one line (``model-signing.pub``);
  the agent also reads a PEM public key (``load_public_key``).

Two identities of a signed manifest: ``manifest_sha256`` (SHA-256 of the canonical JSON of the
whole manifest, signature included: the gateway's primary key for a published manifest) and
``manifest_digest`` (16 hex digits over the canonical bytes and the signature: what the agent
remembers a refused manifest under in ``updater.json``).

How strict: ``verify_manifest`` (the gateway, at publish) requires every field of
``REQUIRED_FIELDS``; ``ManifestVerifier`` (the agent) requires the signature and then checks the
fields it acts on (``ModelManifest.parse``). Both refuse with ``ManifestError`` and use
``verify_signature`` for the signature itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import EdgeAgentError

MANIFEST_VERSION = 1
MANIFEST_FORMATS = ("onnx-int8", "onnx-fp32")
REQUIRED_FIELDS = (
    "manifest_version", "model_version", "rollout_id", "file", "sha256", "size", "input_size",
    "class_names", "format", "created_at", "key_id",
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- errors
class PublicKeyError(EdgeAgentError, ValueError):
    """A model public key is unusable (the message names where it came from)."""


class ManifestError(EdgeAgentError, ValueError):
    """A manifest is unsigned, signed by another key, altered after signing, or malformed.

    ``reason`` says which. When the manifest was a JSON object, ``digest`` is its
    ``manifest_digest`` and ``rollout_id`` its rollout (if it names one), so a caller can
    remember the refusal. (The platform calls this ``roadloop.release.signing.SignatureError``.)
    """

    def __init__(
        self, reason: str, *, digest: str | None = None, rollout_id: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.digest = digest
        self.rollout_id = rollout_id


def _unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON's ``"\\ud800"`` decodes to a lone surrogate,
    which no UTF-8 file, log line or signature can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refusal(manifest: Mapping[str, Any]) -> Callable[[str], ManifestError]:
    """A ``ManifestError`` factory that names ``manifest``."""
    digest = manifest_digest(manifest)
    rid = manifest.get("rollout_id")
    rid = rid if isinstance(rid, str) and _unicode(rid) else None

    def bad(reason: str) -> ManifestError:
        return ManifestError(reason, digest=digest, rollout_id=rid)

    return bad


# --------------------------------------------------------------------------- canonical form
def _canonical_json(obj: Mapping[str, Any], errors: str = "strict") -> bytes:
    return json.dumps(
        dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8", errors)


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a manifest's signature covers: every field except ``signature``, sorted keys,
    no whitespace, UTF-8."""
    return _canonical_json({k: v for k, v in manifest.items() if k != "signature"})


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """Identity of a signed manifest: SHA-256 of its canonical JSON *with* the signature."""
    return hashlib.sha256(_canonical_json(manifest)).hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """A short id of one signed manifest (canonical bytes + signature), 16 hex digits.

    Defined for any decoded JSON object, also one holding a lone surrogate (which has no
    canonical bytes: its surrogates are taken as such), so such a refusal is remembered too;
    for every other manifest the bytes are the canonical ones."""
    body = _canonical_json(
        {k: v for k, v in manifest.items() if k != "signature"}, "surrogatepass")
    sig = str(manifest.get("signature", "")).encode("utf-8", "surrogatepass")
    return hashlib.sha256(body + b"|" + sig).hexdigest()[:16]


# --------------------------------------------------------------------------- public keys
def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of an Ed25519 public key (of a private key: its public half)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def decode_public_key(text: str) -> bytes:
    """The raw 32-byte key from its text form (base64 of the raw bytes, one line)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PublicKeyError(f"not base64 of a raw Ed25519 key ({exc})") from exc
    if len(raw) != 32:
        raise PublicKeyError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return raw


def load_public_key(value: str | Path) -> bytes:
    """The raw 32-byte Ed25519 key from base64 text, a file holding it (``model-signing.pub``)
    or a PEM public key (text or file)."""
    text = str(value).strip()
    where = "the model public key"
    try:
        path = Path(text).expanduser()
        is_file = len(text) < 4096 and path.is_file()
    except (OSError, ValueError):
        is_file = False
    if is_file:
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PublicKeyError(f"{path}: cannot read the model public key ({exc})") from exc
        where = str(path)
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise PublicKeyError(f"{where}: not a PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise PublicKeyError(f"{where}: not an Ed25519 key ({type(key).__name__})")
        return raw_public_key(key)
    try:
        return decode_public_key(text)
    except PublicKeyError as exc:
        hint = "" if is_file else " (give the base64 text, a PEM key or a file holding one)"
        raise PublicKeyError(f"{where}: {exc}{hint}") from exc


def key_id(public_key: Ed25519PrivateKey | Ed25519PublicKey | bytes | str) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key (given as a key, its
    raw bytes or their base64 text)."""
    if isinstance(public_key, str):
        raw = decode_public_key(public_key)
    elif isinstance(public_key, bytes):
        raw = public_key
    else:
        raw = raw_public_key(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


# --------------------------------------------------------------------------- verification
def verify_signature(manifest: Mapping[str, Any], public_key: Ed25519PublicKey) -> None:
    """Raise ``ManifestError`` unless ``manifest`` carries ``public_key``'s key id and a
    signature by that key over its canonical bytes."""
    bad = _refusal(manifest)
    try:  # first, so that no text of such a manifest reaches a reason, a log or a state file
        signed = canonical_bytes(manifest)
        str(manifest.get("signature", "")).encode("utf-8")
    except UnicodeEncodeError:
        raise bad(
            "manifest holds text that is not valid Unicode (a lone surrogate such as "
            "\\ud800): it has no canonical UTF-8 form, so no signature can cover it"
        ) from None
    trusted = key_id(public_key)
    sig = manifest.get("signature")
    kid = manifest.get("key_id")
    if not isinstance(sig, str) or not sig:
        raise bad("manifest has no signature")
    if not isinstance(kid, str) or not kid:
        raise bad("manifest has no key_id")
    if kid != trusted:
        raise bad(f"manifest signed by another key: key_id {kid}, not by the trusted key {trusted}")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise bad("manifest signature is not base64") from None
    try:
        public_key.verify(signature, signed)
    except InvalidSignature:
        raise bad(
            f"bad manifest signature: it does not verify against the trusted key {trusted} "
            "(altered after signing, or forged)"
        ) from None


def verify_manifest(manifest: Any, public_key: str | bytes) -> None:
    """Raise ``ManifestError`` unless ``manifest`` has every field of ``REQUIRED_FIELDS`` and is
    signed by ``public_key`` (base64 text or raw bytes) — the gateway's check at publish."""
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"manifest is not a JSON object ({type(manifest).__name__})")
    missing = [f for f in (*REQUIRED_FIELDS, "signature") if f not in manifest]
    if missing:
        raise _refusal(manifest)(f"manifest lacks field(s): {', '.join(missing)}")
    try:
        raw = decode_public_key(public_key) if isinstance(public_key, str) else public_key
        pub = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ManifestError(f"public key unusable: {exc}") from exc
    verify_signature(manifest, pub)


def _shape(value: Any) -> tuple[int, int] | None:
    """``[h, w]`` of positive ints as a tuple, else None."""
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


@dataclass(frozen=True)
class ModelVariant:
    """One more input shape of the manifest's model: its own file."""

    input_shape: tuple[int, int]
    file: str
    sha256: str
    size: int


def _parse_variants(raw: Any, bad: Callable[[str], ManifestError]) -> tuple[ModelVariant, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise bad("manifest variants is not a list")
    out = []
    for i, v in enumerate(raw):
        if not isinstance(v, Mapping):
            raise bad(f"manifest variants[{i}] is not an object")
        hw, sha, size = _shape(v.get("input_shape")), v.get("sha256"), v.get("size")
        if hw is None:
            raise bad(f"manifest variants[{i}].input_shape {v.get('input_shape')!r} is not [h, w]")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise bad(f"manifest variants[{i}].sha256 is not 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise bad(f"manifest variants[{i}].size {size!r} is not a positive integer")
        out.append(ModelVariant(hw, str(v.get("file") or ""), sha, size))
    return tuple(out)


@dataclass(frozen=True)
class ModelManifest:
    """A verified manifest, its fields checked (see the module docstring for the fields)."""

    model_version: str
    sha256: str
    size: int
    input_size: int
    class_names: tuple[str, ...]
    key_id: str
    rollout_id: str | None = None
    file: str = ""
    format: str = ""
    created_at: str = ""
    input_shape: tuple[int, int] | None = None  # [h, w]; None: square input_size (old format)
    variants: tuple[ModelVariant, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def short(self) -> str:
        return f"model_version {self.model_version} (sha256 {self.sha256[:12]}…)"

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_shape or (self.input_size, self.input_size)

    def for_shape(self, shape: Any) -> ModelManifest:
        """This manifest with the file of the variant whose input is ``shape`` ([h, w]); itself
        when ``shape`` is None, its own shape, or not among the signed variants."""
        hw = _shape(shape)
        if hw is None or hw == self.input_hw:
            return self
        for v in self.variants:
            if v.input_shape == hw:
                return replace(
                    self, sha256=v.sha256, size=v.size, file=v.file, input_shape=hw,
                    input_size=max(hw),
                )
        return self

    @classmethod
    def parse(cls, m: Mapping[str, Any]) -> ModelManifest:
        """The fields the agent acts on, checked; ``ManifestError`` names the first bad one.
        (It does not check the signature: ``ManifestVerifier.verify`` does both.)"""
        bad = _refusal(m)
        if m.get("manifest_version") != MANIFEST_VERSION:
            raise bad(f"unsupported manifest_version {m.get('manifest_version')!r}")
        sha = m.get("sha256")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise bad(f"manifest sha256 {sha!r} is not 64 lowercase hex digits")
        size, imgsz = m.get("size"), m.get("input_size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise bad(f"manifest size {size!r} is not a positive integer")
        if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz <= 0:
            raise bad(f"manifest input_size {imgsz!r} is not a positive integer")
        names = m.get("class_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad("manifest class_names is not a list of strings")
        version = m.get("model_version")
        if not isinstance(version, (str, int)) or isinstance(version, bool) or version == "":
            raise bad(f"manifest model_version {version!r} is missing")
        shape = m.get("input_shape")
        hw = _shape(shape)
        if shape is not None and (hw is None or max(hw) != imgsz):
            raise bad(f"manifest input_shape {shape!r} is not [h, w] with long side {imgsz}")
        variants = _parse_variants(m.get("variants"), bad)
        rid = m.get("rollout_id")
        return cls(
            model_version=str(version),
            sha256=sha,
            size=size,
            input_size=imgsz,
            class_names=tuple(names),
            key_id=str(m["key_id"]),
            rollout_id=str(rid) if rid is not None else None,
            file=str(m.get("file") or ""),
            format=str(m.get("format") or ""),
            created_at=str(m.get("created_at") or ""),
            input_shape=hw,
            variants=variants,
            raw=dict(m),
        )


class ManifestVerifier:
    """Checks manifests against one pinned Ed25519 public key (the agent's side)."""

    def __init__(self, public_key: bytes | str | Path) -> None:
        raw = public_key if isinstance(public_key, bytes) else load_public_key(public_key)
        if len(raw) != 32:
            raise PublicKeyError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
        self.raw = raw
        self.key_id = key_id(raw)
        self._key = Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, manifest: Any) -> ModelManifest:
        """The parsed manifest, or ``ManifestError`` saying what is wrong with it."""
        if not isinstance(manifest, Mapping):
            raise ManifestError(f"manifest is not a JSON object ({type(manifest).__name__})")
        verify_signature(manifest, self._key)
        return ModelManifest.parse(manifest)


__all__ = [
    "MANIFEST_FORMATS",
    "MANIFEST_VERSION",
    "REQUIRED_FIELDS",
    "ManifestError",
    "ManifestVerifier",
    "ModelManifest",
    "ModelVariant",
    "PublicKeyError",
    "canonical_bytes",
    "decode_public_key",
    "key_id",
    "load_public_key",
    "manifest_digest",
    "manifest_sha256",
    "raw_public_key",
    "verify_manifest",
    "verify_signature",
]
