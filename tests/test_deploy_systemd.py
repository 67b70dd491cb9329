"""deploy/derper.service and deploy/install.sh: systemd's own checks, then a real systemd
(in a container) running install.sh twice, starting the hardened unit and reloading it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from derper import client as dc
from tests.containers import HOST_CA, REPO, Podman
from tests.process import DERPER, free_port
from tests.relay_helpers import assert_relays
from tests.system import require_binary

UNIT = REPO / "deploy" / "derper.service"
MAX_EXPOSURE = 2.0
PUBLIC_IP = "203.0.113.7"


@pytest.fixture
def unit_copy(tmp_path) -> Path:
    """The unit with ExecStart at this venv's derper: verify fails on a missing binary."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/derper/bin/derper\n" in text
    path = tmp_path / "derper.service"
    path.write_text(text.replace("ExecStart=/opt/derper/bin/derper", f"ExecStart={DERPER}"))
    return path


def test_unit_passes_systemd_analyze_verify_without_a_warning(unit_copy):
    analyze = require_binary("systemd-analyze", "systemd")
    proc = subprocess.run([analyze, "verify", str(unit_copy)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # unknown keys only warn
    # A typo'd key must show up, or this test could never fail.
    unit_copy.write_text(unit_copy.read_text().replace("NoNewPrivileges", "NoNewPrivilege"))
    proc = subprocess.run([analyze, "verify", str(unit_copy)], capture_output=True, text=True,
                          timeout=60)
    assert "NoNewPrivilege" in proc.stderr


def test_unit_exposure_is_at_most_two(unit_copy):
    analyze = require_binary("systemd-analyze", "systemd")
    proc = subprocess.run([analyze, "security", "--offline=yes",
                           f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit_copy)],
                          capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert score, proc.stdout + proc.stderr
    assert float(score.group(1)) <= MAX_EXPOSURE and proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--hostname is required"),
    (["--hostname", PUBLIC_IP, "--cert", "letsencrypt"], "needs a domain"),
    (["--hostname", "derp.example.com", "--cert", "self-signed"], "needs an IP"),
    (["--hostname", "derp.example.com", "--http-port", "8080"], "keep --http-port 80"),
    (["--hostname", "derp.example.com; reboot"], "unsupported character"),
    (["--hostname", PUBLIC_IP, "--port", "99999"], "--port must be a port number"),
    (["--hostname", PUBLIC_IP, "--firewall", "iptables"], "--firewall must be"),
    (["--hostname", PUBLIC_IP, "--bogus"], "unknown argument --bogus"),
])
def test_install_rejects_wrong_options_before_changing_anything(args, message):
    proc = subprocess.run([str(REPO / "deploy" / "install.sh"), *args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert proc.stdout == "" or proc.stdout.startswith("Install derper")  # usage at most


# ---- real systemd ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    """A container booted with systemd as PID 1, this checkout at /src, ports on loopback."""
    podman = Podman(tmp_path_factory.mktemp("podman-systemd"))
    image = podman.systemd_image()
    src = tmp_path_factory.mktemp("src") / "derper"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", ".pytest_cache", "benchmarks"))
    ports = {"tls": free_port(), "http": free_port()}
    # NET_ADMIN: ufw --dry-run still reads the container's own iptables.
    name = podman.run_detached(image, "--systemd=always", "--cap-add", "SYS_ADMIN",
                               "--cap-add", "NET_ADMIN", "-v", f"{src}:/src",
                               "-v", f"{HOST_CA}:{HOST_CA}:ro",
                               "-p", f"127.0.0.1:{ports['tls']}:443",
                               "-p", f"127.0.0.1:{ports['http']}:80")
    try:
        podman.wait_for(lambda: podman.out("exec", name, "systemctl", "is-system-running",
                                           check=False).strip() in ("running", "degraded"),
                        "systemd to boot")
        yield podman, name, ports
    finally:
        podman.remove(name)


def install(podman: Podman, name: str) -> str:
    proc = podman("exec", name, "/src/deploy/install.sh", "--hostname", PUBLIC_IP,
                  "--firewall", "dry-run", "--region-code", "testderp", check=False,
                  timeout=600)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    return out


def derp_map(podman: Podman, name: str) -> dict:
    """`derper derpmap` with the installed environment file, as install.sh prints it."""
    command = "set -a; . /etc/derper/derper.env; /opt/derper/bin/derper derpmap -format json"
    return json.loads(podman.out("exec", name, "sh", "-c", command))


def journal(podman: Podman, name: str) -> str:
    return podman.out("exec", name, "journalctl", "-u", "derper", "--no-pager", "-o", "cat")


@pytest.mark.slow
async def test_install_twice_then_reload_under_real_systemd(vm):
    podman, name, ports = vm
    first = install(podman, name)
    assert "regions:" in first and '"derpMap"' in first  # both DERP maps printed
    assert "ufw.sh: allow 443/tcp" in first and "ufw.sh: allow 3478/udp" in first
    env_file = podman.out("exec", name, "cat", "/etc/derper/derper.env")
    assert f"DERP_DOMAIN={PUBLIC_IP}\n" in env_file and "DERP_CERT_MODE=manual\n" in env_file
    node = derp_map(podman, name)["Regions"]["900"]["Nodes"][0]
    assert node["HostName"] == PUBLIC_IP and node["IPv4"] == PUBLIC_IP
    assert node["DERPPort"] == 443 and node["STUNPort"] == 3478 and node["CanPort80"] is True
    pin = node["CertName"]
    assert pin in journal(podman, name)  # the server printed the same pin

    second = install(podman, name)  # safe to run again: same key, same certificate
    assert "/etc/derper/derper.env unchanged" in second
    assert derp_map(podman, name)["Regions"]["900"]["Nodes"][0]["CertName"] == pin
    assert podman.out("exec", name, "systemctl", "is-active", "derper").strip() == "active"

    # Hardening really applies: a dynamic user holding only CAP_NET_BIND_SERVICE.
    pid = podman.out("exec", name, "systemctl", "show", "-P", "MainPID", "derper").strip()
    status = podman.out("exec", name, "cat", f"/proc/{pid}/status")
    assert re.search(r"^Uid:\s+([1-9]\d*)", status, re.M), status
    assert re.search(r"^CapEff:\s+0000000000000400$", status, re.M), status

    podman("exec", name, "systemctl", "reload", "derper")
    podman.wait_for(lambda: "SIGHUP: reloading certificates" in journal(podman, name),
                    "the reload to reach derper", timeout=20)
    assert podman.out("exec", name, "systemctl", "show", "-P", "MainPID", "derper").strip() == pid

    url = f"https://{PUBLIC_IP}/derp"
    dial = ("127.0.0.1", ports["tls"])
    async with dc.connect(url, dial=dial, cert_pin=pin) as a, \
            dc.connect(url, dial=dial, cert_pin=pin) as b:
        await assert_relays(a, b)
