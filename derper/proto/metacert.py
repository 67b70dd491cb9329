"""The DERP meta certificate (spec §1.5): how a TLS 1.3 client learns the server key early.

A self-signed Ed25519 certificate with CN ``derpkey<hex server key>`` and serial = protocol
version, appended last to the TLS chain. A Go client that finds it skips the HTTP 101 round trip
(fast start). No SKI/AKI: derpprobe treats certificates without them as self-signed and skips
their validity checks.
"""

from __future__ import annotations

import datetime
import functools
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from .keys import parse_hex32
from .wire import PROTOCOL_VERSION

CN_PREFIX = "derpkey"
VALIDITY = datetime.timedelta(days=30)


def build(server_public: bytes, now: datetime.datetime | None = None) -> bytes:
    """PEM of a fresh meta certificate for ``server_public``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ed25519.Ed25519PrivateKey.generate()
    with warnings.catch_warnings():
        # The 71-character CN exceeds X.509's 64-character upper bound; Go does not enforce it.
        warnings.simplefilter("ignore")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             CN_PREFIX + server_public.hex(), _validate=False)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(now - VALIDITY)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, algorithm=None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@functools.lru_cache(maxsize=64)  # a client meets the same few chains on every reconnect
def parse(der: bytes) -> tuple[bytes, int] | None:
    """(server key, protocol version) if ``der`` is a DERP meta certificate, else None.

    Mirrors the Go client: CN ``derpkey`` + exactly 64 hex digits, serial of at most 8 bits.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 71-character CN, again
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if not cns:
        return None
    cn = cns[0].value
    if not isinstance(cn, str) or not cn.startswith(CN_PREFIX):
        return None
    try:
        key = parse_hex32(cn[len(CN_PREFIX):], "meta certificate key")
    except ValueError:
        return None
    serial = cert.serial_number
    if serial.bit_length() > 8:
        return None
    return key, serial
