"""Certificate files (spec §5.2: manual mode, self-signed IP cert, sha256-raw pin) and the
meta certificate (§1.5)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
import warnings
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from derper.certs import bundle as certs
from derper.certs.bundle import CertError
from derper.proto import metacert
from derper.proto.pin import cert_pin

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = datetime.timedelta(days=1)
SERVER_PUB = bytes.fromhex("358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_cert(*, dns=(), ips=(), cn="test", key=None, not_before=NOW - DAY,
              not_after=NOW + 30 * DAY) -> tuple[bytes, bytes]:
    """A self-signed leaf as (cert PEM, key PEM); no SAN extension when dns and ips are empty."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)


def write_manual(certdir: Path, hostname: str, cert_pem: bytes, key_pem: bytes) -> None:
    certdir.mkdir(parents=True, exist_ok=True)
    crt, key = certs.manual_paths(certdir, hostname)
    crt.write_bytes(cert_pem)
    key.write_bytes(key_pem)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---- self-signed IP certificate ---------------------------------------------------------------

@pytest.mark.parametrize("ip, stem", [("203.0.113.20", "203.0.113.20"),
                                      ("2001:db8::1", "2001db81")])
def test_ensure_ip_cert_creates_go_compatible_cert(tmp_path, umask_022, ip, stem):
    certdir = tmp_path / "certs"
    before = datetime.datetime.now(UTC).replace(microsecond=0)
    assert certs.ensure_ip_cert(certdir, ip) is True
    after = datetime.datetime.now(UTC)
    crt_path, key_path = certdir / f"{stem}.crt", certdir / f"{stem}.key"
    assert sorted(p.name for p in certdir.iterdir()) == sorted([crt_path.name, key_path.name])
    assert (mode(certdir), mode(key_path), mode(crt_path)) == (0o700, 0o600, 0o644)

    key_pem = key_path.read_bytes()
    assert key_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----\n")  # SEC1
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"

    cert = load_cert(crt_path)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            == key.public_key().public_bytes(serialization.Encoding.DER, spki))
    expected_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    assert cert.subject == expected_name and cert.issuer == expected_name
    assert cert.serial_number > 0 and cert.serial_number.bit_length() <= 128
    assert before <= cert.not_valid_before_utc <= after
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=365)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=364)
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                             ec.ECDSA(hashes.SHA256()))

    ext = cert.extensions
    assert {e.oid for e in ext} == {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
                                    ExtensionOID.EXTENDED_KEY_USAGE,
                                    ExtensionOID.SUBJECT_ALTERNATIVE_NAME}
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False and bc.critical is True
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert (ku.digital_signature, ku.key_encipherment) == (True, True)
    assert not any((ku.content_commitment, ku.data_encipherment, ku.key_agreement,
                    ku.key_cert_sign, ku.crl_sign))
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(ext.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.IPAddress(ipaddress.ip_address(ip))]


def test_generated_ip_cert_loads_in_manual_mode_with_pin(tmp_path):
    certs.ensure_ip_cert(tmp_path, "203.0.113.20")
    bundle = certs.load_manual(tmp_path, "203.0.113.20")
    der = load_cert(tmp_path / "203.0.113.20.crt").public_bytes(serialization.Encoding.DER)
    assert bundle.leaf_der == der
    assert bundle.pin == "sha256-raw:" + hashlib.sha256(der).hexdigest()
    assert bundle.self_signed is True
    assert certs.derp_node_json("203.0.113.20", bundle.pin) == (
        '{"Name":"custom","RegionID":900,"HostName":"203.0.113.20","CertName":"%s"}'
        % bundle.pin)


def test_ensure_ip_cert_never_overwrites(tmp_path):
    assert certs.ensure_ip_cert(tmp_path, "192.0.2.1") is True
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert certs.ensure_ip_cert(tmp_path, "192.0.2.1") is False
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("present", ["crt", "key"])
def test_one_file_without_the_other_is_error(tmp_path, present):
    (tmp_path / f"192.0.2.1.{present}").write_bytes(b"keep me")
    with pytest.raises(CertError, match="192.0.2.1.(crt|key)"):
        certs.ensure_ip_cert(tmp_path, "192.0.2.1")
    assert [p.name for p in tmp_path.iterdir()] == [f"192.0.2.1.{present}"]
    assert (tmp_path / f"192.0.2.1.{present}").read_bytes() == b"keep me"


@pytest.mark.parametrize("hostname, stem", [
    ("2001:db8::1", "2001db81"), ("[2001:db8::1]", "2001db81"), ("derp.example.com",
                                                                 "derp.example.com"),
    ("192.0.2.1", "192.0.2.1"), ("a_b/c d", "abcd"), ("Derp-1.Example.COM", "Derp-1.Example.COM"),
])
def test_file_stem(tmp_path, hostname, stem):
    assert certs.file_stem(hostname) == stem
    assert certs.manual_paths(tmp_path, hostname) == (tmp_path / f"{stem}.crt",
                                                      tmp_path / f"{stem}.key")


def test_cert_pin_is_lowercase_sha256_of_der():
    assert cert_pin(b"abc") == (
        "sha256-raw:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


# ---- manual mode loading --------------------------------------------------------------------

def test_load_manual_dns_cert(tmp_path):
    cert_pem, key_pem = make_cert(dns=["derp.example.com"])
    write_manual(tmp_path, "derp.example.com", cert_pem, key_pem)
    bundle = certs.load_manual(tmp_path, "derp.example.com", now=NOW)
    assert (bundle.chain_pem, bundle.key_pem) == (cert_pem, key_pem)
    assert bundle.not_after == NOW + 30 * DAY


def test_load_manual_chain_keeps_leaf_first(tmp_path):
    ca = trustme.CA().create_child_ca()
    issued = ca.issue_cert("derp.example.com")
    chain = b"".join(p.bytes() for p in issued.cert_chain_pems)
    assert len(issued.cert_chain_pems) >= 2
    write_manual(tmp_path, "derp.example.com", chain, issued.private_key_pem.bytes())
    bundle = certs.load_manual(tmp_path, "derp.example.com")
    assert bundle.chain_pem == chain
    assert bundle.leaf == x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
    assert bundle.self_signed is False


@pytest.mark.parametrize("pattern, hostname, ok", [
    ("*.example.com", "derp.example.com", True),
    ("*.example.com", "DERP.Example.COM", True),
    ("*.example.com", "derp.example.com.", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("derp.example.com", "derp.example.com", True),
    ("derp.example.com", "derp2.example.com", False),
    ("203.0.113.20", "203.0.113.20", False),  # an IP hostname needs an IP SAN, not a DNS SAN
])
def test_dns_name_matching(tmp_path, pattern, hostname, ok):
    write_manual(tmp_path, hostname, *make_cert(dns=[pattern]))
    if ok:
        certs.load_manual(tmp_path, hostname, now=NOW)
    else:
        with pytest.raises(CertError, match="not valid for -hostname"):
            certs.load_manual(tmp_path, hostname, now=NOW)


@pytest.mark.parametrize("hostname", ["2001:db8::1", "[2001:db8::1]"])
def test_ipv6_manual_cert(tmp_path, hostname):
    write_manual(tmp_path, hostname, *make_cert(ips=["2001:db8::1"]))
    assert (tmp_path / "2001db81.crt").exists()
    certs.load_manual(tmp_path, hostname, now=NOW)


def write_error_case(certdir: Path, case: str) -> str:
    """Write the files of one broken manual-mode setup (None = file absent); returns -hostname."""
    host = "derp.example.com"
    good_cert, good_key = make_cert(dns=[host])
    hostname, (crt, key) = {
        "missing-both": (host, (None, None)),
        "missing-key": (host, (good_cert, None)),
        "missing-cert": (host, (None, good_key)),
        "wrong-key": (host, (good_cert, make_cert(dns=[host])[1])),
        "hostname-mismatch": (host, make_cert(dns=["other.example.com"])),
        "cn-only": (host, make_cert(cn=host)),
        "expired": (host, make_cert(dns=[host], not_before=NOW - 60 * DAY, not_after=NOW - DAY)),
        "not-yet-valid": (host, make_cert(dns=[host], not_before=NOW + DAY,
                                          not_after=NOW + 60 * DAY)),
        "garbage-cert": (host, (b"-----BEGIN CERTIFICATE-----\nnope\n", good_key)),
        "garbage-key": (host, (good_cert, b"not a key")),
        "ip-mismatch": ("192.0.2.1", make_cert(ips=["192.0.2.2"])),
    }[case]
    for path, data in zip(certs.manual_paths(certdir, hostname), (crt, key)):
        if data is not None:
            path.write_bytes(data)
    return hostname


@pytest.mark.parametrize("case, message", [
    ("missing-both", r"derp\.example\.com\.crt"),
    ("missing-key", r"cannot read .*derp\.example\.com\.key"),
    ("missing-cert", r"cannot read .*derp\.example\.com\.crt"),
    ("wrong-key", "private key does not belong to the certificate"),
    ("hostname-mismatch", "not valid for -hostname derp.example.com .*other.example.com"),
    ("cn-only", "not valid for -hostname derp.example.com .*none"),
    ("expired", "expired"),
    ("not-yet-valid", "not valid before"),
    ("garbage-cert", "no PEM certificate"),
    ("garbage-key", "private key cannot be loaded"),
    ("ip-mismatch", "not valid for -hostname 192.0.2.1"),
])
def test_load_manual_errors(tmp_path, case, message):
    hostname = write_error_case(tmp_path, case)
    with pytest.raises(CertError, match=message):
        certs.load_manual(tmp_path, hostname, now=NOW)


def test_validity_window_edges(tmp_path):
    write_manual(tmp_path, "derp.example.com",
                 *make_cert(dns=["derp.example.com"], not_before=NOW, not_after=NOW + DAY))
    certs.load_manual(tmp_path, "derp.example.com", now=NOW)
    certs.load_manual(tmp_path, "derp.example.com", now=NOW + DAY)


# ---- meta certificate -----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Attribute's length must be")  # the 71-character CN
def test_metacert_fields():
    cert = x509.load_pem_x509_certificate(metacert.build(SERVER_PUB, now=NOW))
    assert cert.serial_number == 2
    cn = "derpkey" + SERVER_PUB.hex()
    assert len(cn) == 71
    assert [(a.oid, a.value) for a in cert.subject] == [(NameOID.COMMON_NAME, cn)]
    assert cert.issuer == cert.subject
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (NOW - 30 * DAY,
                                                                     NOW + 30 * DAY)
    exts = list(cert.extensions)
    assert len(exts) == 1
    assert exts[0].oid == ExtensionOID.BASIC_CONSTRAINTS and exts[0].critical is True
    assert exts[0].value.ca is False


def test_metacert_keys_are_fresh():
    a = x509.load_pem_x509_certificate(metacert.build(SERVER_PUB))
    b = x509.load_pem_x509_certificate(metacert.build(SERVER_PUB))
    assert a.public_key().public_bytes_raw() != b.public_key().public_bytes_raw()


def test_metacert_round_trip():
    der = x509.load_pem_x509_certificate(metacert.build(SERVER_PUB)).public_bytes(
        serialization.Encoding.DER)
    assert metacert.parse(der) == (SERVER_PUB, 2)


def meta_like(cn: str | None, serial: int = 2) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attrs = [] if cn is None else [
            x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)]
    name = x509.Name(attrs or [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY).sign(key, None))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("der, expected", [
    (meta_like("derpkey" + SERVER_PUB.hex(), 255), (SERVER_PUB, 255)),
    (meta_like("derpkey" + SERVER_PUB.hex().upper(), 1), (SERVER_PUB, 1)),
    (meta_like("derpkez" + SERVER_PUB.hex()), None),
    (meta_like("DERPKEY" + SERVER_PUB.hex()), None),
    (meta_like("derpkey" + SERVER_PUB.hex()[:63]), None),
    (meta_like("derpkey" + SERVER_PUB.hex() + "0"), None),
    (meta_like("derpkey" + "g" * 64), None),
    (meta_like("derpkey" + SERVER_PUB.hex(), 256), None),
    (meta_like(None), None),
    (b"\x30\x03\x02\x01\x02", None),
    (b"", None),
    pytest.param(meta_like("derpkey" + "ab" * 15 + "  " + "ab" * 16), None),
], ids=["serial-255", "upper-hex", "wrong-prefix", "upper-prefix", "63-hex", "65-hex", "non-hex",
        "serial-256", "no-cn", "garbage-der", "empty", "embedded-space"])
def test_metacert_parse(der, expected):
    assert metacert.parse(der) == expected


def test_ordinary_certificate_is_not_a_metacert():
    issued = trustme.CA().issue_cert("derp.example.com")
    der = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER)
    assert metacert.parse(der) is None
