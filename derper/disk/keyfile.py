"""The server key file: the Go derper's ``{"PrivateKey": "privkey:..."}``, mode 0600.

A key file we cannot read or parse is an error the operator must see: we never overwrite it,
because the key is the server's identity and clients may have it pinned.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..proto import gojson
from ..proto.keys import KeyFormatError, KeyPair, parse_private
from .files import ensure_private_dir, write_atomic


class KeyFileError(ConfigError):
    """The server key file exists but cannot be used; the message says why and what to do."""


def load_or_create_key_file(path: Path) -> tuple[KeyPair, bool]:
    """Load the derper key file, or create it (mode 0600) if it does not exist.

    Returns the key pair and whether it was newly created.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        try:
            return _create_key_file(path), True
        except FileExistsError as e:
            # Another process (a second derper, a worker) created it first: its key is ours.
            try:
                data = path.read_bytes()
            except OSError:
                raise KeyFileError(f"cannot create server key file {path}: "
                                   f"{e.strerror}") from e
    except OSError as e:
        raise KeyFileError(f"cannot read server key file {path}: {e.strerror}") from e
    return KeyPair(_parse_key_file(path, data)), False


def _parse_key_file(path: Path, data: bytes) -> bytes:
    hint = f"fix or remove {path} (removing it gives the server a new identity)"
    try:
        value = gojson.load_object(data).get("privatekey")
    except ValueError as e:
        raise KeyFileError(f"server key file {path} is {e}; {hint}") from e
    if not isinstance(value, str):
        raise KeyFileError(f'server key file {path} has no "PrivateKey" string; {hint}')
    try:
        return parse_private(value)
    except KeyFormatError as e:
        raise KeyFileError(f"server key file {path}: {e}; {hint}") from e


def _create_key_file(path: Path) -> KeyPair:
    pair = KeyPair.generate()
    write_key_file(path, pair)
    return pair


def write_key_file(path: Path, pair: KeyPair) -> None:
    """Write ``pair`` as a new key file (never over an existing one: FileExistsError)."""
    body = json.dumps({"PrivateKey": pair.private_text()}, indent="\t").encode()
    try:
        ensure_private_dir(path.parent)
        # link() publishes the complete file atomically and fails if someone created it meanwhile,
        # so a crash can never leave a half-written key that we would then refuse to load.
        write_atomic(path, body, 0o600, replace=False)
    except FileExistsError:
        raise
    except OSError as e:
        raise KeyFileError(f"cannot create server key file {path}: {e.strerror}") from e
