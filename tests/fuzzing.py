"""One budget for every fuzz target: short in the suite, as long as you like on demand.

The targets are the parsers a remote peer feeds: the DERP frame reader and the handshake
(test_wire.py, test_handshake.py, test_fuzz_session.py), STUN (test_stun_message.py), the HTTP
request head (test_fuzz_http.py), a trusted proxy's address headers (test_forwarded.py) and
PROXY protocol headers (test_proxy_protocol.py). Each is marked ``fuzz``; a long run multiplies
every budget::

    DERPER_FUZZ_FACTOR=100 .venv/bin/pytest -m fuzz -q

A crash found that way becomes a regression test: pin its input with ``@example``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

FACTOR = max(1, int(os.environ.get("DERPER_FUZZ_FACTOR", "1")))


def fuzz(examples: int):
    """``@settings`` for a fuzz target with ``examples`` runs in the suite (times FACTOR)."""
    budget = settings(max_examples=examples * FACTOR, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])

    def mark(test):
        return pytest.mark.fuzz(budget(test))

    return mark
