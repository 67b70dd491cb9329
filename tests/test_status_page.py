"""The status page in a real browser (Debian's chromium, headless): the rendered DOM shows what
/status.json and /metrics say, the page logs nothing to the console, and a screenshot is left
in the test's tmp dir (``status.png``) for a person to look at."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import trio

from derper import client as dc
from derper.proto.messages import ReceivedPacket
from tests.conftest import url
from tests.process import stun_query
from tests.relay_helpers import connect_opts, recv_kind, wait_until
from tests.system import require_binary
from tests.test_metrics import fetch, metrics_url
from tests.test_status import get_json, prom_samples, prom_sum

# --virtual-time-budget lets the page's fetches and timers run before the DOM is dumped.
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--enable-logging=stderr", "--v=0", "--window-size=1400,1700",
            "--virtual-time-budget=5000"]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


async def chromium(tmp_path: Path, target: str, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of one headless chromium run with a profile of its own."""
    binary = require_binary("chromium", "chromium")
    with trio.fail_after(120):
        proc = await trio.run_process(
            [binary, *CHROMIUM, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
             target], capture_stdout=True, capture_stderr=True, check=False)
    return proc.stdout.decode(), proc.stderr.decode()


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to the console: its logs, uncaught errors, refused loads (CSP)."""
    return re.findall(r":INFO:CONSOLE[^\]]*\] (.*)", stderr)


class _ById(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.texts: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            element_id = dict(attrs).get("id")
            self.stack.append(element_id)
            if element_id:
                self.texts[element_id] = ""

    def handle_endtag(self, tag):
        if tag not in VOID and self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for element_id in self.stack:
            if element_id:
                self.texts[element_id] += data


def texts_by_id(html: str) -> dict[str, str]:
    parser = _ById()
    parser.feed(html)
    return {k: " ".join(v.split()) for k, v in parser.texts.items()}


async def test_console_errors_are_caught(tmp_path):
    """The console check below can fail: a page that throws is seen."""
    _, stderr = await chromium(tmp_path, "data:text/html,<script>null.x</script>", "--dump-dom")
    assert any("TypeError" in m for m in console_messages(stderr))


async def test_the_page_shows_what_the_json_and_the_metrics_say(start_server, ca, tmp_path):
    server = await start_server(tls=True, metrics_addr="127.0.0.1:0", stun=True, stun_port=0)
    page = metrics_url(server) + "/status"
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
        for size in range(100, 1300, 40):  # 30 packets a → b, and 10 back
            await a.send(b.public_key, bytes(size))
        for _ in range(10):
            await b.send(a.public_key, bytes(1000))
        for _ in range(30):
            await recv_kind(b, ReceivedPacket)
        for _ in range(10):
            await recv_kind(a, ReceivedPacket)
        for _ in range(3):
            await stun_query(server.stun_port)
        done = trio.current_time()
        await wait_until(lambda: server.status.fine.times()[-1] > done, timeout=5)
        dom, stderr = await chromium(tmp_path, page, "--dump-dom")
        data = await get_json(server)
        _, text = await fetch(metrics_url(server), "/metrics")
        shot = tmp_path / "status.png"
        _, shot_stderr = await chromium(tmp_path, page, f"--screenshot={shot}")
    prom = prom_samples(text)
    shown = texts_by_id(dom)
    assert console_messages(stderr) == [] and console_messages(shot_stderr) == []

    def number(element_id: str) -> int:
        return int(shown[element_id].replace(",", ""))

    t = data["traffic"]
    assert number("clients-local") == data["clients"]["local"] == 2 == prom_sum(prom,
                                                                                "derp_clients")
    assert number("packets-in-total") == t["packets_in_total"] == 40 == prom_sum(
        prom, "derp_packets_received_total")
    assert number("packets-out-total") == t["packets_out_total"] == 40 == prom_sum(
        prom, "derp_packets_sent_total")
    relayed = sum(range(100, 1300, 40)) + 10 * 1000
    assert number("bytes-in-total") == t["bytes_in_total"] == relayed == prom_sum(
        prom, "derp_bytes_received_total")
    assert number("bytes-out-total") == t["bytes_out_total"] == relayed == prom_sum(
        prom, "derp_bytes_sent_total")
    assert number("stun-total") == data["stun"]["requests_total"] == 3 == prom_sum(
        prom, "stun_requests_total", disposition="success")
    assert number("connects-total") == 2 == prom_sum(prom, "derper_client_connects_total")
    assert shown["health"] == "healthy"
    days = data["certificate"]["days_left"]  # trustme's certificates last until 3000
    assert shown["cert-days"] == f"{math.floor(days / 365)} years"
    assert shown["cert-brief"] == "by " + re.search(r"O=([^,]+)", data["certificate"]["issuer"])[1]
    assert shown["mesh"] == "no mesh configured"
    assert "rejected" not in shown["notes"] and shown["notes"] == ""
    assert dom.count("<canvas") == 4  # uPlot loaded from the package and drew every chart
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
