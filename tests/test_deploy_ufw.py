"""deploy/ufw.sh with the real ufw, always inside network namespaces made here (never the host's
firewall): --dry-run output, then an enabled firewall letting exactly derper's ports and SSH
through from a second namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.containers import REPO
from tests.system import require_binary

UFW_SH = str(REPO / "deploy" / "ufw.sh")
SERVER_IP, CLIENT_IP = "10.231.0.1", "10.231.0.2"


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def netns():
    """A namespace with its own copy of /etc/ufw (ip netns exec mounts it over /etc/ufw)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    require_binary("ufw", "ufw")
    require_binary("iptables", "iptables")
    tag = uuid.uuid4().hex[:6]
    names = [f"derpfw-{tag}", f"derpcl-{tag}"]
    for name in names:
        run("ip", "netns", "add", name)
        Path(f"/etc/netns/{name}").mkdir(parents=True)
        shutil.copytree("/etc/ufw", f"/etc/netns/{name}/ufw", symlinks=True)
    try:
        yield names[0], names[1], tag
    finally:
        for name in names:
            run("ip", "netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def ufw_sh(ns: str, *args: str, env: dict | None = None) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
    full_env.update(env or {})
    return run("ip", "netns", "exec", ns, UFW_SH, *args, env=full_env).stdout


def test_dry_run_prints_the_rules_and_changes_nothing(netns, tmp_path):
    ns, _, _ = netns
    env_file = tmp_path / "derper.env"
    env_file.write_text('DERP_ADDR=":8443"\nDERP_HTTP_PORT=8080\nDERP_STUN_PORT=3479\n')
    out = ufw_sh(ns, "--dry-run", "--env-file", str(env_file),
                 env={"SSH_CONNECTION": "198.51.100.9 50000 10.0.0.2 2222"})
    for rule in ("-p tcp --dport 2222 -j ACCEPT", "-p tcp --dport 8443 -j ACCEPT",
                 "-p tcp --dport 8080 -j ACCEPT", "-p udp --dport 3479 -j ACCEPT"):
        assert rule in out, out
    assert "--dport 443 " not in out and "--dport 3478 " not in out
    # SSH comes before anything that could lock the operator out.
    assert out.index("--dport 2222") < out.index("--dport 8443") < out.index("enable")
    status = run("ip", "netns", "exec", ns, "ufw", "status").stdout
    assert "Status: inactive" in status, status
    assert "8443" not in Path(f"/etc/netns/{ns}/ufw/user.rules").read_text()


PROBE = """
import json, socket, sys
ip, result = sys.argv[1], {}
for spec in sys.argv[2:]:
    port, proto = spec.split("/")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(1.0)
        try:
            if proto == "tcp":
                s.connect((ip, int(port)))
            else:
                s.sendto(b"ping", (ip, int(port)))
                s.recvfrom(100)
            result[spec] = True
        except OSError:
            result[spec] = False
print(json.dumps(result))
"""

LISTEN = """
import socket, sys, threading
def tcp(port):
    s = socket.create_server(("0.0.0.0", port))
    while True:
        s.accept()[0].close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(data, peer)
for spec in sys.argv[1:]:
    port, proto = spec.split("/")
    threading.Thread(target=tcp if proto == "tcp" else udp, args=(int(port),),
                     daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@pytest.mark.slow
def test_enabled_firewall_lets_exactly_ssh_and_derper_through(netns, tmp_path):
    server, client, tag = netns
    a, b = f"dfa-{tag}", f"dfb-{tag}"
    run("ip", "link", "add", a, "netns", server, "type", "veth", "peer", b, "netns", client)
    for ns, dev, ip in ((server, a, SERVER_IP), (client, b, CLIENT_IP)):
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
    env_file = tmp_path / "derper.env"
    env_file.write_text("DERP_ADDR=:443\nDERP_HTTP_PORT=80\nDERP_STUN_PORT=3478\n")
    host_rules = Path("/etc/ufw/user.rules").read_text()
    allowed = ["2222/tcp", "443/tcp", "80/tcp", "3478/udp"]
    blocked = ["8443/tcp", "22/tcp", "3479/udp", "443/udp"]
    listener = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c", LISTEN,
                                 *allowed, *blocked], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"

        def probe() -> dict:
            out = run("ip", "netns", "exec", client, sys.executable, "-c", PROBE, SERVER_IP,
                      *allowed, *blocked).stdout
            return json.loads(out)

        assert all(probe().values())  # no firewall yet: everything answers
        ssh = {"SSH_CONNECTION": f"{CLIENT_IP} 40000 {SERVER_IP} 2222"}
        ufw_sh(server, "--env-file", str(env_file), env=ssh)
        rules = run("ip", "netns", "exec", server, "ufw", "status").stdout
        again = ufw_sh(server, "--env-file", str(env_file), env=ssh)  # idempotent
        assert "Skipping adding existing rule" in again and "already active" in again
        assert run("ip", "netns", "exec", server, "ufw", "status").stdout == rules
        assert probe() == {**{p: True for p in allowed}, **{p: False for p in blocked}}
        assert Path("/etc/ufw/user.rules").read_text() == host_rules  # the host untouched
    finally:
        listener.kill()
        listener.wait()
