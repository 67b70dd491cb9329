"""Curve25519 node keys: the text forms Tailscale uses and the derper key file.

A node key is 32 raw bytes on the wire. People meet it as ``nodekey:<hex>`` (public) and
``privkey:<hex>`` (private); the Go derper keeps its private key in a JSON file
``{"PrivateKey": "privkey:..."}`` written with mode 0600. A key file we cannot read or parse is
an error the operator must see: we never overwrite it, because the key is the server's identity
and clients may have it pinned.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base

from ..disk.files import ensure_private_dir, write_atomic
from ..errors import ConfigError
from . import gojson

KEY_LEN = 32
PUBLIC_PREFIX = "nodekey:"
PRIVATE_PREFIX = "privkey:"
ZERO_KEY = bytes(KEY_LEN)


class KeyFormatError(ConfigError):
    """A key in text form (or a key file) is malformed."""


_HEX32 = re.compile(r"[0-9a-fA-F]{64}")


def parse_hex32(text: str, what: str) -> bytes:
    """Exactly 64 hex digits → 32 bytes (``bytes.fromhex`` alone would skip spaces)."""
    if not _HEX32.fullmatch(text):
        raise KeyFormatError(f"{what}: expected 64 hex digits")
    return bytes.fromhex(text)


def parse_public(text: str) -> bytes:
    """``nodekey:<64 hex>`` (any case) → 32 raw bytes."""
    text = text.strip()
    if text[: len(PUBLIC_PREFIX)].lower() != PUBLIC_PREFIX:
        raise KeyFormatError(f"public key must start with {PUBLIC_PREFIX!r}")
    return parse_hex32(text[len(PUBLIC_PREFIX):], "public key")


def parse_private(text: str) -> bytes:
    """``privkey:<64 hex>`` (any case) → 32 raw bytes."""
    text = text.strip()
    if text[: len(PRIVATE_PREFIX)].lower() != PRIVATE_PREFIX:
        raise KeyFormatError(f"private key must start with {PRIVATE_PREFIX!r}")
    return parse_hex32(text[len(PRIVATE_PREFIX):], "private key")


def parse_mesh_key(text: str) -> bytes:
    """A mesh pre-shared key: 64 hex digits, surrounding whitespace ignored."""
    return parse_hex32(text.strip(), "mesh key")


def public_text(raw: bytes) -> str:
    return PUBLIC_PREFIX + raw.hex()


def short(raw: bytes) -> str:
    """The ``[abcde]`` form Tailscale prints in logs, so log lines can be matched across tools."""
    return "[" + base64.b64encode(raw).decode()[:5] + "]"


def generate_private() -> bytes:
    """32 random bytes, clamped the way Go's key.NewNode does (X25519 clamps anyway)."""
    k = bytearray(secrets.token_bytes(KEY_LEN))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


@dataclass(frozen=True)
class KeyPair:
    """A node private key and its public half."""

    private: bytes

    @property
    def public(self) -> bytes:
        return _public_of(self.private)

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(generate_private())

    def private_text(self) -> str:
        return PRIVATE_PREFIX + self.private.hex()

    def __repr__(self) -> str:  # never print the private half
        return f"KeyPair(public={public_text(self.public)})"


_public_cache: dict[bytes, bytes] = {}


def _public_of(private: bytes) -> bytes:
    pub = _public_cache.get(private)
    if pub is None:
        pub = _public_cache[private] = crypto_scalarmult_base(private)
    return pub


class KeyFileError(ConfigError):
    """The server key file exists but cannot be used; the message says why and what to do."""


def load_or_create_key_file(path: Path) -> tuple[KeyPair, bool]:
    """Load the derper key file, or create it (mode 0600) if it does not exist.

    Returns the key pair and whether it was newly created.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create_key_file(path), True
    except OSError as e:
        raise KeyFileError(f"cannot read server key file {path}: {e.strerror}") from None
    return KeyPair(_parse_key_file(path, data)), False


def _parse_key_file(path: Path, data: bytes) -> bytes:
    hint = f"fix or remove {path} (removing it gives the server a new identity)"
    try:
        value = gojson.load_object(data).get("privatekey")
    except ValueError as e:
        raise KeyFileError(f"server key file {path} is {e}; {hint}") from None
    if not isinstance(value, str):
        raise KeyFileError(f'server key file {path} has no "PrivateKey" string; {hint}')
    try:
        return parse_private(value)
    except KeyFormatError as e:
        raise KeyFileError(f"server key file {path}: {e}; {hint}") from None


def _create_key_file(path: Path) -> KeyPair:
    pair = KeyPair.generate()
    body = json.dumps({"PrivateKey": pair.private_text()}, indent="\t").encode()
    try:
        ensure_private_dir(path.parent)
        # link() publishes the complete file atomically and fails if someone created it meanwhile,
        # so a crash can never leave a half-written key that we would then refuse to load.
        write_atomic(path, body, 0o600, replace=False)
    except OSError as e:
        raise KeyFileError(f"cannot create server key file {path}: {e.strerror}") from None
    return pair
