"""The pure side of ``derper check``: verdicts, DERP map rules, the YAML subset, local hints."""

from __future__ import annotations

import datetime
import json

import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from derper.check import local, results, yaml_subset
from derper.check.derpmap_rules import Answers, MapError, load_map, node_check
from derper.check.results import Attempt, Leaf, Report, StunAttempt
from derper.cli.check import parse_target
from derper.cli.goflags import UsageError
from derper.config import Config
from derper.derpmap import MapOptions, build, headscale_yaml
from derper.proto import metacert

NOW = datetime.datetime(2026, 1, 10, tzinfo=datetime.timezone.utc)


def leaf(days_left: float, lifetime: float = 90, names=("derp.example.com",)) -> Leaf:
    after = NOW + datetime.timedelta(days=days_left)
    return Leaf("sha256-raw:" + "00" * 32, "derp.example.com", "R11", tuple(names),
                after - datetime.timedelta(days=lifetime), after, False)


# ---- results -----------------------------------------------------------------------------------

@pytest.mark.parametrize("days_left, lifetime, status", [
    (60, 90, "ok"), (14.5, 90, "ok"), (13.5, 90, "warn"), (1, 90, "warn"),
    (5, 6.5, "ok"),  # a 6-day Let's Encrypt IP certificate, freshly renewed
    (1.5, 6.5, "warn"),  # renewal at a third of its life is overdue
])
def test_expiry_warns_under_14_days_short_lived_at_a_third(days_left, lifetime, status):
    check = results.certificate_check(leaf(days_left, lifetime), "derp.example.com", NOW)
    assert check.status == status
    assert (check.fix is not None) == (status == "warn")


@pytest.mark.parametrize("code, message, words", [
    (10, "certificate has expired", "expired on"),
    (9, "certificate is not yet valid", "not valid before"),
    (62, "Hostname mismatch", "is for derp.example.com, not other.example.com"),
    (20, "unable to get local issuer certificate", "not trusted: issued by R11"),
])
def test_verification_errors_each_have_their_words_and_fix(code, message, words):
    check = results.certificate_check(leaf(-3 if code == 10 else 30), "other.example.com", NOW,
                                      verify_error=(code, message))
    assert check.status == "fail" and words in check.detail and check.fix


def test_a_pin_for_a_dns_hostname_must_also_name_it():
    good = leaf(30)
    ok = results.certificate_check(good, "derp.example.com", NOW, pin=good.pin)
    assert ok.status == "ok" and "matched" in ok.detail
    wrong = results.certificate_check(good, "other.example.com", NOW, pin=good.pin)
    assert wrong.status == "fail" and "not other.example.com" in wrong.detail
    mismatch = results.certificate_check(good, "203.0.113.7", NOW, pin="sha256-raw:" + "1" * 64,
                                         pin_problem="certificate pin mismatch: server has x")
    assert mismatch.status == "fail" and good.pin in mismatch.fix


def test_leaf_of_skips_the_meta_certificate():
    cert = trustme.CA().issue_cert("derp.example.com", "203.0.113.7")
    der, meta = (x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
                 for pem in (cert.cert_chain_pems[0].bytes(), metacert.build(b"\x01" * 32)))
    found = results.leaf_of([meta, der])
    assert found.names == ("derp.example.com", "203.0.113.7")
    assert results.covers(found, "DERP.example.com.") and results.covers(found, "203.0.113.7")
    assert not results.covers(found, "x.derp.example.com")
    assert results.leaf_of([meta]) is None
    ok = results.fast_start_check("TLSv1.3", [der, meta])
    assert ok.status == "ok" and "0101010101010101" in ok.detail
    assert results.fast_start_check("TLSv1.2", [der, meta]).status == "warn"
    assert results.fast_start_check("TLSv1.3", [der]).status == "warn"


def test_tcp_and_stun_per_family():
    v4, v6 = Attempt("203.0.113.7", 443, 0.01), Attempt("2001:db8::7", 443, error="refused")
    assert results.tcp_check([v4]).status == "ok"
    partial = results.tcp_check([v4, v6], hint="HINT")
    assert partial.status == "warn" and "[2001:db8::7]:443 refused" in partial.detail
    assert partial.fix.endswith("HINT")
    assert results.tcp_check([v6]).status == "fail"
    assert results.stun_check([StunAttempt("203.0.113.7", 3478, 0.01, ("198.51.100.1", 4))]) \
        .status == "ok"
    assert results.stun_check([StunAttempt("203.0.113.7", 3478, error="no answer")]) \
        .status == "fail"


def test_dns_on_the_relay_host():
    host, records = "derp.example.com", ["203.0.113.7"]
    assert results.dns_check(host, records, "").status == "ok"
    assert results.dns_check(host, [], "Name or service not known").status == "fail"
    assert results.dns_check("203.0.113.7", [], "").status == "skip"
    here = results.dns_check(host, records, "", local=set(), public=["203.0.113.7"])
    assert here.status == "ok" and "learned over STUN" in here.detail
    elsewhere = results.dns_check(host, records, "", local=set(), public=["198.51.100.9"])
    assert elsewhere.status == "fail" and "198.51.100.9" in elsewhere.fix
    assert results.dns_check(host, records, "", local=set(), public=[]).status == "warn"
    assert results.dns_check(host, records, "", local={"203.0.113.7"}, public=[]).status == "ok"


def test_render_exit_status_and_json():
    fine = Report("a", [results.Check("tcp", "ok", "fine")])
    warned = Report("b", [results.Check("relay", "warn", "refused", "nothing to fix")])
    failed = Report("c", [results.Check("tcp", "fail", "refused", "open it")])
    assert results.exit_status([fine, warned]) == 0
    assert results.exit_status([fine, failed]) == 1
    text = results.render(failed)
    assert text.splitlines() == ["derper check c", "  FAIL  tcp             refused",
                                 "        fix: open it"]
    assert "fix:" not in results.render(fine)
    assert failed.as_json() == {"target": "c", "checks": [
        {"name": "tcp", "status": "fail", "detail": "refused", "fix": "open it"}]}


def test_tls_errors_are_told_apart():
    assert "does not speak TLS" in results.tls_check(None, None, "WRONG_VERSION_NUMBER").detail
    assert "no TLS version" in results.tls_check(None, None, "UNSUPPORTED_PROTOCOL").detail
    assert "no answer" in results.tls_check(None, None, "timeout: 1s").detail
    assert "closed" in results.tls_check(None, None, "closed").detail
    assert results.tls_check("TLSv1.2", "ECDHE", "").status == "ok"


# ---- DERP maps ---------------------------------------------------------------------------------

def our_map(**node) -> dict:
    config = Config(hostname="derp.example.com", stun_port=3479, addr=":8443")
    derp_map = build(config, None, MapOptions(region_code="myderp"))
    derp_map["Regions"]["900"]["Nodes"][0].update(node)
    return derp_map


def problems(text: str, answers: Answers = Answers()) -> tuple[str, str]:
    _, nodes, top = load_map(text)
    node = nodes[0]
    node.problems = top + node.problems
    check = node_check(node, answers)
    return check.status, check.detail


def test_our_maps_pass_in_both_formats():
    derp_map = our_map()
    for text in (json.dumps(derp_map), json.dumps({"derpMap": derp_map}),
                 headscale_yaml(derp_map)):
        fmt, [node], top = load_map(text)
        assert top == [] and node.problems == []
        assert (node.hostname, node.derp_port, node.stun_port) == ("derp.example.com", 8443, 3479)
        assert node_check(node, Answers(("203.0.113.7",), True, None)).status == "ok"


def test_json_keys_are_case_insensitive_yaml_keys_lower_case():
    text = json.dumps({"regions": {"900": {"regionid": 900, "REGIONCODE": "x", "nodes": [
        {"name": "a", "RegionId": 900, "hostName": "derp.example.com"}]}}})
    assert problems(text)[0] == "ok"
    yaml_text = headscale_yaml(our_map()).replace("stunport:", "STUNPort:")
    status, detail = problems(yaml_text)
    assert status == "fail" and "Headscale ignores 'STUNPort'" in detail


@pytest.mark.parametrize("change, status, words", [
    ({"RegionID": 901}, "fail", "has RegionID 901 in region 900"),
    ({"HostName": "https://derp.example.com:8443"}, "fail", "not a bare DNS name"),
    ({"HostName": ""}, "fail", "no HostName"),
    ({"CertName": "sha256-raw:abc"}, "fail", "64 hex"),
    ({"CertName": "not a name"}, "fail", "neither a sha256-raw: pin nor a DNS name"),
    ({"IPv4": "198.51.100.9"}, "warn", "not among derp.example.com's addresses"),
    ({"IPv4": "derp"}, "fail", "is not an IPv4 address"),
    ({"IPv4": "none", "IPv6": "none"}, "fail", "both IPv4 and IPv6 are off"),
    ({"STUNPort": -2}, "fail", "STUNPort -2 is not a port"),
    ({"STUNPort": -1, "STUNOnly": True}, "fail", "serves nothing"),
    ({"InsecureForTests": True}, "warn", "InsecureForTests"),
    ({"CanPort80": True}, "warn", "CanPort80 is true"),
    ({"Hostnme": "x"}, "warn", "unknown key 'Hostnme'"),
    ({"DERPPort": "443"}, "fail", "DERPPort in region 900 node #1 must be a number"),
])
def test_node_rules(change, status, words):
    answers = Answers(("203.0.113.7",), True, False)
    got, detail = problems(json.dumps(our_map(**change)), answers)
    assert (got, words in detail) == (status, True), detail


def test_region_rules_and_stun_port_zero():
    derp_map = our_map(STUNPort=0)
    derp_map["Regions"]["1000"] = derp_map["Regions"].pop("900")
    status, detail = problems(json.dumps(derp_map), Answers((), False, None))
    assert status == "fail" and "region 1000 has RegionID 900" in detail
    derp_map["Regions"]["1000"]["RegionID"] = 1000
    derp_map["Regions"]["1000"]["Nodes"][0]["RegionID"] = 1000
    status, detail = problems(json.dumps(derp_map), Answers((), False, None))
    assert status == "warn" and "outside 900-999" in detail
    assert "STUNPort 0 means the default port 3478" in detail
    assert "STUNPort 0" not in problems(json.dumps(derp_map), Answers((), True, None))[1]


def test_duplicate_node_names_and_maps_that_are_not_maps():
    derp_map = our_map()
    nodes = derp_map["Regions"]["900"]["Nodes"]
    nodes.append(dict(nodes[0]))
    _, found, _ = load_map(json.dumps(derp_map))
    assert all("used twice" in p.detail for n in found for p in n.problems)
    for text in ("[1, 2]", '{"Regions": {}}', "{broken", "just: text\n", "- a\n- b\n"):
        with pytest.raises(MapError):
            load_map(text)


# ---- the YAML subset ---------------------------------------------------------------------------

HEADSCALE_DOCS = """\
# from Headscale's docs (derp-example.yaml)
regions:
  900:
    regionid: 900
    regioncode: custom
    regionname: My Region
    nodes:
      - name: 900a
        regionid: 900
        hostname: myderp.mydomain.no
        ipv4: 123.123.123.123
        ipv6: "2604:a880:400:d1::828:b001"
        stunport: 0
        stunonly: false
        derpport: 0
  901:
    regionid: 901
    nodes:
    - name: 901a   # a sequence at the key's own indentation
      hostname: 'it''s.example.com'
      canport80: true
  1: null
"""


@pytest.mark.parametrize("text", [HEADSCALE_DOCS, headscale_yaml(our_map()),
                                  headscale_yaml(our_map(CertName="sha256-raw:" + "a" * 64))])
def test_yaml_subset_reads_what_pyyaml_reads(text):
    def stringify(obj):
        if isinstance(obj, dict):
            return {str(k): stringify(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [stringify(v) for v in obj]
        return obj

    assert yaml_subset.load(text) == stringify(yaml.safe_load(text))


@pytest.mark.parametrize("text, words", [
    ("a:\n\tb: 1\n", "tabs"),
    ("a: &x 1\n", "not supported"),
    ("a: [1, 2]\n", "not supported"),
    ("a: 1\na: 2\n", "appears twice"),
    ("a: 1\n   b: 2\n", "indentation"),
    ("a: 1\n---\nb: 2\n", "one YAML document"),
    ("a: \"x\" y\n", "after a quoted string"),
    ("just text\n", "expected"),
])
def test_yaml_subset_refuses_what_it_does_not_read(text, words):
    with pytest.raises(yaml_subset.YAMLError, match=words):
        yaml_subset.load(text)


def test_yaml_headscale_map_loads_with_region_null_and_quotes():
    fmt, nodes, top = load_map(HEADSCALE_DOCS)
    assert fmt == "yaml" and [n.name for n in nodes] == ["900a", "901a"]
    assert nodes[0].node["ipv6"] == "2604:a880:400:d1::828:b001"
    assert nodes[1].hostname == "it's.example.com"


# ---- local hints -------------------------------------------------------------------------------

PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:24F5 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1
"""
PROC_UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue
  12: 00000000000000000000000000000000:0D96 00000000000000000000000000000000:0000 07 00000000
"""
UFW = """\
Status: active
Logging: on (low)
Default: deny (incoming), allow (outgoing), disabled (routed)
New profiles: skip

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW IN    Anywhere
443/tcp                    ALLOW IN    Anywhere
8000:8100/tcp              ALLOW IN    Anywhere
3478/udp                   DENY IN     Anywhere
80                         ALLOW IN    Anywhere
443/tcp (v6)               ALLOW IN    Anywhere (v6)
"""


def test_proc_net_tables():
    assert local.listening_ports(PROC_TCP, udp=False) == {443}  # 9461 is an open connection
    assert local.listening_ports(PROC_UDP6, udp=True) == {3478}


@pytest.mark.parametrize("port, proto, allowed", [
    (443, "tcp", True), (443, "udp", False), (8050, "tcp", True), (3478, "udp", False),
    (80, "tcp", True), (80, "udp", True), (9999, "tcp", False)])
def test_ufw_rules(port, proto, allowed):
    assert local.ufw_allows(UFW, port, proto) is allowed


def test_hints_in_words():
    assert local.ufw_allows("Status: inactive\n", 443, "tcp") is None
    text = local.hint("udp", 3478, {443}, UFW)
    assert "nothing listens on UDP 3478" in text and "sudo ufw allow 3478/udp" in text
    assert "block is between here and the internet" in local.hint("tcp", 443, {443}, None)
    assert "run the check as root" in local.hint("tcp", 443, None, "")
    assert local.hint("tcp", 443, None, None) == ""


# ---- TARGET ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("derp.example.com", ("derp.example.com", 443, True)),
    ("derp.example.com:8443", ("derp.example.com", 8443, True)),
    ("https://derp.example.com", ("derp.example.com", 443, True)),
    ("https://derp.example.com:8443/derp", ("derp.example.com", 8443, True)),
    ("http://127.0.0.1:3340", ("127.0.0.1", 3340, False)),
    ("[2001:db8::7]:8443", ("2001:db8::7", 8443, True)),
    ("2001:db8::7", ("2001:db8::7", 443, True)),
    ("https://[2001:db8::7]", ("2001:db8::7", 443, True)),
])
def test_targets(text, parsed):
    assert parse_target(text) == parsed


@pytest.mark.parametrize("text", ["ftp://x", "http://x", "https://", "x:99999", ":443"])
def test_bad_targets(text):
    with pytest.raises(UsageError):
        parse_target(text)
