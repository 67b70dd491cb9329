"""``-certmode none``: production behind a TLS-terminating proxy. Plain HTTP on -a, the key
from -c kept across restarts, no HTTP helper, STUN served directly."""

from __future__ import annotations

import socket
from dataclasses import replace

from derper import client as dc
from derper.config import Config
from derper.config_check import check
from tests.process import derper, free_port, stun_query
from tests.relay_helpers import assert_relays

ARGS = ["-certmode", "none", "-metrics-addr", "off"]


async def test_plain_http_with_the_persistent_key_and_direct_stun(tmp_path):
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    key = tmp_path / "derper.key"
    args = [*ARGS, "-a", f"127.0.0.1:{port}", "-c", str(key), "-stun-port", str(stun)]
    keys = []
    for _ in range(2):
        async with derper(args, tmp_path) as proc:
            assert "TLS is expected at the reverse proxy" in proc.log
            line = next(x for x in proc.log.splitlines() if "derper listening" in x)
            assert "scheme=http " in line and "http_helper=" not in line
            assert f"stun=127.0.0.1:{stun}/udp" in line
            async with dc.connect(f"http://127.0.0.1:{port}/derp") as c:
                await assert_relays(c, c)
                keys.append(c.server_key)
            await stun_query(stun)
    assert key.exists() and keys[0] == keys[1]


def test_checks():
    base = Config(certmode="none")
    assert check(base) == [] and not base.tls  # no hostname, certificate or port 80 needed
    [problem] = check(replace(base, acme_ip_certs=True))
    assert "-certmode none serves none" in str(problem)
    [problem] = check(replace(base, certmode="tls"))
    assert "letsencrypt, manual, none" in str(problem)
    [problem] = check(replace(base, trusted_proxies="10.0.0.0/8,localhost"))
    assert str(problem).startswith("-trusted-proxies: 'localhost' is not an IP prefix")
    assert not replace(base, dev=True).tls
