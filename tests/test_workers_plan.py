"""-workers arithmetic and the role a supervisor hands its workers (pure)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from derper.errors import ConfigError
from derper.workers.plan import WorkerRole, rate_share, share, worker_count


def test_worker_count():
    assert worker_count("1") == 1 and worker_count(" 4 ") == 4
    assert worker_count("auto", cpus=2) == 2 and worker_count("AUTO", cpus=500) == 64
    assert worker_count("auto") >= 1
    for bad in ("0", "-1", "two", "65", ""):
        with pytest.raises(ConfigError, match="-workers must be auto or a number"):
            worker_count(bad)


@given(st.integers(min_value=1, max_value=10**6), st.integers(min_value=1, max_value=64))
def test_shares_add_up_to_the_host_limit(total, count):
    parts = [share(total, count, i) for i in range(count)]
    if total >= count:
        assert sum(parts) == total and max(parts) - min(parts) <= 1
    else:  # fewer than one each: each keeps one, so nobody is shut out
        assert parts == [1] * count


def test_no_cap_and_unlimited_rates_stay_so():
    assert share(0, 4, 2) == 0
    assert rate_share(math.inf, 3) == math.inf and rate_share(9.0, 3) == 3.0


def test_role_round_trips_and_a_forged_one_is_a_clear_error():
    role = WorkerRole(1, 2, "/run/x", bytes(range(32)), "/var/lib/derper/derper.key", 77,
                      {"main": [5], "stun": [6, 7]}, 9, 10)
    assert WorkerRole.from_env(role.to_env()) == role
    assert role.siblings == [0] and not role.owner
    assert str(role.socket_path(0)) == "/run/x/worker-0.sock"
    with pytest.raises(ConfigError, match="set by derper -workers for its own workers only"):
        WorkerRole.from_env('{"index": 1}')
