"""``derper check`` against real servers on loopback: derpers with various flags, plain TLS
servers with bad certificates, a closed port, a silent port, a garbage server, an HTTPS server
that is not DERP, and DERP maps in both formats with right and wrong pins.

The command runs as the real console script (its exit status and ``-json`` output are the
contract), the servers in this test's trio loop or as derper processes.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import warnings
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from derper.check.results import NAMES
from derper.cli import check as check_command
from derper.proto.keys import KeyPair, public_text
from tests.process import DERPER, derper, free_port

TIMEOUT = "1s"  # -timeout for the checks that wait for something that never comes


async def check(*args: str, env: dict | None = None) -> tuple[int, list[dict], str]:
    """Run ``derper check -json ARGS``: (exit status, one report per line, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DERP_")}
    full_env.update(env or {})
    with trio.fail_after(30):
        done = await trio.run_process([DERPER, "check", "-json", *args], capture_stdout=True,
                                      capture_stderr=True, check=False, env=full_env)
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    return done.returncode, [json.loads(line) for line in done.stdout.decode().splitlines()], \
        stderr


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def assert_shape(report: dict) -> None:
    """Exactly the JSON shape issue 16 promises, names in its order."""
    assert set(report) == {"target", "checks"} and isinstance(report["target"], str)
    names = [c["name"] for c in report["checks"]]
    assert names == [n for n in NAMES if n in names]
    for c in report["checks"]:
        assert set(c) == {"name", "status", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail", "skip") and c["detail"]
        assert (c["fix"] is not None) == (c["status"] in ("warn", "fail")), c


@pytest.fixture
def ca_file(ca, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# ---- derper in this process --------------------------------------------------------------------

async def test_a_healthy_relay_passes_everything(start_server, ca_file):
    server = await start_server(tls=True, stun=True, stun_port=0, http_port=0)
    code, [report], _ = await check("-ca-file", ca_file, "-stun-port", str(server.stun_port),
                                    "-http-port", str(server.http_port),
                                    f"localhost:{server.main_port}")
    assert_shape(report)
    assert code == 0, report
    assert statuses(report) == {"dns": "ok", "tcp": "ok", "tls": "ok", "certificate": "ok",
                                "fast_start": "ok", "derp": "ok", "relay": "ok", "stun": "ok",
                                "captive_portal": "ok"}
    checks = by_name(report)
    assert "TLS 1.3" in checks["tls"]["detail"]
    assert "days)" in checks["certificate"]["detail"]
    assert server.relay.public_key.hex()[:16] in checks["derp"]["detail"]
    assert "you are 127.0.0.1:" in checks["stun"]["detail"]
    assert report["target"] == f"localhost:{server.main_port}"
    assert "localhost → 127.0.0.1" in checks["dns"]["detail"]


async def test_system_roots_come_from_ssl_cert_file(start_server, ca_file):
    """Without -ca-file the private CA is untrusted (a failure of certificate only, while DERP
    still answers); SSL_CERT_FILE naming it makes the certificate good."""
    server = await start_server(tls=True)
    target = ("-stun-port", "-1", "-http-port", "-1", f"localhost:{server.main_port}")
    code, [report], _ = await check(*target)
    assert code == 1
    checks = by_name(report)
    assert checks["certificate"]["status"] == "fail"
    assert "not trusted" in checks["certificate"]["detail"]
    assert "sha256-raw:" in checks["certificate"]["fix"]
    assert checks["derp"]["status"] == "ok" and "not checked" in checks["derp"]["detail"]
    assert checks["relay"]["status"] == "ok"
    code, [report], _ = await check(*target, env={"SSL_CERT_FILE": ca_file})
    assert code == 0 and by_name(report)["certificate"]["status"] == "ok"


async def test_stun_off_fails_stun_only(start_server, ca_file):
    server = await start_server(tls=True)  # stun=False
    code, [report], _ = await check("-ca-file", ca_file, "-timeout", TIMEOUT, "-stun-port",
                                    str(free_port(2)), "-http-port", "-1",
                                    f"localhost:{server.main_port}")
    assert code == 1
    assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == ["stun"]
    stun = by_name(report)["stun"]
    assert "nothing listens on UDP" in stun["detail"] or "no answer" in stun["detail"]
    assert "ufw allow" in stun["fix"]
    assert by_name(report)["captive_portal"]["status"] == "skip"


async def test_admission_refusal_is_a_warning_that_says_so(start_server, ca_file, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.write_text(public_text(KeyPair.generate().public) + "\n")
    server = await start_server(tls=True, allow_keys=str(allowed))
    code, [report], _ = await check("-ca-file", ca_file, "-stun-port", "-1", "-http-port", "-1",
                                    f"localhost:{server.main_port}")
    assert code == 0  # warnings allowed
    checks = by_name(report)
    assert checks["derp"]["status"] == "ok" and "admission" in checks["derp"]["detail"]
    assert checks["relay"]["status"] == "warn"
    assert "refused by admission" in checks["relay"]["detail"]
    assert "-allow-keys" in checks["relay"]["fix"]


async def test_derp_off_is_not_a_derp_server(start_server, ca_file):
    server = await start_server(tls=True, derp=False)
    code, [report], _ = await check(f"localhost:{server.main_port}", "-ca-file", ca_file,
                                    "-stun-port", "-1", "-http-port", "-1")  # flags after it
    assert code == 1
    checks = by_name(report)
    assert checks["derp"]["status"] == "fail" and "HTTP 404" in checks["derp"]["detail"]
    assert checks["relay"]["status"] == "skip"


async def test_a_plain_http_dev_relay(start_server):
    server = await start_server(stun=True, stun_port=0)
    code, [report], _ = await check("-stun-port", str(server.stun_port),
                                    f"http://127.0.0.1:{server.main_port}")
    assert code == 0
    assert statuses(report) == {"dns": "skip", "tcp": "ok", "tls": "skip",
                                "certificate": "skip", "fast_start": "skip", "derp": "ok",
                                "relay": "ok", "stun": "ok", "captive_portal": "ok"}


async def test_tls_port_checked_as_plain_http_and_the_reverse(start_server):
    """A -dev relay checked as TLS: the tls check says the port does not speak TLS."""
    server = await start_server()
    code, [report], _ = await check("-timeout", TIMEOUT, "-stun-port", "-1", "-http-port", "-1",
                                    f"localhost:{server.main_port}")
    assert code == 1
    checks = by_name(report)
    assert checks["tls"]["status"] == "fail"
    assert "does not speak TLS" in checks["tls"]["detail"]
    assert "http://host:port" in checks["tls"]["fix"]
    assert {checks[n]["status"] for n in ("certificate", "fast_start", "derp", "relay")} == \
        {"skip"}


# ---- plain servers: closed, silent, garbage, bad certificates, not DERP ------------------------

async def serve(nursery: trio.Nursery, handler) -> int:
    """``handler(stream)`` for every connection to a fresh loopback port; errors end only that
    connection."""
    async def guarded(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, guarded, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


def tls_handler(cert: trustme.LeafCert, then=None, max_version=None):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if max_version is not None:  # an old server: old versions, whatever OpenSSL's policy
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # which is the point here
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = max_version

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return
        if then is not None:
            await then(tls)

    return handle


async def read_head(stream: trio.abc.Stream) -> None:
    data = b""
    while b"\r\n\r\n" not in data and (chunk := await stream.receive_some()):
        data += chunk


async def nginx(stream: trio.abc.Stream) -> None:
    """An HTTPS server that is not DERP: 200 and a page for every request."""
    await read_head(stream)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 21\r\n\r\n"
                          b"<h1>Welcome to nginx!")


async def test_closed_port_fails_tcp_and_skips_what_needs_it():
    port = free_port()
    code, [report], _ = await check("-timeout", TIMEOUT, "-stun-port", "-1", "-http-port", "-1",
                                    f"127.0.0.1:{port}")
    assert_shape(report)
    assert code == 1
    tcp = by_name(report)["tcp"]
    assert tcp["status"] == "fail" and "refused" in tcp["detail"]
    assert f"ufw allow {port}/tcp" in tcp["fix"]
    assert [c["status"] for c in report["checks"][2:]] == ["skip"] * 7


async def test_a_silent_port_ends_within_the_timeout(nursery):
    port = await serve(nursery, lambda stream: trio.sleep_forever())
    start = trio.current_time()
    code, [report], _ = await check("-timeout", "500ms", "-stun-port", "-1", "-http-port", "-1",
                                    f"127.0.0.1:{port}")
    assert trio.current_time() - start < 10
    assert code == 1
    tls = by_name(report)["tls"]
    assert tls["status"] == "fail" and "no answer within 0.5s" in tls["detail"]


async def test_a_garbage_server(nursery):
    async def garbage(stream):
        await stream.send_all(os.urandom(64) + b"\x00" * 4096)
        await trio.sleep(5)

    port = await serve(nursery, garbage)
    code, [report], _ = await check("-timeout", TIMEOUT, "-stun-port", "-1", "-http-port", "-1",
                                    f"127.0.0.1:{port}")
    assert code == 1
    assert by_name(report)["tls"]["status"] == "fail"
    assert by_name(report)["certificate"]["status"] == "skip"


async def test_wrong_name_and_expired_certificates(nursery, ca, ca_file):
    wrong = await serve(nursery, tls_handler(ca.issue_cert("example.org")))
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = await serve(nursery, tls_handler(ca.issue_cert(
        "127.0.0.1", not_before=now - datetime.timedelta(days=60),
        not_after=now - datetime.timedelta(days=3))))
    soon = await serve(nursery, tls_handler(ca.issue_cert(
        "127.0.0.1", not_before=now - datetime.timedelta(days=60),
        not_after=now + datetime.timedelta(days=5, hours=1))))
    quiet = ("-ca-file", ca_file, "-stun-port", "-1", "-http-port", "-1")

    code, [report], _ = await check(*quiet, f"127.0.0.1:{wrong}")
    cert = by_name(report)["certificate"]
    assert code == 1 and cert["status"] == "fail"
    assert "is for example.org, not 127.0.0.1" in cert["detail"]

    code, [report], _ = await check(*quiet, f"127.0.0.1:{expired}")
    cert = by_name(report)["certificate"]
    assert code == 1 and cert["status"] == "fail"
    assert "expired on" in cert["detail"] and "3 days ago" in cert["detail"]
    assert "renew" in cert["fix"]

    code, [report], _ = await check(*quiet, f"127.0.0.1:{soon}")
    cert = by_name(report)["certificate"]
    assert cert["status"] == "warn" and "(5 days)" in cert["detail"]
    assert by_name(report)["fast_start"]["status"] == "warn"  # no meta certificate
    assert by_name(report)["derp"]["status"] == "fail"  # it accepts TLS, then says nothing
    assert code == 1


async def test_an_https_server_that_is_not_derp(nursery, ca, ca_file):
    port = await serve(nursery, tls_handler(ca.issue_cert("127.0.0.1"), nginx))
    code, [report], _ = await check("-ca-file", ca_file, "-stun-port", "-1", "-http-port", "-1",
                                    f"https://127.0.0.1:{port}/")
    assert code == 1
    checks = by_name(report)
    assert checks["certificate"]["status"] == "ok"
    assert checks["derp"]["status"] == "fail"
    assert "not a DERP server" in checks["derp"]["detail"]
    assert "HTTP 200" in checks["derp"]["detail"] and "nginx" in checks["derp"]["detail"]
    assert "Upgrade: DERP" in checks["derp"]["fix"]
    assert checks["relay"]["status"] == "skip"


async def test_an_old_tls_server(nursery, ca, ca_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    handler = tls_handler(ca.issue_cert("127.0.0.1"), max_version=old)
    port = await serve(nursery, handler)
    code, [report], _ = await check("-ca-file", ca_file, "-stun-port", "-1", "-http-port", "-1",
                                    f"127.0.0.1:{port}")
    assert code == 1
    tls = by_name(report)["tls"]
    assert tls["status"] == "fail"
    assert "TLS 1.1 negotiated: too old" in tls["detail"]
    assert "enable TLS 1.2 and 1.3" in tls["fix"]


# ---- derper processes: the relay host, IP-only self-signed, DERP maps --------------------------

def self_signed_flags(tmp_path: Path) -> tuple[list[str], dict]:
    ports = {"main": free_port(), "http": free_port(), "stun": free_port(2)}
    flags = ["-hostname", "127.0.0.1", "-certmode", "manual", "-certdir",
             str(tmp_path / "certs"), "-a", f"127.0.0.1:{ports['main']}", "-http-port",
             str(ports["http"]), "-stun-port", str(ports["stun"]), "-c",
             str(tmp_path / "derper.key"), "-metrics-addr", "off"]
    return flags, ports


def derpmap(flags: list[str], fmt: str) -> str:
    done = subprocess.run([DERPER, "derpmap", "-format", fmt, *flags], capture_output=True,
                          text=True, timeout=30, check=True)
    return done.stdout


async def test_ip_only_self_signed_relay_host_and_its_maps(tmp_path):
    """One derper with a pinned self-signed IP certificate, checked on "its host" with the
    server's own flags (pin read from the certdir), and through its Headscale and Tailscale
    maps with the right pin and a wrong one."""
    flags, ports = self_signed_flags(tmp_path)
    async with derper(flags, tmp_path):
        code, [report], stderr = await check(*flags)
        assert_shape(report)
        assert code == 0, report
        assert set(statuses(report).values()) <= {"ok", "skip"}
        assert "pin sha256-raw:" in by_name(report)["certificate"]["detail"]
        assert "this host" in report["target"]

        yaml_path = tmp_path / "derp.yaml"
        yaml_path.write_text(derpmap(flags, "headscale"))
        code, [report], _ = await check("-derp-map", str(yaml_path))
        assert_shape(report)
        assert code == 0, report
        assert statuses(report)["derp_map"] == "ok"
        assert statuses(report)["certificate"] == "ok"
        assert statuses(report)["captive_portal"] == "skip"  # CanPort80 false: not port 80
        assert report["target"] == f"127.0.0.1:{ports['main']} (region 900, node 900a)"

        tailscale = json.loads(derpmap(flags, "tailscale"))
        node = tailscale["derpMap"]["Regions"]["900"]["Nodes"][0]
        node["CertName"] = "sha256-raw:" + "ab" * 32
        json_path = tmp_path / "derp.json"
        json_path.write_text(json.dumps(tailscale))
        code, [report], _ = await check("-derp-map", f"file://{json_path}")
        assert code == 1
        cert = by_name(report)["certificate"]
        assert cert["status"] == "fail"
        assert "does not match: certificate pin mismatch" in cert["detail"]
        assert "sha256-raw:" in cert["fix"]
        assert statuses(report)["derp"] == "ok"  # the rest still checked, unverified


async def test_relay_host_mode_is_read_only_and_gives_local_hints(tmp_path):
    """Nothing running, an IP -hostname with no certificate yet and no key file: the check
    creates neither, reports the closed ports with local hints, and exits 1."""
    certdir, key = tmp_path / "certs", tmp_path / "derper.key"
    port = free_port()
    code, [report], stderr = await check(
        "-timeout", TIMEOUT, "-hostname", "127.0.0.1", "-certmode", "manual", "-certdir",
        str(certdir), "-c", str(key), "-a", f"127.0.0.1:{port}", "-http-port", "-1",
        "-stun=false")
    assert code == 1
    assert not certdir.exists() and not key.exists()
    tcp = by_name(report)["tcp"]
    assert tcp["status"] == "fail"
    assert f"nothing listens on TCP {port}" in tcp["fix"]
    assert by_name(report)["stun"]["status"] == "skip"


async def test_relay_host_mode_runs_the_servers_configuration_check(tmp_path):
    code, reports, stderr = await check("-timeout", TIMEOUT, "-hostname", "127.0.0.1",
                                        "-certmode", "manual", "-certdir", str(tmp_path),
                                        "-a", f"127.0.0.1:{free_port()}", "-http-port", "-1",
                                        "-stun=false", "-home", "ftp://nope")
    assert code == 1
    assert "configuration has 1 problem" in stderr and "-home must be" in stderr
    assert len(reports) == 1


async def test_relay_host_mode_with_a_dev_server(start_server):
    server = await start_server(stun=True, stun_port=0)
    code, [report], _ = await check("-dev", "-a", f"127.0.0.1:{server.main_port}",
                                    "-stun-port", str(server.stun_port))
    assert code == 0, report
    assert report["target"] == f"http://127.0.0.1:{server.main_port} (this host's derper -dev)"
    assert statuses(report)["relay"] == statuses(report)["stun"] == "ok"


async def test_relay_host_mode_checks_dns_against_this_host(start_server, ca_file):
    """-hostname localhost on "the relay host": its A/AAAA point at this machine."""
    server = await start_server(tls=True, stun=True, stun_port=0)
    code, [report], _ = await check("-ca-file", ca_file, "-timeout", TIMEOUT, "-hostname",
                                    "localhost", "-certmode", "manual", "-a",
                                    f"localhost:{server.main_port}", "-stun-port",
                                    str(server.stun_port), "-http-port", "-1")
    dns = by_name(report)["dns"]
    assert dns["status"] == "ok" and "is on this host" in dns["detail"], dns


MAP_JSON = {"Regions": {"1000": {"RegionID": 1000, "RegionCode": "x", "Nodes": [
    {"Name": "1000a", "RegionID": 1000, "HostName": "localhost", "DERPPort": 0,
     "STUNPort": 0, "InsecureForTests": True}]}}}


async def test_map_rules_against_what_answered(start_server, tmp_path, nursery):
    """RegionID outside 900-999, STUNPort 0 where nothing answers STUN, InsecureForTests."""
    server = await start_server(tls=True)
    node = MAP_JSON["Regions"]["1000"]["Nodes"][0]
    node["DERPPort"] = server.main_port
    path = tmp_path / "map.json"
    path.write_text(json.dumps(MAP_JSON))
    code, [report], _ = await check("-timeout", TIMEOUT, "-derp-map", str(path))
    assert_shape(report)
    checks = by_name(report)
    assert checks["certificate"]["status"] == "warn"  # not checked: InsecureForTests
    assert checks["derp"]["status"] == "ok" and checks["relay"]["status"] == "ok"
    assert checks["stun"]["status"] == "fail"
    derp_map = checks["derp_map"]
    assert derp_map["status"] == "warn"
    for text in ("outside 900-999", "STUNPort 0 means the default port 3478",
                 "InsecureForTests"):
        assert text in derp_map["detail"]
    assert code == 1  # the stun failure

    node["STUNPort"] = -1  # and the map fetched over HTTP, as Headscale's derp.urls does
    body = json.dumps(MAP_JSON).encode()

    async def map_server(stream):
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                              + body)

    port = await serve(nursery, map_server)
    code, [report], _ = await check("-timeout", TIMEOUT, "-derp-map",
                                    f"http://127.0.0.1:{port}/derp.json")
    assert code == 0
    assert by_name(report)["stun"]["status"] == "skip"
    assert "STUNPort" not in by_name(report)["derp_map"]["detail"]


async def test_headscale_keys_must_be_lower_case(tmp_path):
    path = tmp_path / "derp.yaml"
    path.write_text("regions:\n  900:\n    regionid: 900\n    regioncode: x\n    nodes:\n"
                    "      - name: 900a\n        regionid: 900\n        HostName: 127.0.0.1\n")
    code, [report], _ = await check("-timeout", TIMEOUT, "-derp-map", str(path))
    assert code == 1
    derp_map = by_name(report)["derp_map"]
    assert derp_map["status"] == "fail"
    assert "Headscale ignores 'HostName'" in derp_map["detail"]
    assert "'hostname'" in derp_map["fix"]


async def test_unreadable_maps_fail(tmp_path):
    code, [report], _ = await check("-derp-map", str(tmp_path / "missing.json"))
    assert code == 1 and statuses(report) == {"derp_map": "fail"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: &anchor\n")
    code, [report], _ = await check("-derp-map", str(bad))
    assert code == 1 and "not supported" in by_name(report)["derp_map"]["detail"]


@pytest.mark.parametrize("args", [["a", "b"], ["-derp-map", "x", "host"], ["ftp://host"],
                                  ["-timeout", "0", "host"], ["-hostname", "x", "host"], [],
                                  ["http://host"], ["-ca-file", "/nonexistent", "host"],
                                  ["-stun-port", "70000", "host"]])
def test_usage_errors_exit_2(args, capsys):
    assert check_command.run(args, {}) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("derper check: ")


def test_help_has_examples():
    done = subprocess.run([DERPER, "check", "-h"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "derper check derp.example.com" in done.stdout
    assert "-derp-map" in done.stdout and "-stun-port" in done.stdout
