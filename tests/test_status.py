"""/status.json: equal to the Prometheus counters after known traffic, bounded history, the
heaviest senders without addresses unless asked, and the health verdict."""

from __future__ import annotations

import json

import trio
from prometheus_client.parser import text_string_to_metric_families

from derper import client as dc
from derper.config import Config
from derper.metrics.counters import DropReason
from derper.metrics.history import LastChange, Ring
from derper.metrics.status import (COARSE_POINTS, FINE_POINTS, TOP_SENDERS, StatusBoard, health,
                                   short_key)
from derper.proto.keys import KeyPair, public_text
from derper.proto.messages import ReceivedPacket
from derper.relay.hub import Relay
from stun.counters import StunCounters
from tests.conftest import client_context, url
from tests.process import derper, free_port, stun_query
from tests.relay_helpers import connect_opts, recv_kind, wait_until
from tests.test_metrics import fetch, metrics_url
from tests.test_router import FakePeer

PACKETS, SIZE, STUN = 25, 700, 4


def prom_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def prom_sum(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items()
             if n == name and set(labels.items()) <= set(ls)]
    assert found, f"{name} {labels} is not in /metrics"
    return sum(found)


async def get_json(server, query: str = "") -> dict:
    """/status.json of an in-process server, or of the one whose metrics port is ``server``."""
    where = f"http://127.0.0.1:{server}" if isinstance(server, int) else metrics_url(server)
    code, body = await fetch(where, "/status.json" + query)
    assert code == 200
    return json.loads(body)


# ---- the pure parts ---------------------------------------------------------------------------

def test_ring_keeps_the_newest_snapshots_and_turns_them_into_rates():
    ring = Ring(("total", "gauge"), capacity=3, step=1.0)
    assert len(ring) == 0 and ring.at_or_before(5) is None
    for t in range(5):
        ring.append(float(t), (t * 10.0, t % 2))
    assert len(ring) == 3
    assert ring.times() == [2.0, 3.0, 4.0]
    assert ring.column("total") == [20.0, 30.0, 40.0]
    assert ring.at_or_before(3.5) == (3.0, {"total": 30.0, "gauge": 1.0})
    assert ring.at_or_before(0.0)[0] == 2.0  # older than the ring: its oldest snapshot
    assert ring.series(rates={"per_s": "total"}, gauges={"g": "gauge"}) == {
        "t": [3.0, 4.0], "g": [1.0, 0.0], "per_s": [10.0, 10.0]}
    assert ring.series(rates={"per_s": "total"}, gauges={}, after=3.0) == {
        "t": [4.0], "per_s": [10.0]}
    assert ring.series(rates={"per_s": "total"}, gauges={}, after=4.0) == {"t": [], "per_s": []}


def test_last_change_dates_only_increases():
    last = LastChange()
    last.observe(1.0, {"a": 0, "b": 2})  # b counted before the first look: dated to it
    assert last.at == {"b": 1.0}
    last.observe(2.0, {"a": 1, "b": 2})
    last.observe(3.0, {"a": 1, "b": 2})
    assert last.at == {"a": 2.0, "b": 1.0}


async def test_history_stays_bounded_over_hours(autojump_clock):
    """Three hours of fake time: the rings hold 10 minutes at 1 s and an hour at 10 s, every
    sample on time, and the JSON's series are as long as the rings, not the run."""
    board = StatusBoard(Relay(KeyPair.generate()), StunCounters(), Config(), version="test",
                        tls=None, acme=None)
    start = trio.current_time()
    with trio.move_on_after(3 * 3600 + 0.5):
        await board.sample_forever()
    fine, coarse = board.fine.times(), board.coarse.times()
    assert len(fine) == FINE_POINTS and len(coarse) == COARSE_POINTS
    assert fine[-1] == start + 3 * 3600 and fine[0] == fine[-1] - (FINE_POINTS - 1)
    assert {b - a for a, b in zip(fine, fine[1:])} == {1.0}
    assert {b - a for a, b in zip(coarse, coarse[1:])} == {10.0}
    history = board.snapshot()["history"]
    assert len(history["fine"]["t"]) == FINE_POINTS - 1  # rates: one per neighbouring pair
    assert len(history["coarse"]["t"]) == COARSE_POINTS - 1
    assert history["fine"]["points"] == FINE_POINTS


def test_heaviest_senders_rank_bytes_per_interval_without_addresses():
    relay = Relay(KeyPair.generate())
    board = StatusBoard(relay, StunCounters(), Config(), version="t", tls=None, acme=None)
    peers = [FakePeer(KeyPair.generate().public) for _ in range(TOP_SENDERS + 2)]
    for p in peers:
        relay.router.register(p)
    board.top.rank(0.0)
    for i, p in enumerate(peers):
        p.rx_bytes = 5000 * i  # peers[0] sends nothing
    board.top.rank(5.0)
    assert [s["bytes_per_second"] for s in board.senders] == [
        1000 * i for i in range(len(peers) - 1, 1, -1)]
    assert board.senders[0]["key"] == short_key(peers[-1].key)
    assert board.senders[0]["key"].startswith(public_text(peers[-1].key)[:16])
    assert all("addr" not in s for s in board.senders)
    board.top.rank(10.0)  # nobody sent since
    assert board.senders == []

    shown = StatusBoard(relay, StunCounters(), Config(status_show_addrs=True), version="t",
                        tls=None, acme=None)
    shown.top.rank(0.0)
    assert {s["addr"] for s in shown.senders} == {"192.0.2.1:41641"}


def test_health_verdicts():
    now = 1_000_000.0
    fresh = {"certificate": None, "server": {"derp": True},
             "drops": [{"reason": "unknown_dest", "last_at": now - 1},
                       {"reason": "queue_head", "last_at": None}],
             "limits": [{"limit": "rate_config", "last_at": now - 1},
                        {"limit": "max_clients", "last_at": now - 600}],
             "mesh": {"links": []}}
    assert health(fresh, now) == {"state": "ok", "notes": []}  # peers leaving is normal
    fresh["drops"][1]["last_at"] = now - 10
    fresh["limits"][1]["last_at"] = now - 10
    assert health(fresh, now) == {"state": "warning", "notes": [
        "in the last 5 minutes, a client fell behind and lost its oldest queued packets "
        "(queue_head drops)",
        "in the last 5 minutes, -max-clients turned clients away (HTTP 503)"]}
    fresh["certificate"] = {"installed": True, "days_left": -1, "self_signed": False,
                            "last_error": "rate limited"}
    verdict = health(fresh, now)
    assert verdict["state"] == "error"
    assert verdict["notes"][:2] == ["the TLS certificate has expired",
                                    "the last certificate order failed: rate limited"]
    fresh["certificate"].update(installed=False)
    assert health(fresh, now)["notes"][0] == "no TLS certificate yet: clients cannot connect"


# ---- a real relay -----------------------------------------------------------------------------

async def test_status_json_equals_the_prometheus_counters(start_server, ca):
    server = await start_server(tls=True, metrics_addr="127.0.0.1:0", stun=True, stun_port=0)
    opts = connect_opts(server, ca)
    async with dc.connect(url(server), **opts) as a, dc.connect(url(server), **opts) as b:
        for _ in range(PACKETS):
            await a.send(b.public_key, bytes(SIZE))
        for _ in range(PACKETS):
            await recv_kind(b, ReceivedPacket)
        await a.send(KeyPair.generate().public, b"lost")
        for _ in range(STUN):
            await stun_query(server.stun_port)
        await wait_until(lambda: server.relay.stats.dropped(DropReason.UNKNOWN_DEST) == 1)
        done = trio.current_time()
        await wait_until(lambda: server.status.fine.times()[-1] > done, timeout=5)
        data = await get_json(server)
        _, text = await fetch(metrics_url(server), "/metrics")
    prom = prom_samples(text)

    c, t = data["clients"], data["traffic"]
    assert c["local"] == c["connections"] == 2 == prom_sum(prom, "derp_clients")
    assert c["connects_total"] == 2 == prom_sum(prom, "derper_client_connects_total")
    assert c["connects_per_minute"] == 2 and c["disconnects_total"] == 0
    assert t["packets_in_total"] == PACKETS + 1 == prom_sum(prom, "derp_packets_received_total")
    assert t["bytes_in_total"] == PACKETS * SIZE + 4 == prom_sum(prom,
                                                                 "derp_bytes_received_total")
    assert t["packets_out_total"] == PACKETS == prom_sum(prom, "derp_packets_sent_total")
    assert t["bytes_out_total"] == PACKETS * SIZE == prom_sum(prom, "derp_bytes_sent_total")
    for drop in data["drops"]:
        assert drop["packets"] == prom_sum(prom, "derp_packets_dropped_total",
                                           reason=drop["reason"])
        assert drop["bytes"] == prom_sum(prom, "derp_bytes_dropped_total", reason=drop["reason"])
    lost = next(d for d in data["drops"] if d["reason"] == "unknown_dest")
    assert (lost["packets"], lost["bytes"]) == (1, 4)
    assert data["generated_at"] - 5 < lost["last_at"] <= data["generated_at"]
    assert all(d["last_at"] is None for d in data["drops"] if d is not lost)
    for kind, v in data["stun"]["by_kind"].items():
        assert v["total"] == prom_sum(prom, "stun_requests_total", disposition=kind)
    assert data["stun"]["by_kind"]["success"]["total"] == STUN == data["stun"]["requests_total"]
    a = data["admission"]
    assert (a["allowed"], a["rejected"]) == (
        prom_sum(prom, "derper_admission_results_total", result="allowed"),
        prom_sum(prom, "derper_admission_results_total", result="rejected"))
    hits = {x["limit"]: x["hits"] for x in data["limits"]}
    assert hits == {
        "max_handshakes": prom_sum(prom, "derper_limit_rejections_total", limit="max_handshakes"),
        "max_clients": prom_sum(prom, "derper_limit_rejections_total", limit="max_clients"),
        "accept_connection_limit": prom_sum(prom, "tls_listener_rejected_connections_total"),
        "rate_config": prom_sum(prom, "derp_rate_limit_per_client_waited_total"),
        "bandwidth_limit": prom_sum(prom, "derper_bandwidth_limit_waited_total"),
        "tcp_write_timeout": prom_sum(prom, "derp_sclient_write_timeouts_total")}

    # The charts' rates add up to the totals: the first sample (which the chart has no point
    # for: each point is a rate since the one before) was taken before any traffic.
    fine = data["history"]["fine"]
    first, second = server.status.fine.times()[:2]  # trio's clock; the chart's is Unix time
    times = [first - second + fine["t"][0]] + fine["t"]
    relayed = sum(r * (t1 - t0) for r, t0, t1 in zip(fine["bytes_in_per_second"], times,
                                                       times[1:]))
    assert abs(relayed - t["bytes_in_total"]) <= len(fine["t"]) + 0.02 * t["bytes_in_total"]
    assert max(fine["clients"]) == 2

    s, cert = data["server"], data["certificate"]
    assert s["listen"]["derp"] == f"127.0.0.1:{server.main_port}"
    assert s["listen"]["metrics"] == f"127.0.0.1:{server.metrics_port}"
    assert s["tls"] == "manual" and s["server_key"] == public_text(server.relay.public_key)
    assert cert["installed"] and not cert["self_signed"] and cert["renewal"] == "files"
    assert cert["days_left"] > 300 and cert["issuer"] != cert["subject"]
    assert data["mesh"] == {"configured": False, "links": []}
    assert data["health"] == {"state": "ok", "notes": []}


async def test_since_returns_only_newer_points_and_bad_queries_are_refused(start_server):
    server = await start_server(metrics_addr="127.0.0.1:0")
    await wait_until(lambda: len(server.status.fine) >= 2, timeout=5)
    full = await get_json(server)
    newest = full["history"]["fine"]["t"][-1]
    part = await get_json(server, f"?since={newest}")
    assert all(t > newest for t in part["history"]["fine"]["t"])
    assert len(part["history"]["fine"]["t"]) < len(full["history"]["fine"]["t"])
    code, _ = await fetch(metrics_url(server), "/status.json?since=yesterday")
    assert code == 400


async def test_the_page_is_on_the_metrics_listener_only(start_server, ca):
    server = await start_server(tls=True, metrics_addr="127.0.0.1:0")
    code, html = await fetch(metrics_url(server), "/status")
    assert code == 200 and "/status/status.js" in html and "/status/uplot.min.js" in html
    for path in ("/status/status.js", "/status/status.css", "/status/uplot.min.js",
                 "/status/uplot.min.css", "/status/uplot-license.txt"):
        code, body = await fetch(metrics_url(server), path)
        assert code == 200 and body, path
    code, _ = await fetch(metrics_url(server), "/status/../metrics-nope")
    assert code == 404
    main = f"https://localhost:{server.main_port}"  # answers every path with its home page
    for path in ("/status", "/status.json", "/status/status.js"):
        code, body = await fetch(main, path, context=client_context(ca))
        assert "status.js" not in body and '"schema"' not in body, path


async def test_client_addresses_only_with_the_flag_or_variable(tmp_path):
    """Two relays at once (the ranking runs every 5 s): one told by DERP_STATUS_SHOW_ADDRS."""
    seen = {}

    async def heaviest(show: bool) -> None:
        main, metrics = free_port(), free_port()
        env = {"DERP_STATUS_SHOW_ADDRS": "true"} if show else {}
        async with derper(["-dev", "-a", f"127.0.0.1:{main}", "-stun=false",
                           "-metrics-addr", f"127.0.0.1:{metrics}"], tmp_path, env):
            async with dc.connect(f"http://127.0.0.1:{main}/derp",
                                  dial=("127.0.0.1", main)) as client:
                await client.send(client.public_key, b"x" * 1000)
                await recv_kind(client, ReceivedPacket)
                with trio.fail_after(15):
                    while not (data := await get_json(metrics))["heaviest_senders"]:
                        await trio.sleep(0.5)
        seen[show] = (short_key(client.public_key), data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heaviest, True)
        nursery.start_soon(heaviest, False)
    key, data = seen[True]
    assert data["heaviest_senders"][0]["key"] == key
    assert data["heaviest_senders"][0]["addr"].startswith("127.0.0.1:")
    key, data = seen[False]
    sender = data["heaviest_senders"][0]
    assert sender["key"] == key and set(sender) == {"key", "bytes_per_second"}
    # The client's address is nowhere; only the server's own listen addresses are shown.
    assert "127.0.0.1" not in json.dumps({k: v for k, v in data.items() if k != "server"})


async def test_acme_schedule_and_last_error(start_server, tmp_path):
    """A CA that cannot be reached: no certificate, the error, and when the next order is due."""
    closed = free_port()
    server = await start_server(
        dev=False, certmode="letsencrypt", hostname="derp.example.com",
        certdir=str(tmp_path / "certs"), http_port=0, metrics_addr="127.0.0.1:0",
        acme_directory=f"https://127.0.0.1:{closed}/dir", acme_retry_min=30, acme_retry_max=60)
    await wait_until(lambda: server.acme.failures >= 1)
    data = await get_json(server)
    cert, now = data["certificate"], data["generated_at"]
    assert data["server"]["tls"] == "letsencrypt"
    assert cert["installed"] is False and cert["renewal"] == "acme"
    assert "cannot reach the ACME server" in cert["last_error"]
    assert now - 10 < cert["last_error_at"] <= now
    assert now + 20 < cert["next_renewal_at"] <= now + 30
    assert data["health"]["state"] == "error"
    assert data["health"]["notes"][0] == "no TLS certificate yet: clients cannot connect"
    assert data["health"]["notes"][1].startswith("the last certificate order failed: cannot reach")
