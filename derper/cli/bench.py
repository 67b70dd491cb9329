"""``derper bench``: load a DERP relay and print what it delivered, as a table and as JSON.

Without ``-url`` it starts a fresh derper on loopback (TLS, a self-signed pinned certificate) and
loads that; with ``-url`` it loads any DERP server, ours or Go's, for a side-by-side ratio.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

from ..bench.loadgen import LoadError, median_row, run_conns, run_relay
from ..certs.bundle import CertError, ensure_ip_cert, load_manual
from ..metrics.procstat import tree_rss_bytes
from .goflags import Flag, HelpRequested, UsageError, parse, usage

MODES = ("relay", "conns")
HOST = "127.0.0.1"  # the started server: an IP hostname, so it makes a self-signed certificate


def _flag(name: str, field: str, kind: str, help: str) -> Flag:
    return Flag(name, field, kind, help, ("DERP_BENCH_" + field.upper(),))


BENCH_FLAGS = [
    _flag("url", "url", "string",
          "DERP server to load, https://host[:port]/derp (default: start a derper on loopback)"),
    _flag("cert-pin", "cert_pin", "string",
          "sha256-raw:... pin of the -url server's self-signed certificate (its CertName)"),
    _flag("ca-file", "ca_file", "string", "CA bundle to verify the -url server's certificate"),
    _flag("server-pid", "server_pid", "int",
          "pid of the -url server on this machine, for its CPU and memory figures"),
    _flag("server-args", "server_args", "string",
          "extra flags for the started derper, space separated"),
    _flag("server-nice", "server_nice", "int",
          "niceness added to the started derpers (below 0 needs root): -5 lets them run ahead "
          "of the load processes and other jobs on a shared machine"),
    _flag("recv-url", "recv_url", "string",
          "relay: a second server of the same region for the receivers, so every packet "
          "crosses the mesh (with -url)"),
    _flag("recv-cert-pin", "recv_cert_pin", "string", "sha256-raw:... pin of the -recv-url server"),
    _flag("mesh", "mesh", "bool",
          "relay, without -url: start two meshed derpers, each pair's second client on the "
          "second, so every packet crosses the mesh; server CPU is the two nodes' together"),
    _flag("clients", "clients", "int", "relay: clients, in pairs (8 = 8 senders, 8 receivers)"),
    _flag("size", "size", "int", "relay: packet bytes"),
    _flag("rate", "rate", "int", "relay: packets/s per sender; 0 = flood"),
    _flag("websocket", "websocket", "bool",
          "DERP over WebSocket (subprotocol derp), one WebSocket message per packet as "
          "Tailscale's WebSocket client writes them; default: Upgrade: DERP"),
    _flag("coalesce", "coalesce", "bool",
          "relay: one TLS record per batch instead of one per packet"),
    _flag("seconds", "seconds", "float", "relay: measured seconds"),
    _flag("warmup", "warmup", "float", "relay: seconds sent before measuring"),
    _flag("drain", "drain", "float", "relay: seconds receivers keep reading after the senders"),
    _flag("procs", "procs", "int",
          "load processes: one per CPU this process may use (more only take turns on the "
          "cores, and the servers' latency shows it)"),
    _flag("repeat", "repeat", "int", "runs; the median run is reported"),
    _flag("suite", "suite", "bool", "relay: the 8 x 5k, 8 x 10k and flood rows"),
    _flag("conns", "conns", "int", "conns: connections to open and hold"),
    _flag("concurrency", "concurrency", "int", "conns: handshakes in flight per process"),
    _flag("json", "json", "string", "where to write every figure as JSON"),
    _flag("smoke", "smoke", "bool", "a seconds-long correctness run"),
]
DEFAULTS = {"url": "", "cert_pin": "", "ca_file": "", "server_pid": 0, "server_args": "",
            "server_nice": 0, "recv_url": "", "recv_cert_pin": "", "mesh": False,
            "clients": 8, "size": 1280, "rate": 10000, "websocket": False, "coalesce": False, "seconds": 5.0,
            "warmup": 1.0, "drain": 1.0, "procs": len(os.sched_getaffinity(0)), "repeat": 1, "suite": False,
            "conns": 1000, "concurrency": 64, "json": "derp_bench.json", "smoke": False}

SUITE = [  # (label, rate per sender): the rows of the README's performance table
    ("8 x 5k pkt/s", 5000),
    ("8 x 10k pkt/s", 10000),
    ("8 x flood", 0),
]

USAGE_HEAD = """\
Usage: derper bench [relay|conns] [flags]

relay (the default): clients in pairs relay timestamped packets through the server; prints
delivered packets/s and Mbit/s, loss, one-way latency percentiles and CPU use.
conns: opens and holds idle TLS + DERP connections; prints connections per second and, for a
server on this machine, its memory and CPU per connection.

Examples:
  derper bench -suite -repeat 3
      a fresh local derper: 8 x 5k pkt/s, 8 x 10k pkt/s and a flood, 1280-byte packets
  derper bench -mesh -clients 8 -rate 5000
      two fresh meshed derpers: every packet crosses the mesh, in both directions
  derper bench -mesh -clients 8 -rate 5000 -server-nice -5
      the same on a shared machine, the two derpers ahead of the load and other jobs (root)
  derper bench -websocket -rate 5000 -repeat 3
      the same 8 x 5k pkt/s with DERP over WebSocket (TLS)
  derper bench conns -conns 10000
      10,000 idle connections to a fresh local derper
  derper bench -url https://derp.example.com/derp -clients 2 -rate 100 -seconds 10
      latency through your relay from this machine (client -> relay -> client)
  derper bench -url https://203.0.113.7/derp -cert-pin sha256-raw:<CertName> -clients 2 -rate 100
      the same for a relay with a pinned self-signed certificate (CertName from its DERP map)

Each load generator process costs about one CPU core at full speed: aim it only at servers
you run.

Flags:
"""


class StartedServer:
    """A fresh ``derper`` over TLS with a self-signed, pinned IP certificate.

    The pin comes from the certificate the server made in its certdir, read once it listens.
    """

    def __init__(self, extra: list[str], wrapper: list[str] = (), cwd: str | None = None,
                 prepared: "tuple[tempfile.TemporaryDirectory, int] | None" = None,
                 nice: int = 0) -> None:
        """``nice``: added to the server's niceness (below 0 needs root)."""
        self._dir, port = prepared or (tempfile.TemporaryDirectory(), free_port())
        self.dir = Path(self._dir.name)
        args = [*wrapper, sys.executable, "-m", "derper", "-hostname", HOST,
                "-certmode", "manual", "-certdir", self._dir.name, "-a", f"{HOST}:{port}",
                "-http-port", "-1", "-stun=false", "-metrics-addr", "off", *extra]
        self._log = open(self.dir / "derper.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=self._log, cwd=cwd,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.url = f"https://{HOST}:{port}/derp"
        try:
            wait_listening(port, self.proc, 180 if wrapper else 10)  # valgrind on a busy box
            self._wait_ready(180 if wrapper else 20)
            self.pin = load_manual(self.dir, HOST).pin
        except (LoadError, CertError) as e:
            log = self.log()  # before close() removes it
            self.close()
            raise LoadError(f"derper did not start: {e}\n" + log) from e

    def log(self) -> str:
        return (self.dir / "derper.log").read_text()

    def _wait_ready(self, seconds: float) -> None:
        """Until the host says it listens (with -workers, the port accepts before the workers
        do: the supervisor binds it; they say so in lines of their own, with worker=)."""
        deadline = time.monotonic() + seconds
        while not any('msg="derper listening"' in line and " worker=" not in line
                      for line in self.log().splitlines()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LoadError("derper did not say it listens")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()
        self._dir.cleanup()


def started_region(extra: list[str], wrapper: list[str] = (), cwd: str | None = None,
                   nice: int = 0) -> list[StartedServer]:
    """Two derpers meshed with each other: their certificates made first, so that each can
    pin the other's in -mesh-with. ``wrapper``, ``cwd`` and ``nice`` as for
    ``StartedServer``."""
    dirs = [(tempfile.TemporaryDirectory(), free_port()) for _ in range(2)]
    pins = []
    for d, _ in dirs:
        ensure_ip_cert(Path(d.name), HOST)
        pins.append(load_manual(Path(d.name), HOST).pin)
    key_file = Path(dirs[0][0].name) / "mesh.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    mesh_with = ",".join(f"{HOST}:{port}@{pin}" for (_, port), pin in zip(dirs, pins))
    servers: list[StartedServer] = []
    try:
        for prepared in dirs:  # each its own server key: a shared one would look like a loop
            servers.append(StartedServer([*extra, "-c", f"{prepared[0].name}/derper.key",
                                          "-mesh-psk-file", str(key_file),
                                          "-mesh-with", mesh_with], wrapper=wrapper,
                                         cwd=cwd, prepared=prepared, nice=nice))
        deadline = time.monotonic() + (120 if wrapper else 20)  # the mesh, not its start-up
        while not all('msg="mesh link up"' in server.log() for server in servers):
            if time.monotonic() > deadline:
                raise LoadError("the two derpers did not mesh:\n" + servers[0].log())
            time.sleep(0.05)
    except LoadError:
        for server in servers:
            server.close()
        raise
    return servers


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing holds now (TCP, or UDP with ``socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        if proc.poll() is not None:
            raise LoadError(f"derper exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise LoadError("derper is not listening")


def run(argv: list[str], environ: Mapping[str, str]) -> int:
    try:
        mode, opts = _options(argv, environ)
    except HelpRequested:
        print(USAGE_HEAD + usage(BENCH_FLAGS, DEFAULTS))
        return 0
    except UsageError as e:
        print(f"derper bench: {e}\nRun 'derper bench -h' for the list of flags.",
              file=sys.stderr)
        return 2
    try:
        report = _bench(mode, opts)
    except LoadError as e:
        print(f"derper bench: {e}", file=sys.stderr)
        return 1
    Path(opts["json"]).write_text(json.dumps(report, indent=2) + "\n")
    _print_table(mode, report["rows"])
    print(f"({opts['repeat']} run(s), medians; target {report['target']} over "
          f"{report['transport']};"
          f" JSON in {opts['json']})")
    return 0


def _options(argv: list[str], environ: Mapping[str, str]) -> tuple[str, dict]:
    """The mode (first argument, or after the flags) and every option, defaults filled in."""
    mode = "relay"
    if argv and argv[0] in MODES:
        mode, argv = argv[0], argv[1:]
    values, _, rest = parse(BENCH_FLAGS, argv, environ)
    if rest and rest[0] in MODES:
        mode = rest[0]
        more, _, rest = parse(BENCH_FLAGS, rest[1:], {})
        values.update(more)
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r} (modes: {', '.join(MODES)})")
    opts = {**DEFAULTS, **values}
    if opts["smoke"]:
        opts.update(clients=2, rate=200, seconds=0.5, warmup=0.2, drain=0.3, procs=1, repeat=1,
                    conns=20, concurrency=10, suite=False)
    if opts["clients"] < 2 or opts["clients"] % 2:
        raise UsageError(f"-clients must be an even number >= 2, not {opts['clients']}")
    for name in ("size", "procs", "repeat", "conns", "concurrency"):
        if opts[name] < 1:
            raise UsageError(f"-{name} must be at least 1")
    if opts["rate"] < 0 or opts["seconds"] <= 0:
        raise UsageError("-rate must be >= 0 and -seconds > 0")
    if opts["server_nice"] < 0 and os.geteuid() != 0:
        raise UsageError(f"-server-nice {opts['server_nice']}: a negative niceness needs root")
    if opts["server_nice"] and opts["url"]:
        raise UsageError("-server-nice is for the started derpers; with -url none is started")
    if opts["recv_url"] and not opts["url"]:
        raise UsageError("-recv-url needs -url (or use -mesh to start two meshed derpers)")
    if opts["url"] and not opts["url"].startswith(("http://", "https://")):
        raise UsageError(f"-url must be http(s)://host[:port]/derp, not {opts['url']!r}")
    if opts["server_pid"] and not Path(f"/proc/{opts['server_pid']}").is_dir():
        raise UsageError(f"-server-pid: no process {opts['server_pid']} on this machine")
    folder = Path(opts["json"]).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):  # before minutes of load
        raise UsageError(f"-json: cannot write to {opts['json']!r}: {folder} is not a "
                         "writable directory")
    return mode, opts


def _bench(mode: str, opts: dict) -> dict:
    extra = opts["server_args"].split()
    nice = opts["server_nice"]
    started = [] if opts["url"] else started_region(extra, nice=nice) if opts["mesh"] else \
        [StartedServer(extra, nice=nice)]
    server = started[0] if started else None
    try:
        target = {"url": opts["url"] or server.url,
                  "cert_pin": (opts["cert_pin"] or None) if opts["url"] else server.pin,
                  "ca_file": opts["ca_file"] or None, "websocket": opts["websocket"],
                  "recv": None}
        if opts["recv_url"] or len(started) == 2:
            target["recv"] = {"url": opts["recv_url"] or started[1].url,
                              "cert_pin": (opts["recv_cert_pin"] or None) if opts["recv_url"]
                              else started[1].pin, "ca_file": opts["ca_file"] or None,
                              "websocket": opts["websocket"]}
        pid = server.proc.pid if server else opts["server_pid"] or None
        pids = [s.proc.pid for s in started] or ([pid] if pid else [])  # both nodes of -mesh
        if mode == "conns":
            rss = tree_rss_bytes(pid) if pid else None
            runs = [run_conns(target, opts["conns"], opts["concurrency"], opts["procs"], pid,
                              rss) for _ in range(opts["repeat"])]
            if not any(r["connected"] for r in runs):
                raise LoadError(f"no connection succeeded: {runs[0]['first_error']}")
            rows = {"conns": median_row(runs)}
        else:
            plan = SUITE if opts["suite"] else [
                (f"{opts['clients']} x {_rate_text(opts['rate'])}", opts["rate"])]
            runs, rows = [], {}
            for _ in range(opts["repeat"]):  # interleaved, so drift hits every row alike
                for label, rate in plan:
                    job = {"clients": opts["clients"], "size": opts["size"], "rate": rate,
                           "coalesce": opts["coalesce"], "seconds": opts["seconds"],
                           "warmup": opts["warmup"], "drain": opts["drain"]}
                    runs.append({"label": label,
                                 **run_relay(target, job, opts["procs"], pids)})
            for label, _ in plan:
                rows[label] = median_row([r for r in runs if r["label"] == label])
    finally:
        for started_server in started:
            started_server.close()
    recv = target["recv"]
    return {"mode": mode, "target": target["url"] + (f" -> {recv['url']}" if recv else ""),
            "transport": "websocket" if opts["websocket"] else "derp",
            "started_server": server is not None, "server_nice": opts["server_nice"],
            "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
            "rows": rows, "runs": runs}


def _rate_text(rate: int) -> str:
    return "flood" if not rate else f"{rate:,} pkt/s"


def _print_table(mode: str, rows: dict) -> None:
    if mode == "conns":
        print(f"{'connections':>11} {'connects/s':>11} {'failures':>9} {'server RSS':>11}"
              f" {'RSS/conn':>9} {'server ms/conn':>14} {'load ms/conn':>12}")
        for row in rows.values():
            rss = "-" if row["server_rss_mb"] is None else f"{row['server_rss_mb']:.0f} MB"
            per = "-" if row["rss_per_conn_kb"] is None else f"{row['rss_per_conn_kb']:.1f} KB"
            print(f"{row['connected']:>11,} {row['connects_per_second'] or 0:>11,}"
                  f" {row['failures']:>9} {rss:>11} {per:>9}"
                  f" {_ms(row['server_cpu_ms_per_conn']):>14}"
                  f" {_ms(row['load_cpu_ms_per_conn']):>12}")
            if row["first_error"]:
                print(f"first failure: {row['first_error']}")
        return
    print(f"{'load':<16} {'offered pkt/s':>13} {'delivered pkt/s':>15} {'Mbit/s':>7}"
          f" {'loss':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'server CPU':>10}"
          f" {'load CPU':>8}")
    for label, r in rows.items():
        lat = r["latency_ms"]
        cpu = "-" if r["server_cpu"] is None else f"{r['server_cpu']:.0%}"
        loss = "-" if r["loss"] is None else f"{r['loss']:.2%}"
        print(f"{label:<16} {r['offered_pps']:>13,} {r['delivered_pps']:>15,}"
              f" {r['delivered_mbit_s']:>7.0f} {loss:>7} {_ms(lat['p50']):>7}"
              f" {_ms(lat['p99']):>7} {_ms(lat['p99.9']):>8} {cpu:>10} {r['load_cpu']:>8.0%}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
