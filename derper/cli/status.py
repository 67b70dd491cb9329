"""``derper status``: the status page's summary in a terminal, for operators on SSH.

Fetches ``/status.json`` from the metrics listener (one h11 exchange) and prints it as a few
lines with sparklines of the last 10 minutes; ``-watch`` redraws in place, ``-json`` prints
the JSON itself. Loads no server module.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Mapping
from urllib.parse import urlsplit

import trio

from ..config import Config
from ..http.client import HTTPClientError, request
from .goflags import Flag, HelpRequested, UsageError, parse, usage

TIMEOUT = 5.0
WATCH_EVERY = 2.0
MAX_BODY = 8 << 20  # the JSON is well under 1 MB even with a full hour of history
SPARK = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 30  # characters of sparkline: 20 s each over the fine ring's 10 minutes
VALUE_WIDTH = 46  # where the sparklines start, after the label
CLEAR = "\x1b[H\x1b[2J"

STATUS_FLAGS = [
    Flag("url", "url", "string",
         "the relay's status listener (its -metrics-addr): host:port or http://host:port",
         ("DERP_STATUS_URL",)),
    Flag("watch", "watch", "bool", f"redraw every {WATCH_EVERY:g} s until Ctrl-C",
         ("DERP_STATUS_WATCH",)),
    Flag("json", "json", "bool",
         "print /status.json (with -watch: one line per refresh) instead of the summary",
         ("DERP_STATUS_JSON",)),
]
DEFAULTS = {"url": Config.metrics_addr, "watch": False, "json": False}

USAGE_HEAD = f"""\
Usage: derper status [flags]

Is my relay healthy? Clients, traffic, drops, limits, the certificate and STUN, from the
relay's status listener (-metrics-addr, {Config.metrics_addr} by default; the same data as the
page at /status there). Run it on the relay, or through an SSH tunnel.

Examples:
  derper status
      the relay on this machine
  derper status -watch
      redraw every {WATCH_EVERY:g} s, like top
  ssh -L 9437:127.0.0.1:9437 you@relay   # then, on your machine:
  derper status -url 127.0.0.1:9437
  derper status -json | jq .clients.local

Flags (Go syntax: -x v, -x=v, --x; each may also come from the variable shown):
"""


class StatusError(Exception):
    """No usable answer from the relay; the message says what to check."""


def status_url(text: str) -> str:
    """``host:port``, ``http://host:port`` or a URL of the page → the JSON's URL."""
    url = text if "://" in text else "http://" + text
    parts = urlsplit(url)
    host = parts.hostname
    if host in (None, "", "0.0.0.0"):
        host = "127.0.0.1"  # a wildcard -metrics-addr is reached on loopback
    elif host == "::":
        host = "::1"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{netloc}/status.json"


async def fetch(url: str) -> dict:
    hint = (f"\n  Is derper running, with -metrics-addr at this address ({Config.metrics_addr} by "
            "default)?\n  From another machine: ssh -L 9437:127.0.0.1:9437 you@relay, then "
            "derper status")
    try:
        with trio.fail_after(TIMEOUT):
            resp = await request("GET", url, max_body=MAX_BODY)
    except trio.TooSlowError:
        raise StatusError(f"no answer from {url} within {TIMEOUT:g} s{hint}") from None
    except HTTPClientError as e:
        raise StatusError(f"cannot reach the relay at {url}: {e}{hint}") from None
    if resp.status != 200:
        raise StatusError(f"{url} answered HTTP {resp.status}: not a derper status listener, or "
                          "a derper too old to have one")
    try:
        data = json.loads(resp.body)
        data["schema"]
    except (ValueError, TypeError, KeyError):
        raise StatusError(f"{url} did not answer with derper's status JSON") from None
    return data


def run(argv: list[str], environ: Mapping[str, str]) -> int:
    try:
        values, _, rest = parse(STATUS_FLAGS, argv, environ)
        if rest:
            raise UsageError(f"unexpected argument {rest[0]!r} (the relay goes in -url)")
        options = dict(DEFAULTS, **values)
        url = status_url(options["url"])
    except HelpRequested:
        print(USAGE_HEAD + usage(STATUS_FLAGS, DEFAULTS))
        return 0
    except (UsageError, ValueError) as e:
        print(f"derper status: {e}\nRun 'derper status -h' for help.", file=sys.stderr)
        return 2
    try:
        return trio.run(_watch if options["watch"] else _once, url, options["json"])
    except KeyboardInterrupt:
        return 0 if options["watch"] else 130


async def _once(url: str, as_json: bool) -> int:
    try:
        data = await fetch(url)
    except StatusError as e:
        print(f"derper status: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if as_json else render(data, url))
    return 0


async def _watch(url: str, as_json: bool) -> int:
    """Redraw until interrupted; an unreachable relay is shown, and retried."""
    while True:
        try:
            data = await fetch(url)
        except StatusError as e:
            text = f"derper status: {e}\n" + time.strftime("(retrying; %H:%M:%S)\n")
            if as_json:
                print(f"derper status: {e}", file=sys.stderr, flush=True)
            else:
                sys.stdout.write(CLEAR + text)
        else:
            if as_json:
                print(json.dumps(data, separators=(",", ":")))
            else:
                sys.stdout.write(CLEAR + render(data, url))
        sys.stdout.flush()
        await trio.sleep(WATCH_EVERY)


# ---- the summary --------------------------------------------------------------------------------

def _units(n: float, base: int, names: tuple[str, ...]) -> str:
    i = 0
    while abs(n) >= base and i < len(names) - 1:
        n /= base
        i += 1
    return f"{n:.0f} {names[i]}" if i == 0 else f"{n:.3g} {names[i]}"


def bits(bytes_per_second: float) -> str:
    return _units(bytes_per_second * 8, 1000, ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"))


def size(n: float) -> str:
    return _units(n, 1000, ("B", "kB", "MB", "GB", "TB"))


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d} d {h} h" if d else f"{h} h {m} min" if h else f"{m} min {s % 60} s" if m \
        else f"{s} s"


def ago(t: float | None, now: float) -> str:
    return "never" if t is None else duration(now - t) + " ago"


def spark(values: list[float], points: int = SPARK_POINTS) -> str:
    """The last values as block characters, averaged into at most ``points`` of them."""
    if not values:
        return ""
    group = max(1, -(-len(values) // points))
    start = len(values) % group
    sums = [sum(values[i:i + group]) / group for i in range(start, len(values), group)]
    top = max(sums)
    if top <= 0:
        return SPARK[0] * len(sums)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * len(SPARK)))] for v in sums)


def render(data: dict, url: str) -> str:
    """The summary a person reads: verdict first, then one line per subject."""
    now = data["generated_at"]
    s, c, t, h = data["server"], data["clients"], data["traffic"], data["health"]
    fine = data["history"]["fine"]
    verdict = {"ok": "healthy", "warning": "WARNING", "error": "ERROR"}[h["state"]]
    lines = [f"derper {s['version']} · {verdict} · up {duration(s['uptime_seconds'])} · "
             f"{url.removesuffix('/status.json')}"]
    lines += [f"  ! {note}" for note in h["notes"]]
    remote = f", {c['remote']} via mesh" if c["remote"] else ""
    charted = [
        ("clients", f"{c['local']} now ({c['connections']} connections{remote})",
         fine["clients"]),
        ("", f"{c['connects_per_minute']:.0f} joined, {c['disconnects_per_minute']:.0f} left "
             "in the last minute", []),
        ("traffic in", f"{bits(t['bytes_in_per_second']):>12} {t['packets_in_per_second']:>9,} "
                       "pkt/s", fine["bytes_in_per_second"]),
        ("traffic out", f"{bits(t['bytes_out_per_second']):>12} "
                        f"{t['packets_out_per_second']:>9,} pkt/s", fine["bytes_out_per_second"]),
    ]
    lines += ["", " " * (12 + VALUE_WIDTH) + "last 10 minutes"]
    lines += [f"{label:<12}{value:<{VALUE_WIDTH}}{spark(values)}".rstrip()
              for label, value, values in charted]
    rows = [
        ("since start", f"{t['packets_in_total']:,} packets in ({size(t['bytes_in_total'])}), "
                        f"{t['packets_out_total']:,} out ({size(t['bytes_out_total'])})"),
        ("stun", _stun(data["stun"])),
        ("drops", _events([(d["reason"], d["packets"], d["last_at"]) for d in data["drops"]],
                          now, "none")),
        ("limits", _events([("-" + x["limit"].replace("_", "-"), x["hits"], x["last_at"])
                            for x in data["limits"]], now, "none hit")),
        ("admission", _admission(data["admission"], now)),
        ("certificate", _certificate(data["certificate"], now)),
    ]
    senders = data["heaviest_senders"] or [{"key": "nobody is sending", "bytes_per_second": 0}]
    for i, x in enumerate(senders[:5]):
        addr = f"  {x['addr']}" if x.get("addr") else ""
        rate = f"{bits(x['bytes_per_second']):>12}  " if x["bytes_per_second"] else ""
        rows.append(("heaviest" if i == 0 else "", f"{rate}{x['key']}{addr}"))
    mesh = data["mesh"]
    rows.append(("mesh", "; ".join(f"{link['peer']} {link['state']}" for link in mesh["links"])
                 if mesh["configured"] else "no mesh configured"))
    lines += [f"{label:<12}{value}".rstrip() for label, value in rows]
    return "\n".join(lines) + "\n"


def _stun(stun: dict) -> str:
    if not stun["enabled"]:
        return "off"
    kinds = ", ".join(f"{kind.replace('_', ' ')} {v['per_second']:g}/s"
                      for kind, v in stun["by_kind"].items() if v["per_second"])
    return f"{stun['per_second']:g} requests/s" + (f" ({kinds})" if kinds else "") + \
        f", {stun['requests_total']:,} since start"


def _events(events: list[tuple[str, int, float | None]], now: float, none: str) -> str:
    seen = [f"{name.replace('_', ' ')} {count:,} (last {ago(last, now)})"
            for name, count, last in events if count]
    return "; ".join(seen) or none


def _admission(a: dict, now: float) -> str:
    if not a["enabled"]:
        return "open to every client"
    by = ", ".join("-" + name for name in a["by"])
    rejected = f"{a['rejected']:,} rejected (last {ago(a['last_rejected_at'], now)})"
    return f"{by}: {a['allowed']:,} allowed, {rejected}" + \
        (f", {a['fail_open']:,} let in unverified" if a["fail_open"] else "")


def _certificate(cert: dict | None, now: float) -> str:
    if cert is None:
        return "no TLS (plain HTTP)"
    if not cert["installed"]:
        text = "none yet"
    else:
        issuer = "self-signed" if cert["self_signed"] else f"by {cert['issuer']}"
        days = cert["days_left"]
        left = f"{days // 365:.0f} years" if days > 730 else f"{days:.0f} days"
        text = f"{cert['subject']} {issuer}, {left} left"
    if cert["renewal"] == "acme":
        due = cert["next_renewal_at"] - now
        text += "; next order " + ("now" if due <= 1 else f"in {duration(due)}")
        if cert["last_error"]:
            text += f"; last error ({ago(cert['last_error_at'], now)}): {cert['last_error']}"
    return text
