"""``-rate-config`` (spec §4.10) and ``-bandwidth-limit`` values: text in, numbers out.

The rate-config file is the Go derper's JSON, read the Go way (case-insensitive keys, both
fields optional): ``{"PerClientRateLimitBytesPerSec": 100000, "PerClientRateBurstBytes": 0}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..proto import gojson

MIN_BURST = 64 * 1024 + 32  # Go raises the burst to one maximal frame so a client never stalls


@dataclass(frozen=True)
class ReceiveLimit:
    """A per-client receive budget: bytes per second and burst (already raised to MIN_BURST)."""

    rate: float
    burst: float


def parse_rate_config(data: bytes | str) -> ReceiveLimit | None:
    """The file's content → the limit, or None when the rate is 0 (limiting off)."""
    try:
        obj = gojson.load_object(data)
    except ValueError as e:
        raise ConfigError(f"rate config is {e}") from e
    values = []
    for name in ("PerClientRateLimitBytesPerSec", "PerClientRateBurstBytes"):
        v = obj.get(name.lower(), 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"rate config field {name} must be a non-negative integer")
        values.append(v)
    rate, burst = values
    if rate == 0:
        return None
    return ReceiveLimit(float(rate), float(max(burst, MIN_BURST)))


def load_rate_config(path: str) -> ReceiveLimit | None:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read -rate-config {path}: {e.strerror}") from e
    try:
        return parse_rate_config(data)
    except ConfigError as e:
        raise ConfigError(f"-rate-config {path}: {e}") from e


# Decimal SI prefixes, as network links are sold; "bit" units are bits per second, the others
# bytes per second (so "4mbit" == "500KB" == 500000 bytes/s).
_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3,
}
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)(?:/s)?")


def parse_rate(text: str) -> float:
    """``4mbit``, ``500kbit``, ``1.5MB``, ``2MiB/s`` → bytes per second; ``0`` or ``""`` → 0 (off)."""
    s = text.strip().lower()
    if s in ("", "0"):
        return 0.0
    m = _RATE_RE.fullmatch(s)
    if not m or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"invalid rate {text!r}: use a number and a unit: bit, kbit, mbit, gbit "
                         "(bits/s) or B, KB, MB, GB, KiB, MiB, GiB (bytes/s), e.g. 4mbit")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]
