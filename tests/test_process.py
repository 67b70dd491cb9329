"""The real ``derper`` command: command lines, signals, certificates on disk, key files."""

from __future__ import annotations

import json
import re
import signal
import socket
import stat

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from derper import client as dc
from derper.proto.keys import KeyPair, parse_private
from derper.proto.messages import RestartingMessage
from derper.proto.pin import cert_pin
from tests.conftest import client_context, write_cert
from tests.process import derper, free_port, run_derper, stun_query
from tests.relay_helpers import assert_relays, recv_kind


async def test_dev_command_line_as_checked_and_sigterm_sends_restarting(tmp_path):
    """``derper -dev -a 127.0.0.1:3340 -c KEY -stun-port 3478 -http-port -1``, verbatim."""
    key = tmp_path / "derper.key"
    args = ["-dev", "-a", "127.0.0.1:3340", "-c", str(key), "-stun-port", "3478",
            "-http-port", "-1"]
    async with derper(args, tmp_path) as proc:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        saved = json.loads(key.read_text())["PrivateKey"]
        assert saved.startswith("privkey:") and len(saved) == 8 + 64
        await stun_query(3478)
        async with dc.connect("http://127.0.0.1:3340/derp") as a, \
                dc.connect("http://127.0.0.1:3340/derp") as b:
            await assert_relays(a, b)
            identity = a.server_key
            proc.signal(signal.SIGTERM)
            for c in (a, b):
                m = await recv_kind(c, RestartingMessage)
                assert m.reconnect_in_ms > 0 and m.try_for_ms > 0
            assert await proc.wait(timeout=5) == 0
        assert "shutting down" in proc.log and "signal=SIGTERM" in proc.log
    # The same key comes back on the next start.
    async with derper(args, tmp_path) as proc:
        async with dc.connect("http://127.0.0.1:3340/derp") as a:
            assert a.server_key == identity == KeyPair(parse_private(saved)).public
        proc.signal(signal.SIGINT)
        assert await proc.wait(timeout=5) == 0
    assert json.loads(key.read_text())["PrivateKey"] == saved


async def test_tls_command_line_as_checked_and_sighup_reloads_certificates(tmp_path, ca):
    """``derper -a 127.0.0.1:8443 -hostname localhost -certmode manual -certdir DIR -c KEY
    -stun-port 3479 -http-port -1``, verbatim; then certificate rotation without a restart."""
    certdir = tmp_path / "certs"
    write_cert(ca, certdir, "localhost")
    args = ["-a", "127.0.0.1:8443", "-hostname", "localhost", "-certmode", "manual",
            "-certdir", str(certdir), "-c", str(tmp_path / "k"), "-stun-port", "3479",
            "-http-port", "-1"]
    u = "https://localhost:8443/derp"
    opts = dict(dial=("127.0.0.1", 8443), ssl_context=client_context(ca))
    async with derper(args, tmp_path) as proc:
        async with dc.connect(u, **opts) as a, dc.connect(u, **opts) as b:
            assert a.fast_start and a.tls_version == "TLSv1.3"
            await assert_relays(a, b)
            await stun_query(3479)
            first_leaf = a.peer_chain[0]
            write_cert(ca, certdir, "localhost")  # certbot renewed it
            proc.signal(signal.SIGHUP)
            await proc.wait_for_log("certificate reloaded")
            async with dc.connect(u, **opts) as c:
                assert c.peer_chain[0] != first_leaf
                second_leaf = c.peer_chain[0]
                await assert_relays(c, a)
            await assert_relays(a, b)  # connections made before the reload carry on
            (certdir / "localhost.key").write_text("not a key")
            proc.signal(signal.SIGHUP)
            await proc.wait_for_log("certificate reload failed")
            async with dc.connect(u, **opts) as d:
                assert d.peer_chain[0] == second_leaf  # the working certificate stays
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0


async def test_ip_hostname_gets_pinned_self_signed_certificate(tmp_path):
    port = free_port()
    certdir = tmp_path / "certs"
    args = ["-a", f"127.0.0.1:{port}", "-hostname", "127.0.0.1", "-certmode", "manual",
            "-certdir", str(certdir), "-c", str(tmp_path / "k"), "-http-port", "-1",
            "-stun=false"]
    async with derper(args, tmp_path) as proc:
        node = json.loads(proc.stdout.strip().splitlines()[-1])
        assert stat.S_IMODE(certdir.stat().st_mode) == 0o700
        assert stat.S_IMODE((certdir / "127.0.0.1.key").stat().st_mode) == 0o600
        leaf = x509.load_pem_x509_certificate((certdir / "127.0.0.1.crt").read_bytes())
        pin = cert_pin(leaf.public_bytes(Encoding.DER))
        assert node == {"Name": "custom", "RegionID": 900, "HostName": "127.0.0.1",
                        "CertName": pin}
        async with dc.connect(f"https://127.0.0.1:{port}/derp", cert_pin=pin) as a, \
                dc.connect(f"https://127.0.0.1:{port}/derp", cert_pin=pin) as b:
            assert a.fast_start
            await assert_relays(a, b)
        with pytest.raises(dc.DerpClientError, match="pin mismatch"):
            async with dc.connect(f"https://127.0.0.1:{port}/derp", cert_pin="sha256-raw:" + "0" * 64):
                pass
    async with derper(args, tmp_path) as proc:  # restarts keep the same certificate
        assert json.loads(proc.stdout.strip().splitlines()[-1])["CertName"] == pin


async def test_environment_variables_configure_the_server_and_flags_win(tmp_path):
    port, other = free_port(), free_port()
    env = {"DERP_DEV": "true", "DERP_ADDR": f"127.0.0.1:{other}", "DERP_STUN": "false",
           "DERP_HOME": "blank"}
    async with derper(["-a", f"127.0.0.1:{port}"], tmp_path, env) as proc:
        assert f"addr=127.0.0.1:{port}" in proc.log
        async with dc.connect(f"http://127.0.0.1:{port}/derp"):
            pass
    async with derper([], tmp_path, env) as proc:
        assert f"addr=127.0.0.1:{other}" in proc.log


@pytest.mark.parametrize("args,env,message", [
    (["-nosuchflag"], {}, "flag provided but not defined: -nosuchflag"),
    (["-http-port"], {}, "flag needs an argument: -http-port"),
    (["-tcp-user-timeout", "15"], {}, "invalid duration"),
    (["-dev", "-home", "ftp://x"], {}, "-home must be"),
    (["-a", "127.0.0.1:1"], {}, "-certmode letsencrypt (the default) needs -hostname"),
    (["-a", "127.0.0.1:1", "-hostname", "203.0.113.7"], {}, "add -acme-ip-certs"),
    (["-a", "127.0.0.1:1", "-hostname", "derp.example.com", "-acme-ip-certs"], {},
     "-acme-ip-certs needs an IP address as -hostname"),
    (["-a", "127.0.0.1:1", "-hostname", "derp.example.com", "-http-port", "-1"], {},
     "-http-port -1 turns it off"),
    (["-a", "127.0.0.1:1", "-hostname", "derp.example.com", "-acme-directory", "http://x/d"],
     {}, "-acme-directory must be an https:// ACME directory URL"),
    (["-a", "127.0.0.1:1", "-hostname", "derp.example.com", "-acme-ca-bundle", "/nonexistent"],
     {}, "-acme-ca-bundle /nonexistent: no such file"),
    (["-a", "127.0.0.1:1", "-hostname", "derp.example.com", "-certdir", "/dev/null/certs"], {},
     "cannot write to -certdir /dev/null/certs"),
    (["-a", "127.0.0.1:1", "-hostname", "derp.example.com", "-certmode", "manual",
      "-acme-webroot", "/nonexistent"], {}, "-acme-webroot /nonexistent: not a directory"),
    (["-a", "127.0.0.1:1", "-certmode", "gcp"], {}, "-certmode must be one of"),
    (["-a", "127.0.0.1:1", "-certmode", "manual", "-hostname", "derp.example.com",
      "-certdir", "/nonexistent"], {}, "-certmode manual needs /nonexistent/derp.example.com.crt"),
    (["-dev", "-a", "nonsense"], {}, "bad listen address 'nonsense'"),
    (["-dev", "-log-level", "loud"], {}, "-log-level must be one of"),
    (["-dev"], {"DERP_STUN": "maybe"}, "environment variable DERP_STUN"),
])
def test_clear_errors(tmp_path, args, env, message):
    result = run_derper(["-c", str(tmp_path / "k"), *args], env)
    assert result.returncode in (1, 2)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_key_file_is_an_error_and_left_alone(tmp_path):
    key = tmp_path / "derper.key"
    key.write_text('{"PrivateKey": "privkey:nothex"}')
    before = key.read_bytes(), key.stat().st_mtime_ns
    result = run_derper(["-dev", "-c", str(key)])
    assert result.returncode == 1
    assert f"server key file {key}" in result.stderr and "Traceback" not in result.stderr
    assert (key.read_bytes(), key.stat().st_mtime_ns) == before
    result = run_derper(["-dev", "-c", str(tmp_path)])  # a directory: unreadable as a file
    assert result.returncode == 1 and "cannot read server key file" in result.stderr


@pytest.mark.parametrize("kind", ["tcp", "udp"])
async def test_port_in_use_is_a_clear_error(tmp_path, kind):
    port, stun_port = free_port(), free_port(socket.SOCK_DGRAM)
    busy = trio.socket.socket(type=socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    await busy.bind(("127.0.0.1", port if kind == "tcp" else stun_port))
    if kind == "tcp":
        busy.listen()
    result = run_derper(["-dev", "-a", f"127.0.0.1:{port}", "-stun-port", str(stun_port)])
    busy.close()
    assert result.returncode == 1
    assert "cannot listen: Address already in use" in result.stderr
    assert f"-stun-port {stun_port} (UDP)" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag_with_its_environment_variable():
    result = run_derper(["--help"])
    assert result.returncode == 0
    for text in ("-a string", "[$DERP_ADDR]", "-hostname string", "[$DERP_DOMAIN, $DERP_HOSTNAME]",
                 "-certmode", "-certdir", "-c string", "-dev", "-http-port int", "-stun-port int",
                 "-stun\n", "-derp\n", "-home", "-bootstrap-dns-names", "-tcp-keepalive-time duration",
                 "(default 10m0s)", "-tcp-user-timeout", "-tcp-write-timeout", "(default 2s)",
                 "-accept-connection-limit", "-accept-connection-burst", "derper -dev"):
        assert text in result.stdout, text


async def test_kill_9_under_load_then_restart_brings_clients_back_with_the_same_key(tmp_path):
    """What systemd's Restart= does after a crash: the same key and certificate from disk, and
    clients (reconnecting as Tailscale's do) relaying again within seconds."""
    port = free_port()
    args = ["-hostname", "127.0.0.1", "-certmode", "manual", "-certdir", str(tmp_path / "certs"),
            "-a", f"127.0.0.1:{port}", "-http-port", "-1", "-stun-port", "-1",
            "-metrics-addr", "off", "-c", str(tmp_path / "derper.key")]
    url = f"https://127.0.0.1:{port}/derp"
    keys = KeyPair.generate(), KeyPair.generate()
    async with derper(args, tmp_path) as proc:
        pin = re.search(r"sha256-raw:[0-9a-f]{64}", proc.stdout).group(0)
        async with dc.connect(url, keys[0], cert_pin=pin) as a, \
                dc.connect(url, keys[1], cert_pin=pin) as b:
            identity = a.server_key
            with pytest.raises((dc.DerpClientError, trio.BrokenResourceError, EOFError)):
                for seq in range(1000):  # 200 packets a second, killed after 100
                    if seq == 100:
                        proc.signal(signal.SIGKILL)
                    await a.send(b.public_key, b"%d" % seq)
                    await trio.sleep(0.005)
                    if seq > 100:
                        await b.recv()  # the dead server's socket: fails soon
    async with derper(args, tmp_path):
        with trio.fail_after(5):  # back within seconds
            while True:
                try:
                    async with dc.connect(url, keys[0], cert_pin=pin) as a, \
                            dc.connect(url, keys[1], cert_pin=pin) as b:
                        await assert_relays(a, b, b"back")
                        assert a.server_key == identity
                        break
                except dc.DerpClientError:
                    await trio.sleep(0.05)
