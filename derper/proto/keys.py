"""Curve25519 node keys and the text forms Tailscale uses for them.

A node key is 32 raw bytes on the wire. People meet it as ``nodekey:<hex>`` (public) and
``privkey:<hex>`` (private); the key file that holds the server's is ``disk/keyfile.py``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from nacl.bindings import crypto_scalarmult_base

from ..errors import ConfigError

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
    public: bytes = field(init=False, compare=False)  # derived once, here

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", crypto_scalarmult_base(self.private))

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(generate_private())

    def private_text(self) -> str:
        return PRIVATE_PREFIX + self.private.hex()

    def __repr__(self) -> str:  # never print the private half
        return f"KeyPair(public={public_text(self.public)})"
