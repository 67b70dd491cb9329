"""Every proxy setup in ``deploy/``, started for real (Debian's nginx, Caddy, HAProxy) in front
of derper, with our DERP client through it over ``Upgrade: DERP`` and WebSocket.

The client connects from 127.0.0.2, the proxy from 127.0.0.1, and the client forges an
``X-Forwarded-For`` of its own: derper must see 127.0.0.2 with ``-trusted-proxies``, the proxy
(127.0.0.1) without it, and never the forged address. Behind the L4 setups the client's
address comes in a PROXY header, TLS is derper's own and fast start still works.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from derper import client as dc
from tests.client_address import addresses_seen, allow_all_backend
from tests.conftest import client_context
from tests.proxies import HOSTNAME, SETUPS, running
from tests.relay_helpers import assert_relays
from tests.system import require_binary

CLIENT_IP = "127.0.0.2"
FORGED = [("X-Forwarded-For", "203.0.113.66")]
HTTP_SETUPS = [name for name, (_, kind) in SETUPS.items() if kind == "http"]
BEHIND_NGINX = Path(__file__).resolve().parent.parent / "benchmarks" / "behind_nginx.py"
L4_SETUPS = [name for name, (_, kind) in SETUPS.items() if kind == "l4"]


def through(port: int, ca, websocket: bool) -> dict:
    return {"dial": ("127.0.0.1", port), "ssl_context": client_context(ca),
            "source_ip": CLIENT_IP, "extra_headers": FORGED, "websocket": websocket}


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize("setup", HTTP_SETUPS)
async def test_tls_terminating_proxy(start_server, ca, nursery, tmp_path, caplog, setup,
                                     trusted):
    caplog.set_level(logging.INFO, logger="derper")
    backend = await allow_all_backend(nursery)
    server = await start_server(dev=False, certmode="none",
                                trusted_proxies="127.0.0.1/32" if trusted else "",
                                verify_client_url=f"http://127.0.0.1:{backend.port}/v")
    expect = CLIENT_IP if trusted else "127.0.0.1"
    async with running(setup, tmp_path / setup, ca, server.main_port) as port:
        derp_url = f"https://{HOSTNAME}:{port}/derp"
        for websocket in (False, True):
            async with dc.connect(derp_url, **through(port, ca, websocket)) as c:
                await assert_relays(c, c)
                assert not c.fast_start  # the proxy's certificate has no meta certificate
                assert await addresses_seen(server, backend, caplog, c.public_key) == {expect}
    assert server.relay.stats.websocket_accepts == 1


@pytest.mark.parametrize("setup", L4_SETUPS)
async def test_tls_passthrough_with_proxy_protocol(start_server, ca, nursery, tmp_path, caplog,
                                                   setup):
    caplog.set_level(logging.INFO, logger="derper")
    backend = await allow_all_backend(nursery)
    server = await start_server(tls=True, proxy_protocol=True,
                                verify_client_url=f"http://127.0.0.1:{backend.port}/v")
    async with running(setup, tmp_path / setup, ca, server.main_port) as port:
        derp_url = f"https://{HOSTNAME}:{port}/derp"
        for websocket in (False, True):
            async with dc.connect(derp_url, **through(port, ca, websocket)) as c:
                await assert_relays(c, c)
                assert c.fast_start is not websocket  # derper's own TLS: the meta certificate
                assert await addresses_seen(server, backend, caplog, c.public_key) == \
                    {CLIENT_IP}
    # Straight to derper, past the proxy: no PROXY header, no connection.
    with pytest.raises(dc.DerpClientError):
        async with dc.connect(f"https://{HOSTNAME}:{server.main_port}/derp",
                              **through(server.main_port, ca, False)):
            pass


def test_behind_nginx_benchmark_smoke(tmp_path):
    require_binary("nginx", "nginx")  # here, so a machine without it skips rather than fails
    out = tmp_path / "nginx.json"
    proc = subprocess.run([sys.executable, str(BEHIND_NGINX), "--smoke", "--websocket",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["websocket"] and report["ratio"] > 0
    assert all(row["received"] > 0 for row in report["rows"].values())
    assert "nginx / direct throughput" in proc.stdout
