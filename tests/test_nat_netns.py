"""``derper nat`` and the RFC 5780 server through a real NAT: the kernel's, in network namespaces.

client (192.0.2.2) -- router (192.0.2.1 | 203.0.113.254, MASQUERADE) -- server (203.0.113.1 and
203.0.113.2). Plain MASQUERADE keeps the source port and shares the mapping between destinations
(endpoint-independent mapping) but lets in only replies from where the client sent
(address-and-port-dependent filtering); ``--random-fully`` gives every destination its own
random port (address-and-port-dependent mapping). coturn is the independent party both ways:
its RFC 5780 client against our server, our client against its server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.system import require_binary

PRIMARY, ALTERNATE, ROUTER_OUT = "203.0.113.1", "203.0.113.2", "203.0.113.254"
OURS, COTURN, PLAIN = (3478, 3479), (3578, 3579), 3678  # (STUN port, alternate port)
EI, APD = "endpoint-independent", "address-and-port-dependent"
EXPECTED_MAPPING = {"masquerade": EI, "random-fully": APD}
_TAG = f"dn{os.getpid() % 100000}"


def _run(*cmd: str, ns: str | None = None, check: bool = True,
         timeout: float = 30) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run(prefix + list(cmd), capture_output=True, text=True, check=check,
                          timeout=timeout)


class Net:
    """The three namespaces; ``kind`` is "masquerade" or "random-fully"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.client, self.router, self.server = (f"{_TAG}{r}{kind[0]}" for r in "crs")
        self.procs: list[subprocess.Popen] = []

    def build(self) -> None:
        for ns in (self.client, self.router, self.server):
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "set", "lo", "up", ns=ns)
        c, r = self.client, self.router
        _run("ip", "link", "add", "in0", "netns", c, "type", "veth", "peer", "name", "in1",
             "netns", r)
        _run("ip", "link", "add", "out0", "netns", r, "type", "veth", "peer", "name", "out1",
             "netns", self.server)
        for ns, dev, cidrs in ((c, "in0", ["192.0.2.2/24"]), (r, "in1", ["192.0.2.1/24"]),
                               (r, "out0", [f"{ROUTER_OUT}/24"]),
                               (self.server, "out1", [f"{PRIMARY}/24", f"{ALTERNATE}/24"])):
            for cidr in cidrs:
                _run("ip", "addr", "add", cidr, "dev", dev, ns=ns)
            _run("ip", "link", "set", dev, "up", ns=ns)
        _run("ip", "route", "add", "default", "via", "192.0.2.1", ns=c)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=r)
        extra = ["--random-fully"] if self.kind == "random-fully" else []
        _run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "out0", "-j", "MASQUERADE",
             *extra, ns=r)

    def start(self, *cmd: str, ready: str) -> subprocess.Popen:
        """``cmd`` in the server namespace, once its output shows ``ready`` (within 10 s)."""
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(["ip", "netns", "exec", self.server, *cmd], stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            log.seek(0)
            seen = log.read()
            if ready in seen:
                return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(proc)
                pytest.fail(f"{cmd[0]} did not start:\n{seen}")
            time.sleep(0.05)

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cleanup(self) -> None:
        for proc in self.procs:
            self.stop(proc)
        for ns in (self.client, self.router, self.server):
            _run("ip", "netns", "del", ns, check=False)


def _require_namespaces() -> None:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    probe = f"{_TAG}probe"
    if _run("ip", "netns", "add", probe, check=False).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    _run("ip", "netns", "del", probe, check=False)


@pytest.fixture(scope="module", params=list(EXPECTED_MAPPING))
def net(request):
    _require_namespaces()
    require_binary("iptables", "iptables")
    net = Net(request.param)
    try:
        net.build()
        yield net
    finally:
        net.cleanup()


@pytest.fixture(scope="module")
def our_server(net):
    proc = derper(net, PRIMARY, OURS[0], "-stun-alt-port", str(OURS[1]), "-stun-alt-ip",
                  ALTERNATE)
    yield
    net.stop(proc)


@pytest.fixture(scope="module")
def plain_servers(net):
    """Two derpers without RFC 5780, one on each server address: two plain STUN servers."""
    procs = [derper(net, ip, PLAIN) for ip in (PRIMARY, ALTERNATE)]
    yield
    for proc in procs:
        net.stop(proc)


def derper(net: Net, ip: str, stun_port: int, *flags: str) -> subprocess.Popen:
    return net.start(sys.executable, "-m", "derper", "-dev", "-a", f"{ip}:{stun_port}",
                     "-metrics-addr", "off", "-stun-port", str(stun_port), *flags,
                     ready="derper listening")


@pytest.fixture(scope="module")
def coturn(net, tmp_path_factory):
    """coturn as a STUN-only RFC 5780 server on both addresses; its files in a temp dir."""
    binary = require_binary("turnserver", "coturn")
    tmp = tmp_path_factory.mktemp("coturn")
    proc = net.start(binary, "-v", "-S", "-z", "-n", "--no-cli", "--no-tls", "--no-dtls",
                     "-L", PRIMARY, "-L", ALTERNATE, "-p", str(COTURN[0]),
                     "--alt-listening-port", str(COTURN[1]), "--log-file", "stdout",
                     "--simple-log", "--pidfile", str(tmp / "pid"), "-b", str(tmp / "db"),
                     ready=f"UDP listener opened on: {ALTERNATE}:{COTURN[1]}")
    yield
    net.stop(proc)


def derper_nat(net: Net, *servers: str) -> dict:
    out = _run(sys.executable, "-m", "derper", "nat", "-json", "-timeout", "1s", *servers,
               ns=net.client)
    return json.loads(out.stdout)


def natdiscovery(net: Net, port: int) -> subprocess.Popen:
    """coturn's RFC 5780 client against ``port`` in the client namespace, left running (its
    filtering test waits out its own timeouts, so other probes run meanwhile)."""
    binary = require_binary("turnutils_natdiscovery", "coturn")
    return subprocess.Popen(["ip", "netns", "exec", net.client, binary, "-m", "-f", "-p",
                             str(port), PRIMARY], stdout=subprocess.PIPE, text=True)


def natdiscovery_says(proc: subprocess.Popen) -> tuple[str, str]:
    """(mapping, filtering) as coturn's client words them, in our vocabulary."""
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    found = {}
    for kind in ("Mapping", "Filtering"):
        m = re.search(rf"NAT with (Endpoint Independent|Address Dependent|Address and Port "
                      rf"Dependent) {kind}!", out)
        assert m, out
        found[kind] = m.group(1).lower().replace(" ", "-")
    return found["Mapping"], found["Filtering"]


def test_derper_nat_classifies_the_kernel_nat(net, our_server):
    report = derper_nat(net, f"{PRIMARY}:{OURS[0]}")
    assert report["udp"] is True
    assert report["public"].startswith(f"{ROUTER_OUT}:")
    assert report["mapping"] == EXPECTED_MAPPING[net.kind], report
    assert report["hairpin"] is False  # MASQUERADE alone does not hairpin
    assert report["ipv6"] is None
    if net.kind == "masquerade":
        assert report["filtering"] == APD, report
        assert report["port_preserving"] is True
        assert report["verdict"] == "easy-peers-only"
    else:
        # Every destination has its own mapping, so no control can show the server honest:
        # the filtering is then honestly unknown, never guessed.
        assert report["filtering"] in (APD, "unknown"), report
        assert report["verdict"] == "relayed"
        assert "41641" in " ".join(report["helps"])


def test_plain_servers_are_compared_with_each_other(net, plain_servers):
    report = derper_nat(net, f"{PRIMARY}:{PLAIN}", f"{ALTERNATE}:{PLAIN}")
    assert report["filtering"] == "unknown"  # needs CHANGE-REQUEST
    if net.kind == "masquerade":
        assert (report["mapping"], report["verdict"]) == (EI, "easy-peers-only"), report
    else:  # the port changes with the address; whether also with the port is not measured
        assert (report["mapping"], report["verdict"]) == ("unknown", "relayed"), report


def test_natdiscovery_agrees_with_our_server(net, our_server):
    mapping, filtering = natdiscovery_says(natdiscovery(net, OURS[0]))
    assert mapping == EXPECTED_MAPPING[net.kind]
    assert filtering == APD  # both NATs filter by address and port


def test_derper_nat_agrees_with_natdiscovery_against_coturn(net, coturn):
    coturn_client = natdiscovery(net, COTURN[0])
    report = derper_nat(net, f"{PRIMARY}:{COTURN[0]}")
    mapping, filtering = natdiscovery_says(coturn_client)
    assert report["mapping"] == mapping == EXPECTED_MAPPING[net.kind], report
    assert report["filtering"] in (filtering, "unknown"), report
    if net.kind == "masquerade":
        assert report["filtering"] == filtering, report


def test_wildcard_server_answers_both_families_from_the_address_asked():
    """The default -a :443 binds wildcard sockets: replies must still leave from the address
    each request reached (IP_PKTINFO), which ``derper nat`` checks. In a namespace with only
    loopback, so nothing else can reach the wildcard sockets."""
    _require_namespaces()
    net = Net("wildcard")
    net.client = net.server = f"{_TAG}w"
    try:
        _run("ip", "netns", "add", net.server)
        _run("ip", "link", "set", "lo", "up", ns=net.server)
        derper(net, "", OURS[0], "-stun-alt-port", str(OURS[1]))
        report = derper_nat(net, f"127.0.0.1:{OURS[0]}", f"[::1]:{OURS[0]}")
    finally:
        for proc in net.procs:
            net.stop(proc)
        _run("ip", "netns", "del", net.server, check=False)
    assert (report["udp"], report["mapping"], report["ipv6"]) == (True, EI, True), report
    assert report["filtering"] == "unknown"  # another port gets in; one IP cannot tell more
    assert not any("wrongly" in note for note in report["notes"])
