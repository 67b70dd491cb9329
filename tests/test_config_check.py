"""The configuration check: every problem at once, nothing made; and construction that follows it.

Start-up's effects (the self-signed certificate, the ACME account key, the printed node) happen
in ``Server.prepare()``, which ``run()`` calls, never in the check or the constructor.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from derper.certs.acme_order import ACCOUNT_KEY_FILE
from derper.config import Config
from derper.config_check import ConfigProblems, check
from derper.errors import ConfigError
from derper.proto.keys import KeyPair
from derper.server import Server
from tests.conftest import BASE, write_cert


def messages(config: Config) -> list[str]:
    problems = check(config)
    assert all(isinstance(p, ConfigError) for p in problems)
    return [str(p) for p in problems]


def test_three_independent_mistakes_are_all_reported(tmp_path):
    config = replace(BASE, addr="nonsense", bandwidth_limit="fast", max_clients=-1)
    found = messages(config)
    assert len(found) == 3, found
    assert found[0].startswith("-a: bad listen address 'nonsense'")
    assert found[1].startswith("-bandwidth-limit: invalid rate 'fast'")
    assert found[2] == "-max-clients and -max-handshakes must be 0 (no cap) or positive"
    with pytest.raises(ConfigProblems) as raised:
        Server(config, KeyPair.generate())
    assert [str(p) for p in raised.value.problems] == found
    text = str(raised.value)
    assert text.startswith("3 problems with the configuration:\n")
    assert all(f"  - {m}" in text for m in found)


def test_a_single_problem_reads_as_itself():
    config = replace(BASE, debug_allow_cidrs="ten")
    with pytest.raises(ConfigError) as raised:
        Server(config, KeyPair.generate())
    assert str(raised.value) == messages(config)[0]
    assert str(raised.value).startswith("-debug-allow-cidrs: 'ten' is not an IP prefix")


def test_wrapped_errors_keep_their_cause():
    [problem] = check(replace(BASE, bandwidth_limit="fast"))
    assert isinstance(problem.__cause__, ValueError)
    assert not isinstance(problem.__cause__, ConfigError)


def test_files_are_read_for_problems(tmp_path):
    rate, keys, bundle = tmp_path / "rate.json", tmp_path / "keys", tmp_path / "nope.pem"
    rate.write_text("{not json")
    keys.write_text("nodekey:1234\n")
    found = messages(replace(BASE, rate_config=str(rate), allow_keys=str(keys),
                             acme_webroot=str(tmp_path / "missing")))
    assert [m.split(" ")[0] for m in found] == ["-rate-config", "-allow-keys", "-acme-webroot",
                                               "-acme-webroot"]
    assert "line 1" in found[1] and "not a directory" in found[2]
    assert "-http-port" in found[3]  # -dev serves no HTTP helper for the webroot
    found = messages(Config(addr="127.0.0.1:0", hostname="203.0.113.7", http_port=-1,
                            acme_directory="http://ca/dir", acme_ca_bundle=str(bundle),
                            certdir=str(tmp_path / "certs")))
    assert len(found) == 4, found
    assert "add -acme-ip-certs" in found[0]
    assert "-http-port -1 turns it off" in found[1]
    assert "-acme-directory must be an https://" in found[2]
    assert f"-acme-ca-bundle {bundle}: no such file" in found[3]


def test_acme_check_makes_nothing_and_prepare_makes_the_account_key(tmp_path):
    certdir = tmp_path / "certs"
    config = Config(addr="127.0.0.1:0", hostname="derp.example.com", http_port=0, stun=False,
                    metrics_addr="", certdir=str(certdir))
    assert check(config) == []
    server = Server(config, KeyPair.generate())
    assert not certdir.exists()
    server.prepare()
    assert (certdir / ACCOUNT_KEY_FILE).is_file()
    (certdir / ACCOUNT_KEY_FILE).write_text("garbage")
    assert [str(p) for p in check(config)] == [
        f"{certdir / ACCOUNT_KEY_FILE} is not a PEM private key; remove it to create a new "
        "ACME account"]
    (tmp_path / "file").write_text("")
    blocked = replace(config, certdir=str(tmp_path / "file" / "certs"))
    assert messages(blocked) == [f"cannot write to -certdir {tmp_path}/file/certs (Not a "
                                 "directory); derper keeps its ACME account key and "
                                 "certificates there: make it a directory derper can write, "
                                 "or choose another -certdir"]


def test_ip_certificate_is_made_and_printed_at_start_up_not_construction(tmp_path, capsys):
    certdir = tmp_path / "certs"
    config = Config(addr="127.0.0.1:0", hostname="127.0.0.1", certmode="manual",
                    certdir=str(certdir), http_port=-1, stun=False, metrics_addr="")
    assert check(config) == []
    server = Server(config, KeyPair.generate())
    assert not certdir.exists() and server.tls.context is None
    assert capsys.readouterr().out == ""
    server.prepare()
    node = json.loads(capsys.readouterr().out)
    assert node["CertName"] == server.tls.bundle.pin and node["HostName"] == "127.0.0.1"
    assert server.tls.context is not None
    (certdir / "127.0.0.1.key").unlink()
    [problem] = check(config)
    assert "127.0.0.1.crt exists but" in str(problem)


def test_manual_certificate_problems(tmp_path, ca):
    certdir = tmp_path / "certs"
    config = replace(BASE, dev=False, certmode="manual", hostname="derp.example.com",
                     certdir=str(certdir))
    [problem] = check(config)
    assert f"-certmode manual needs {certdir}/derp.example.com.crt" in str(problem)
    webroot = tmp_path / "webroot"
    webroot.mkdir()
    assert check(replace(config, acme_webroot=str(webroot), http_port=0)) == []  # waits
    write_cert(ca, certdir, "other.example.com")
    (certdir / "other.example.com.crt").rename(certdir / "derp.example.com.crt")
    (certdir / "other.example.com.key").rename(certdir / "derp.example.com.key")
    [problem] = check(config)
    assert "not valid for -hostname derp.example.com" in str(problem)


def test_mesh_with_needs_a_mesh_key():
    config = replace(BASE, mesh_with="derp1.example.com,derp2.example.com")
    [problem] = check(config)
    assert "-mesh-with needs the region's mesh key" in str(problem)
    assert "openssl rand -hex 32" in str(problem)
    assert check(config, mesh_key=bytes(range(32))) == []  # e.g. TAILSCALE_DERPER_MESH_KEY
    assert check(replace(config, mesh_psk_file="/etc/derper/mesh.key")) == []
    with pytest.raises(ConfigProblems, match="needs the region's mesh key"):
        Server(config, KeyPair.generate())


def test_mesh_problems_are_reported_together():
    config = replace(BASE, mesh_with="a:notaport,b@sha256-raw:zz", mesh_dns_server="nope",
                     mesh_resolve_interval=0)
    text = [str(p) for p in check(config, mesh_key=bytes(32))]
    assert len(text) == 3
    assert "bad port 'notaport'" in text[0]
    assert text[1].startswith("-mesh-dns-server: ") and "-mesh-resolve-interval" in text[2]
