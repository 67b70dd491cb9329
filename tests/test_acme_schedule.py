"""When derper renews and retries (pure parts of the ACME certificate manager)."""

from __future__ import annotations

import datetime

import pytest
import trustme

from derper.certs.acme import renewal_time, retry_delay
from derper.certs.acme_order import LETSENCRYPT, LETSENCRYPT_STAGING, resolve_directory
from derper.certs.bundle import check_bundle

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def bundle_valid_for(ca: trustme.CA, days: float):
    cert = ca.issue_cert("derp.example.com", not_before=START.replace(tzinfo=None),
                         not_after=(START + datetime.timedelta(days=days)).replace(tzinfo=None))
    return check_bundle(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes(),
                        "derp.example.com", "test", now=START)


@pytest.mark.parametrize("days,renew_after_days", [
    (90, 60),  # Let's Encrypt's classic certificate: 30 days before expiry
    (365, 335),  # long-lived: still 30 days before expiry
    (6, 4),  # Let's Encrypt's shortlived (IP) certificate: when a third of its life remains
    (45, 30),
])
def test_renewal_time(ca, days, renew_after_days):
    assert renewal_time(bundle_valid_for(ca, days)) == START + datetime.timedelta(
        days=renew_after_days)


def test_retry_backoff_doubles_up_to_the_cap():
    assert [retry_delay(n, 60, 1800) for n in range(1, 8)] == [60, 120, 240, 480, 960, 1800,
                                                              1800]
    assert retry_delay(10_000, 60, 1800) == 1800  # no float overflow after months of failures


def test_directory_aliases_and_urls():
    assert resolve_directory("letsencrypt") == LETSENCRYPT
    assert resolve_directory("staging") == LETSENCRYPT_STAGING
    assert resolve_directory("https://ca.example/dir") == "https://ca.example/dir"
    for bad in ("http://ca.example/dir", "ca.example", ""):
        with pytest.raises(ValueError, match="-acme-directory must be an https://"):
            resolve_directory(bad)
