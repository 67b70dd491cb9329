"""-rate-config parsing (Go's JSON), -bandwidth-limit units, the debt-taking token bucket."""

from __future__ import annotations

import pytest

from derper.admission.limits import TokenBucket
from derper.admission.rate_config import MIN_BURST, ReceiveLimit, parse_rate, parse_rate_config
from derper.errors import ConfigError


@pytest.mark.parametrize("text,expect", [
    ('{"PerClientRateLimitBytesPerSec": 100000, "PerClientRateBurstBytes": 200000}',
     ReceiveLimit(100000, 200000)),
    ('{"perclientratelimitbytespersec": 100000}', ReceiveLimit(100000, MIN_BURST)),
    ('{"PerClientRateLimitBytesPerSec": 1000, "PerClientRateBurstBytes": 10}',
     ReceiveLimit(1000, MIN_BURST)),  # burst raised to one maximal frame, as Go does
    ('{"PerClientRateLimitBytesPerSec": 0, "PerClientRateBurstBytes": 5}', None),
    ("{}", None),
    ('{"Unknown": 1}', None),
])
def test_rate_config(text, expect):
    assert parse_rate_config(text) == expect


@pytest.mark.parametrize("text", ["", "[]", '{"PerClientRateLimitBytesPerSec": -1}',
                                  '{"PerClientRateLimitBytesPerSec": "100"}',
                                  '{"PerClientRateLimitBytesPerSec": 1.5}',
                                  '{"PerClientRateBurstBytes": true}'])
def test_bad_rate_config(text):
    with pytest.raises(ConfigError):
        parse_rate_config(text)


@pytest.mark.parametrize("text,bytes_per_second", [
    ("4mbit", 500_000), ("500kbit", 62_500), ("1gbit", 125_000_000), ("8bit", 1),
    ("1MB", 1_000_000), ("2MiB/s", 2 * 1024 * 1024), ("1.5kb", 1500), ("4Mbit", 500_000),
    ("", 0), ("0", 0),
])
def test_parse_rate(text, bytes_per_second):
    assert parse_rate(text) == bytes_per_second


@pytest.mark.parametrize("text", ["4", "4mbps", "fast", "-1mbit", "1e6bit", "mbit"])
def test_parse_rate_needs_a_unit(text):
    with pytest.raises(ValueError, match="e.g. 4mbit"):
        parse_rate(text)


def test_take_goes_into_debt_and_says_how_long_to_wait():
    b = TokenBucket(1000.0, 500.0, now=0.0)
    assert b.take(0.0, 400) == 0.0
    assert b.take(0.0, 600) == pytest.approx(0.5)  # 500 bytes of debt at 1000/s
    assert b.take(0.5, 1000) == pytest.approx(1.0)
    # Long run: bytes taken ≈ burst + rate × time, whatever the sizes.
    b, now, taken = TokenBucket(1000.0, 500.0, now=0.0), 0.0, 0
    for size in [1, 700, 65536, 3, 1500] * 20:
        now += b.take(now, size)
        taken += size
    assert taken == pytest.approx(500 + 1000 * now, rel=1e-9)

