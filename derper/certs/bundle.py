"""Certificate files: load and check ``<certdir>/<hostname>.crt|.key``, make a self-signed IP cert.

Checks happen here, before a certificate is ever served, so a wrong file is a clear message at
start or reload instead of every client failing its TLS handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..disk.files import ensure_private_dir, locked, write_atomic_group
from ..errors import ConfigError
from ..proto.pin import cert_pin

IP_CERT_VALIDITY = datetime.timedelta(days=365)  # longer is rejected by macOS clients


class CertError(ConfigError):
    """A certificate or key on disk cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class CertBundle:
    chain_pem: bytes  # leaf first, then intermediates
    key_pem: bytes
    leaf: x509.Certificate

    @property
    def leaf_der(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.DER)

    @property
    def pin(self) -> str:
        return cert_pin(self.leaf_der)

    @property
    def self_signed(self) -> bool:
        return self.leaf.issuer == self.leaf.subject

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc


def file_stem(hostname: str) -> str:
    """Go derper's file name for a hostname: every char outside ``[A-Za-z0-9.-]`` removed."""
    return re.sub(r"[^A-Za-z0-9.-]", "", hostname)


def manual_paths(certdir: Path, hostname: str) -> tuple[Path, Path]:
    stem = file_stem(hostname)
    return certdir / f"{stem}.crt", certdir / f"{stem}.key"


def parse_ip(hostname: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        return None


def load_manual(certdir: Path, hostname: str, now: datetime.datetime | None = None) -> CertBundle:
    crt_path, key_path = manual_paths(certdir, hostname)
    try:
        chain_pem = crt_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as e:
        raise CertError(f"cannot read {e.filename}: {e.strerror}. -certmode manual needs "
                        f"{crt_path} and {key_path} for -hostname {hostname}") from e
    return check_bundle(chain_pem, key_pem, hostname, str(crt_path), now)


def check_bundle(chain_pem: bytes, key_pem: bytes, hostname: str, where: str,
                 now: datetime.datetime | None = None) -> CertBundle:
    """Parse and validate a PEM chain + key for ``hostname``; raise CertError if unusable."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise CertError(f"{where}: no PEM certificate found") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"{where}: the private key cannot be loaded ({e})") from e
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise CertError(f"{where}: the private key does not belong to the certificate")
    if not _matches_hostname(leaf, hostname):
        raise CertError(f"{where}: certificate is not valid for -hostname {hostname} "
                        f"(names: {', '.join(_san_names(leaf)) or 'none'})")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now < leaf.not_valid_before_utc:
        raise CertError(f"{where}: certificate is not valid before {leaf.not_valid_before_utc}")
    if now > leaf.not_valid_after_utc:
        raise CertError(f"{where}: certificate expired on {leaf.not_valid_after_utc}")
    return CertBundle(chain_pem, key_pem, leaf)


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(a) for a in san.get_values_for_type(x509.IPAddress)])


def _matches_hostname(cert: x509.Certificate, hostname: str) -> bool:
    """Like Go's VerifyHostname: subjectAltName only (no CN fallback), one-label wildcards."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    ip = parse_ip(hostname)
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    host = hostname.lower().rstrip(".")
    for pattern in san.get_values_for_type(x509.DNSName):
        pattern = pattern.lower().rstrip(".")
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host and host.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def pair_on_disk(certdir: Path, hostname: str) -> bool:
    """Whether both files of the pair exist (False: neither); CertError if only one does."""
    crt_path, key_path = manual_paths(certdir, hostname)
    have_crt, have_key = crt_path.exists(), key_path.exists()
    if have_crt != have_key:
        present, missing = (crt_path, key_path) if have_crt else (key_path, crt_path)
        raise CertError(f"{present} exists but {missing} does not; restore it, or remove "
                        f"{present} to generate a new self-signed certificate")
    return have_crt


def unwritable_ip_certdir(certdir: Path, reason: str) -> CertError:
    return CertError(f"cannot write the self-signed certificate into {certdir}: {reason}; make "
                     "-certdir a directory derper can write, or choose another one")


def ensure_ip_cert(certdir: Path, ip_text: str) -> bool:
    """Create a self-signed certificate for an IP hostname unless its files exist.

    Returns whether one was created. Never overwrites: if only one of the two files exists,
    that is an error for the operator to resolve.
    """
    if pair_on_disk(certdir, ip_text):
        return False
    try:
        ensure_private_dir(certdir)
        with locked(certdir):
            return not pair_on_disk(certdir, ip_text) and _create_ip_cert(certdir, ip_text)
    except OSError as e:
        raise unwritable_ip_certdir(certdir, e.strerror) from e


def _create_ip_cert(certdir: Path, ip_text: str) -> bool:
    ip = parse_ip(ip_text)
    assert ip is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(ip))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now)
        .not_valid_after(now + IP_CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    crt_path, key_path = manual_paths(certdir, ip_text)
    write_atomic_group([(key_path, key_pem, 0o600),
                        (crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)],
                       replace=False)
    return True


def derp_node_json(hostname: str, pin: str) -> str:
    """The DERP map node the Go derper prints for a pinned self-signed certificate."""
    return json.dumps({"Name": "custom", "RegionID": 900, "HostName": hostname,
                       "CertName": pin}, separators=(",", ":"))
