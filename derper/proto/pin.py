"""``sha256-raw:`` pins: a DERP map's ``CertName`` that names one exact leaf certificate.

Tailscale's rules (spec §1.2): meta certificates are ignored, exactly one other certificate
must be there, its SHA-256 must match and the time must be within its validity.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re

from cryptography import x509

from . import metacert

PREFIX = "sha256-raw:"
_PIN = re.compile(PREFIX + "[0-9a-fA-F]{64}")


def cert_pin(der: bytes) -> str:
    """The ``CertName`` value that pins this exact leaf certificate in a DERP map."""
    return PREFIX + hashlib.sha256(der).hexdigest()


def well_formed(pin: str) -> bool:
    """``sha256-raw:`` and 64 hex digits, as a DERP map's CertName pins one (Tailscale's
    client matches the prefix exactly, so only the digits may be upper case)."""
    return _PIN.fullmatch(pin) is not None


def pin_problem(chain: list[bytes], pin: str, now: datetime.datetime | None = None) -> str | None:
    """Why the server's DER ``chain`` does not satisfy ``pin``; None when it does."""
    leaves = [der for der in chain if metacert.parse(der) is None]
    if len(leaves) != 1:
        return f"pinned server sent {len(leaves)} certificates, expected 1"
    got = cert_pin(leaves[0])
    if got != pin.lower():
        return f"certificate pin mismatch: server has {got}"
    not_before, not_after = _validity(leaves[0])
    if not not_before <= (now or datetime.datetime.now(datetime.timezone.utc)) <= not_after:
        return "pinned certificate is outside its validity period"
    return None


@functools.lru_cache(maxsize=64)  # the pinned certificate, parsed once, not per reconnect
def _validity(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    cert = x509.load_der_x509_certificate(der)
    return cert.not_valid_before_utc, cert.not_valid_after_utc
