"""The Dockerfile, built with podman and run the way the README says: `docker run -p 443:443
-p 80:80 -p 3478:3478/udp -e DERP_DOMAIN=<IP> -e DERP_CERT_MODE=manual IMAGE`."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
import trio
import trustme

from derper import client as dc
from derper.proto.messages import RestartingMessage
from stun.message import tailscale_request
from tests.containers import REPO, Podman
from tests.pebble import DOMAIN, Pebble
from tests.process import free_port
from tests.relay_helpers import assert_relays, recv_kind

pytestmark = pytest.mark.slow
IMAGE = "localhost/derper-test:latest"
PUBLIC_IP = "203.0.113.7"
# Docker sets this in every container's own network namespace; podman needs it said.
LOW_PORTS = ("--sysctl", "net.ipv4.ip_unprivileged_port_start=0")


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def image(podman):
    podman.build(IMAGE, REPO, "--build-arg", f"BASE={podman.base_image()}")
    return IMAGE


@pytest.fixture
def relay(podman, image):
    """The image running as the README says, ports published on loopback."""
    ports = {"tls": free_port(), "http": free_port(), "stun": free_port(socket.SOCK_DGRAM)}
    name = podman.run_detached(
        image, *LOW_PORTS, "-p", f"127.0.0.1:{ports['tls']}:443",
        "-p", f"127.0.0.1:{ports['http']}:80", "-p", f"127.0.0.1:{ports['stun']}:3478/udp",
        "-e", f"DERP_DOMAIN={PUBLIC_IP}", "-e", "DERP_CERT_MODE=manual")
    try:
        podman.wait_for(lambda: "derper listening" in podman.logs(name),
                        "derper listening in the container")
        yield name, ports
    finally:
        podman.remove(name)


def printed_pin(podman: Podman, name: str) -> str:
    stdout = podman("logs", name).stdout.decode()  # podman logs keeps stdout and stderr apart
    node = json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))
    assert node["HostName"] == PUBLIC_IP and node["RegionID"] == 900
    assert re.fullmatch(r"sha256-raw:[0-9a-f]{64}", node["CertName"])
    return node["CertName"]


async def stun_binding(port: int) -> bytes:
    """Tailscale's STUN request through the published UDP port; the reply's header."""
    txid = os.urandom(12)
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        with trio.fail_after(10):
            while True:  # UDP: resend until the forwarder is up
                await sock.sendto(tailscale_request(txid), ("127.0.0.1", port))
                with trio.move_on_after(0.5):
                    reply, _ = await sock.recvfrom(1500)
                    break
    assert reply[:2] == b"\x01\x01", reply.hex()  # Binding success
    assert reply[8:20] == txid
    return reply


async def test_image_relays_with_the_printed_pin_answers_stun_and_health(podman, relay):
    name, ports = relay
    pin = printed_pin(podman, name)
    url = f"https://{PUBLIC_IP}/derp"
    dial = ("127.0.0.1", ports["tls"])
    async with dc.connect(url, dial=dial, cert_pin=pin) as a, \
            dc.connect(url, dial=dial, cert_pin=pin) as b:
        assert a.fast_start  # the meta certificate came through too
        await assert_relays(a, b)
    wrong = "sha256-raw:" + "0" * 64
    with pytest.raises(dc.DerpClientError):
        async with dc.connect(url, dial=dial, cert_pin=wrong):
            pass
    await stun_binding(ports["stun"])
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    assert podman.out("exec", name, "id", "-u").strip() == "10001"  # not root
    files = podman.out("exec", name, "ls", "/opt/derper/bin", "/var/lib/derper",
                       "/var/lib/derper/certs").split()
    assert "pip" not in files and "derper.key" in files and f"{PUBLIC_IP}.crt" in files
    # derpmap inside the container reads the same DERP_* settings: the same pin.
    derp_map = json.loads(podman.out("exec", name, "derper", "derpmap", "-format", "json"))
    assert derp_map["Regions"]["900"]["Nodes"][0]["CertName"] == pin


async def test_sigterm_sends_restarting_and_exits_zero_with_state_kept(podman, image, relay):
    name, ports = relay
    pin = printed_pin(podman, name)
    async with dc.connect(f"https://{PUBLIC_IP}/derp", dial=("127.0.0.1", ports["tls"]),
                          cert_pin=pin) as client:
        podman("stop", "-t", "20", name)  # exit code 0 below: derper exited, no SIGKILL
        message = await recv_kind(client, RestartingMessage)
        assert message.reconnect_in_ms > 0
    assert podman.out("inspect", name, "--format", "{{.State.ExitCode}}").strip() == "0"
    # The volume keeps key and certificate: same pin after a restart.
    podman("start", name)
    podman.wait_for(lambda: podman.out("logs", name).count("{") >= 2, "the second start")
    stdout = podman("logs", name).stdout.decode()
    pins = [json.loads(line)["CertName"] for line in stdout.splitlines() if line.startswith("{")]
    assert pins == [pin, pin]


def test_image_without_a_hostname_fails_with_a_clear_message(podman, image):
    proc = podman("run", "--rm", "--network=none", image, "-certmode", "manual", check=False)
    assert proc.returncode == 1
    assert b"derp.tailscale.com" in proc.stderr  # the default hostname has no cert: says so


async def test_domain_alone_gets_a_certificate_from_the_acme_ca(podman, image, tmp_path):
    """`-e DERP_DOMAIN=<domain>` and nothing else about certificates: the default Let's Encrypt
    mode, here pointed at Pebble (Let's Encrypt's test CA) on the host's loopback."""
    pebble = Pebble(tmp_path / "pebble", trustme.CA())
    port = free_port()
    # Host network: the container reaches Pebble, and Pebble's HTTP-01 check reaches derper's
    # helper (on Pebble's httpPort; non-root, so ports >= 1024 here).
    name = podman.run_detached(
        image, "--network=host", "-v", f"{pebble.ca_file}:/pebble-ca.pem:ro",
        "-e", f"DERP_DOMAIN={DOMAIN}", "-e", f"DERP_ADDR=127.0.0.1:{port}",
        "-e", f"DERP_HTTP_PORT={pebble.http_port}", "-e", "DERP_STUN=false",
        "-e", f"DERP_ACME_DIRECTORY={pebble.directory}",
        "-e", "DERP_ACME_CA_BUNDLE=/pebble-ca.pem", network=None)
    try:
        podman.wait_for(lambda: "derper listening" in podman.logs(name), "derper listening")
        context = pebble.client_context()
        url = f"https://{DOMAIN}:{port}/derp"
        deadline = time.monotonic() + 60
        while True:  # the order completes in the background
            try:
                async with dc.connect(url, dial=("127.0.0.1", port), ssl_context=context) as a, \
                        dc.connect(url, dial=("127.0.0.1", port), ssl_context=context) as b:
                    await assert_relays(a, b)
                break
            except dc.DerpClientError:
                if time.monotonic() > deadline:
                    raise AssertionError(podman.logs(name) + pebble.log()) from None
                await trio.sleep(0.5)
        assert podman("healthcheck", "run", name, check=False).returncode == 0  # SNI: domain
    finally:
        podman.remove(name)
        pebble.close()
