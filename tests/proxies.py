"""The real reverse proxies (Debian's nginx, Caddy, HAProxy) run with the configs in
``deploy/``, on loopback: each config is the shipped file with its example names, ports and
paths replaced, and every path the proxy writes (pid, logs, temp, state) in the test's
directory. Each proxy runs in the foreground as our child and is stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trustme

from tests.process import free_port
from tests.system import require_binary, require_file

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HOSTNAME = "localhost"  # what the example derp.example.com becomes (the test CA's name)
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def render(name: str, replacements: dict[str, str]) -> str:
    """``deploy/<name>`` with each key replaced; a key missing there fails the test, so the
    shipped file cannot drift away from what is tested."""
    text = (DEPLOY / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"deploy/{name} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def write_cert(ca: trustme.CA, tmp: Path) -> tuple[Path, Path, Path]:
    """The proxy's certificate for ``HOSTNAME``: chain, key, and both in one PEM (HAProxy)."""
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    chain, key, both = tmp / "proxy.crt", tmp / "proxy.key", tmp / "proxy.pem"
    chain.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    both.write_bytes(chain.read_bytes() + key.read_bytes())
    return chain, key, both


def nginx_config(kind: str, tmp: Path, ca: trustme.CA, port: int, upstream: int) -> list[str]:
    """``kind`` "http" (TLS at nginx) or "stream" (L4 passthrough with PROXY protocol)."""
    require_binary("nginx", "nginx")
    chain, key, _ = write_cert(ca, tmp)
    temp = "\n".join(f"    {k}_temp_path {tmp}/{k};" for k in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    head = f"daemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log info;\n"
    if kind == "http":
        site = render("nginx/derper-http.conf", {
            "/etc/letsencrypt/live/derp.example.com/fullchain.pem": str(chain),
            "/etc/letsencrypt/live/derp.example.com/privkey.pem": str(key),
            "listen 443 ssl": f"listen 127.0.0.1:{port} ssl",
            "derp.example.com": HOSTNAME, "127.0.0.1:3340": f"127.0.0.1:{upstream}"})
        body = f"events {{}}\nhttp {{\n    access_log off;\n{temp}\n{site}\n}}\n"
    else:
        require_file(STREAM_MODULE, "libnginx-mod-stream")
        body = f"load_module {STREAM_MODULE};\nevents {{}}\n" + render(
            "nginx/derper-stream.conf", {
                "listen 443": f"listen 127.0.0.1:{port}", "derp.example.com": HOSTNAME,
                "127.0.0.1:8443": f"127.0.0.1:{upstream}",
                "127.0.0.1:8444": f"127.0.0.1:{free_port()}"})
    conf = tmp / "nginx.conf"
    conf.write_text(head + body)
    return ["nginx", "-p", str(tmp), "-c", str(conf)]


def caddy_config(tmp: Path, ca: trustme.CA, port: int, upstream: int) -> list[str]:
    require_binary("caddy", "caddy")
    chain, key, _ = write_cert(ca, tmp)
    site = render("caddy/Caddyfile", {
        "derp.example.com {": f"{HOSTNAME}:{port} {{\n\ttls {chain} {key}",
        "127.0.0.1:3340": f"127.0.0.1:{upstream}"})
    conf = tmp / "Caddyfile"
    conf.write_text("{\n\tadmin off\n\tauto_https disable_redirects\n"
                    "}\n" + site)
    return ["caddy", "run", "--adapter", "caddyfile", "--config", str(conf)]


def haproxy_config(kind: str, tmp: Path, ca: trustme.CA, port: int,
                   upstream: int) -> list[str]:
    """``kind`` "http" (TLS at HAProxy) or "tcp" (passthrough with PROXY protocol v2)."""
    require_binary("haproxy", "haproxy")
    _, _, both = write_cert(ca, tmp)
    if kind == "http":
        text = render("haproxy/derper-http.cfg", {
            "/etc/haproxy/certs/derp.example.com.pem": str(both),
            "bind :443": f"bind 127.0.0.1:{port}", "127.0.0.1:3340": f"127.0.0.1:{upstream}"})
    else:
        text = render("haproxy/derper-tcp.cfg", {
            "bind :443": f"bind 127.0.0.1:{port}", "derp.example.com": HOSTNAME,
            "127.0.0.1:8443": f"127.0.0.1:{upstream}",
            "127.0.0.1:8444": f"127.0.0.1:{free_port()}"})
    conf = tmp / "haproxy.cfg"
    conf.write_text(text)
    return ["haproxy", "-db", "-f", str(conf)]


SETUPS = {  # name: (config builder, what derper runs as behind it)
    "nginx-http": (lambda *a: nginx_config("http", *a), "http"),
    "nginx-stream": (lambda *a: nginx_config("stream", *a), "l4"),
    "caddy": (caddy_config, "http"),
    "haproxy-http": (lambda *a: haproxy_config("http", *a), "http"),
    "haproxy-tcp": (lambda *a: haproxy_config("tcp", *a), "l4"),
}


@asynccontextmanager
async def running(setup: str, tmp: Path, ca: trustme.CA, upstream: int):
    """The proxy ``setup`` in front of 127.0.0.1:``upstream``; yields the port it listens on."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    argv = SETUPS[setup][0](tmp, ca, port, upstream)
    env = dict(os.environ, HOME=str(tmp), XDG_DATA_HOME=str(tmp / "data"),
               XDG_CONFIG_HOME=str(tmp / "config"))
    log = open(tmp / f"{setup}.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        with trio.fail_after(15):
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"{setup} exited ({proc.returncode}):\n"
                                         + (tmp / f"{setup}.log").read_text())
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
