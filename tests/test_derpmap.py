"""``derper derpmap``: the DERP map for Headscale (YAML) and Tailscale (JSON), parsed back and
checked field by field against spec §8 and the certificate on disk."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from derper.certs.bundle import ensure_ip_cert
from derper.cli import derpmap as cmd_derpmap
from derper.config import Config
from derper.derpmap import MapOptions, build, headscale_yaml
from tests.process import run_derper

IP = "203.0.113.7"


def derpmap(capsys, argv: list[str], environ: dict | None = None) -> tuple[int, str, str]:
    code = cmd_derpmap.run(argv, environ or {})
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ip_certdir(tmp_path):
    ensure_ip_cert(tmp_path, IP)
    leaf = x509.load_pem_x509_certificate((tmp_path / f"{IP}.crt").read_bytes())
    pin = "sha256-raw:" + hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    return tmp_path, pin


def test_headscale_yaml_for_an_ip_relay_pins_its_self_signed_certificate(capsys, ip_certdir):
    certdir, pin = ip_certdir
    code, out, err = derpmap(capsys, ["-hostname", IP, "-certmode", "manual",
                                      "-certdir", str(certdir), "-format", "headscale"])
    assert code == 0, err
    assert "urls: []" in out  # the advice for replacing Tailscale's relays
    parsed = yaml.safe_load(out)
    assert list(parsed) == ["regions"] and list(parsed["regions"]) == [900]  # integer key
    region = parsed["regions"][900]
    assert region == {"regionid": 900, "regioncode": "derper", "regionname": f"derper {IP}",
                      "nodes": region["nodes"]}
    assert region["nodes"] == [{"name": "900a", "regionid": 900, "hostname": IP,
                                "certname": pin, "ipv4": IP, "ipv6": "none", "stunport": 3478,
                                "derpport": 443, "canport80": True}]


def test_tailscale_json_from_the_environment_on_custom_ports(capsys):
    environ = {"DERP_DOMAIN": "derp.example.com", "DERP_ADDR": ":8443",
               "DERP_STUN_PORT": "3479", "DERP_HTTP_PORT": "-1", "DERP_IPV4": "198.51.100.4",
               "DERP_IPV6": "2001:db8::4", "DERP_REGION_ID": "901",
               "DERP_REGION_CODE": "sha", "DERP_REGION_NAME": "Shanghai",
               "DERP_OMIT_DEFAULT_REGIONS": "true", "DERP_MAP_FORMAT": "tailscale"}
    code, out, err = derpmap(capsys, [], environ)
    assert code == 0, err
    derp_map = json.loads(out)["derpMap"]
    assert derp_map["omitDefaultRegions"] is True
    assert list(derp_map["Regions"]) == ["901"]
    region = derp_map["Regions"]["901"]
    assert (region["RegionID"], region["RegionCode"], region["RegionName"]) == \
        (901, "sha", "Shanghai")
    # Letsencrypt (the default mode): a CA-issued certificate, so no CertName; no port-80
    # helper, so no CanPort80.
    assert region["Nodes"] == [{"Name": "901a", "RegionID": 901, "HostName": "derp.example.com",
                                "IPv4": "198.51.100.4", "IPv6": "2001:db8::4",
                                "STUNPort": 3479, "DERPPort": 8443}]


def test_yaml_and_json_describe_the_same_map(capsys, ip_certdir):
    certdir, _ = ip_certdir
    args = ["-hostname", IP, "-certmode", "manual", "-certdir", str(certdir), "-stun=false"]
    _, out_json, _ = derpmap(capsys, args + ["-format", "json"])
    _, out_yaml, _ = derpmap(capsys, args)  # headscale is the default

    def lower(value):
        if isinstance(value, dict):
            return {(k.lower() if isinstance(k, str) else k): lower(v) for k, v in value.items()}
        return [lower(v) for v in value] if isinstance(value, list) else value

    from_json = lower(json.loads(out_json))
    from_json["regions"] = {int(k): v for k, v in from_json["regions"].items()}
    assert yaml.safe_load(out_yaml) == from_json
    assert from_json["regions"][900]["nodes"][0]["stunport"] == -1  # -stun=false: no STUN


def test_yaml_strings_survive_quotes_colons_and_unicode():
    name = 'My "DERP": 上海 #1 \\ yes'
    derp_map = build(Config(hostname="2001:db8::9", certmode="manual"), "sha256-raw:" + "a" * 64,
                     MapOptions(region_name=name, region_id=999, region_code="on"))
    region = yaml.safe_load(headscale_yaml(derp_map))["regions"][999]
    assert region["regionname"] == name and region["regioncode"] == "on"  # not the boolean
    node = region["nodes"][0]
    assert (node["hostname"], node["ipv6"], node["ipv4"]) == ("2001:db8::9", "2001:db8::9", "none")


def test_a_region_of_several_nodes(capsys, ip_certdir):
    """This relay plus two more: an IP node with its own pin, and one with a CA certificate."""
    certdir, pin = ip_certdir
    other_pin = "sha256-raw:" + "AB" * 32
    code, out, err = derpmap(capsys, ["-hostname", IP, "-certmode", "manual",
                                      "-certdir", str(certdir), "-format", "json",
                                      "-nodes", f"203.0.113.8@{other_pin}, derp2.example.com"])
    assert code == 0, err
    nodes = json.loads(out)["Regions"]["900"]["Nodes"]
    assert [n["Name"] for n in nodes] == ["900a", "900b", "900c"]
    assert nodes[0]["CertName"] == pin
    assert nodes[1] == {"Name": "900b", "RegionID": 900, "HostName": "203.0.113.8",
                        "CertName": other_pin.lower(), "IPv4": "203.0.113.8", "IPv6": "none",
                        "STUNPort": 3478, "DERPPort": 443, "CanPort80": True}
    assert nodes[2] == {"Name": "900c", "RegionID": 900, "HostName": "derp2.example.com",
                        "STUNPort": 3478, "DERPPort": 443, "CanPort80": True}
    code, out, err = derpmap(capsys, ["-hostname", IP, "-certmode", "manual", "-certdir",
                                      str(certdir), "-format", "headscale", "-nodes",
                                      "derp2.example.com"])
    assert [n["hostname"] for n in yaml.safe_load(out)["regions"][900]["nodes"]] == [
        IP, "derp2.example.com"]


@pytest.mark.parametrize("args, message", [
    ([], "set -hostname"),
    (["-hostname", IP, "-certmode", "manual"], "start derper once"),
    (["-hostname", "d.example", "-region-id", "5"], "900-999"),
    (["-hostname", "d.example", "-region-code", "two words"], "one word"),
    (["-hostname", "d.example", "-ipv4", "2001:db8::1"], "-ipv4 must be an IPv4 address"),
    (["-hostname", "d.example", "-ipv6", "example"], "-ipv6 must be an IPv6 address"),
    (["-hostname", "d.example", "-dev"], "plain HTTP"),
    (["-hostname", "d.example", "-a", ":0"], "fixed port"),
    (["-hostname", "d.example", "-format", "toml"], "-format must be one of"),
    (["-hostname", "d.example", "-nodes", "d2.example@sha256-raw:12"], "-nodes entry"),
])
def test_wrong_settings_say_what_to_change(capsys, tmp_path, args, message):
    args = args + ["-certdir", str(tmp_path)]
    code, out, err = derpmap(capsys, args)
    assert (code, out) == (1, "") and message in err, err


def test_unknown_flag_is_a_usage_error(capsys):
    code, _, err = derpmap(capsys, ["-hostname", "d.example", "-bogus"])
    assert code == 2 and "-bogus" in err and "derper derpmap -h" in err


def test_command_dispatch_keeps_plain_derper_meaning_serve():
    listed = run_derper(["-h"])
    assert listed.returncode == 0 and "derper derpmap [flags]" in listed.stdout
    assert run_derper(["-version"]).stdout.startswith("derper ")
    helped = run_derper(["derpmap", "-h"])
    assert helped.returncode == 0 and "-region-id" in helped.stdout and "-hostname" in helped.stdout
    made = run_derper(["derpmap", "-format", "json"], env={"DERP_DOMAIN": "derp.example.com"})
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["Regions"]["900"]["Nodes"][0]["HostName"] == \
        "derp.example.com"
    assert run_derper(["derpmap", "serve"]).returncode == 2  # no stray arguments


def test_behind_a_proxy_the_map_names_the_proxys_tls_port(capsys):
    code, out, err = derpmap(capsys, ["-hostname", "derp.example.com", "-certmode", "none",
                                      "-a", "127.0.0.1:3340", "-format", "tailscale"])
    assert code == 0, err
    [node] = json.loads(out)["derpMap"]["Regions"]["900"]["Nodes"]
    assert (node["DERPPort"], node["STUNPort"]) == (443, 3478)
    assert "CertName" not in node and "CanPort80" not in node
