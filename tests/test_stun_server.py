"""The trio responder on real loopback sockets, answering real STUN clients.

Each client must be told the address its socket really used; for clients that choose their own
port, the kernel's view of the request (an AF_PACKET capture on ``lo``) is the ground truth.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import re
import socket
import struct
from collections import Counter
from functools import partial

import pytest
import trio
import trio.testing
from aioice import ice, stun as aioice_stun

from stun.counters import StunCounters
from stun.message import Disposition, tailscale_request
from stun.server import serve_stun
from tests.system import require_binary

LOOPBACKS = ["127.0.0.1", "::1"]
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003


async def start(nursery: trio.Nursery, host: str | None, *,
                strict: bool = False) -> tuple[int, StunCounters]:
    counters = StunCounters()
    bound = await nursery.start(partial(serve_stun, host, 0, strict=strict, counters=counters))
    assert len(bound) == 1
    assert bound[0][0] == (host or "::")
    return bound[0][1], counters


def _udp_to_port_filter(port: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF over an IP packet: keep IPv4/IPv6 UDP datagrams to ``port``, drop the rest."""
    return [
        (0x30, 0, 0, 0),      # 0  A = byte 0
        (0x54, 0, 0, 0xF0),   # 1  A &= 0xf0 (IP version)
        (0x15, 0, 5, 0x40),   # 2  IPv4? else 8
        (0x30, 0, 0, 9),      # 3  A = protocol
        (0x15, 0, 9, 17),     # 4  UDP? else drop
        (0xB1, 0, 0, 0),      # 5  X = IPv4 header length
        (0x48, 0, 0, 2),      # 6  A = UDP destination port
        (0x15, 5, 6, port),   # 7  ours? keep : drop
        (0x15, 0, 5, 0x60),   # 8  IPv6? else drop
        (0x30, 0, 0, 6),      # 9  A = next header
        (0x15, 0, 3, 17),     # 10 UDP? else drop
        (0x28, 0, 0, 42),     # 11 A = UDP destination port
        (0x15, 0, 1, port),   # 12 ours? keep : drop
        (0x06, 0, 0, 0xFFFF),  # 13 keep
        (0x06, 0, 0, 0),      # 14 drop
    ]


class Sniffer:
    """Source addresses of the UDP datagrams sent to one loopback port, as the kernel saw them.

    The kernel filters, so other loopback traffic cannot crowd ours out of the capture buffer.
    """

    def __init__(self, port: int) -> None:
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # no capture yet
        except PermissionError:
            pytest.skip("needs CAP_NET_RAW to see which port a client really used")
        program = b"".join(struct.pack("HBBI", *op) for op in _udp_to_port_filter(port))
        self._program = ctypes.create_string_buffer(program)  # must outlive the setsockopt
        fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(self._program))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self.sock.bind(("lo", ETH_P_ALL))  # capture starts here, already filtered
        self.sock.setblocking(False)

    def sources(self) -> set[tuple[str, int]]:
        seen = set()
        with self.sock:
            while True:
                try:
                    packet = self.sock.recv(65535)
                except BlockingIOError:
                    return seen
                if packet[0] >> 4 == 4:
                    udp = (packet[0] & 0x0F) * 4
                    src = socket.inet_ntop(socket.AF_INET, packet[12:16])
                else:
                    udp, src = 40, socket.inet_ntop(socket.AF_INET6, packet[8:24])
                seen.add((src, struct.unpack_from("!H", packet, udp)[0]))


def aioice_binding(server: tuple[str, int], local_host: str,
                   fingerprint: bool) -> tuple[tuple, tuple]:
    """(XOR-MAPPED-ADDRESS, local address) from one aioice Binding transaction, in this thread."""

    class Receiver:  # what StunProtocol hands to the ICE layer: nothing, in this exchange
        def data_received(self, data, component):
            raise AssertionError(data)

        def request_received(self, message, addr, protocol):
            raise AssertionError(message)

        def protocol_lost(self, protocol):
            pass

    async def main():
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: ice.StunProtocol(Receiver()), local_addr=(local_host, 0))
        try:
            request = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
            if fingerprint:
                request.add_fingerprint()
            response, _ = await protocol.request(request, server, retransmissions=3)
            local = transport.get_extra_info("sockname")[:2]
            return response.attributes["XOR-MAPPED-ADDRESS"], local
        finally:
            transport.close()

    return asyncio.run(main())


async def turnutils_stunclient(server: str, port: int) -> tuple[str, int]:
    binary = require_binary("turnutils_stunclient", "coturn")
    proc = await trio.run_process([binary, "-p", str(port), server], capture_stdout=True,
                                  check=False)
    out = proc.stdout.decode()
    found = re.findall(r"UDP reflexive addr: (\S+):(\d+)", out)
    assert proc.returncode == 0 and found, out
    return found[0][0], int(found[0][1])


async def vovida_stun(server: str, port: int, *args: str) -> tuple[int, str]:
    binary = require_binary("stun", "stun-client")
    proc = await trio.run_process([binary, f"{server}:{port}", *args], capture_stdout=True,
                                  capture_stderr=True, check=False)
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()


@pytest.mark.parametrize("host", LOOPBACKS)
async def test_turnutils_stunclient_gets_its_true_address(nursery, host):
    port, counters = await start(nursery, host)
    sniffer = Sniffer(port)
    mapped = await turnutils_stunclient(host, port)
    assert {mapped} == sniffer.sources()
    assert counters.by_disposition()["success"] == 1
    ipv4 = "." in host
    assert counters.by_family() == {"ipv4": int(ipv4), "ipv6": int(not ipv4)}


async def test_dual_stack_turnutils_stunclient_over_both_families(nursery):
    port, counters = await start(nursery, None)
    for host in LOOPBACKS:
        sniffer = Sniffer(port)
        mapped = await turnutils_stunclient(host, port)
        assert {mapped} == sniffer.sources()  # IPv4 told 127.0.0.1, not ::ffff:127.0.0.1
    assert counters.by_family() == {"ipv4": 1, "ipv6": 1}


@pytest.mark.parametrize("host", ["127.0.0.1", None])
async def test_rfc3489_stun_client_gets_its_true_address(nursery, host):
    """Debian's `stun` speaks IPv4 only; its exit code is a NAT-type bitmap, not success."""
    port, counters = await start(nursery, host)
    sniffer = Sniffer(port)
    _, out = await vovida_stun("127.0.0.1", port, "1", "-v")  # test 1: one plain Binding request
    [(ip, client_port)] = sniffer.sources()
    assert "ok=1" in out and f"MappedAddress = {ip}:{client_port}" in out, out
    assert counters.by_disposition()["success"] == 1


async def test_rfc3489_nat_discovery_is_not_blocked(nursery):
    """The full run also asks for changed addresses: those get 420s, test I still succeeds."""
    port, counters = await start(nursery, "127.0.0.1")
    rc, out = await vovida_stun("127.0.0.1", port)
    assert "Primary:" in out and "Blocked" not in out, out
    assert rc & 0x0E != 0x0C, out  # 0x0C: blocked or could not reach the server
    seen = counters.by_disposition()
    assert seen["success"] >= 1 and seen["unknown_attribute"] >= 2, seen


@pytest.mark.parametrize("fingerprint", [False, True])
@pytest.mark.parametrize(("server_host", "client_host"), [
    ("127.0.0.1", "127.0.0.1"), ("::1", "::1"), (None, "127.0.0.1"), (None, "::1")])
async def test_aioice_gets_its_true_address(nursery, server_host, client_host, fingerprint):
    port, counters = await start(nursery, server_host)
    mapped, local = await trio.to_thread.run_sync(
        aioice_binding, (client_host, port), client_host, fingerprint)
    assert mapped == local  # 127.0.0.1 from a dual-stack socket too, never ::ffff:127.0.0.1
    assert counters.by_disposition()["success"] >= 1  # more only if aioice retransmitted


async def exchange(family: int, server: tuple[str, int], *requests: bytes) -> tuple[bytes, tuple]:
    """Send ``requests`` from a fresh socket, retrying like a client; first reply, local address."""
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.bind((server[0], 0))
        for _ in range(3):
            for req in requests:
                await sock.sendto(req, server)
            with trio.move_on_after(2):
                reply, _ = await sock.recvfrom(2048)
                return reply, sock.getsockname()[:2]
    pytest.fail("no reply after 3 tries")


def xor_mapped(reply: bytes) -> tuple[str, int]:
    """Decode the single XOR-MAPPED-ADDRESS of a Go-style reply (independently of the codec)."""
    assert reply[:2] == b"\x01\x01" and reply[20:22] == b"\x00\x20"
    family, xport = struct.unpack_from("!xBH", reply, 24)
    raw = bytes(a ^ b for a, b in zip(reply[28:], reply[4:20], strict=False))
    return socket.inet_ntop(socket.AF_INET if family == 1 else socket.AF_INET6, raw), xport ^ 0x2112


@pytest.mark.parametrize(("server_host", "client_family", "want_len", "want_ip"), [
    ("127.0.0.1", socket.AF_INET, 32, "127.0.0.1"),
    ("::1", socket.AF_INET6, 44, "::1"),
    (None, socket.AF_INET, 44, "::ffff:127.0.0.1"),  # Go's dual-stack form: family 02, v4-mapped
])
async def test_tailscale_request_answered_like_go(nursery, server_host, client_family, want_len,
                                                  want_ip):
    port, counters = await start(nursery, server_host)
    txid = os.urandom(12)
    target = ("127.0.0.1" if client_family == socket.AF_INET else "::1", port)
    reply, local = await exchange(client_family, target, tailscale_request(txid))
    assert len(reply) == want_len and reply[8:20] == txid
    assert xor_mapped(reply) == (want_ip, local[1])
    family, other = ("ipv4", "ipv6") if client_family == socket.AF_INET else ("ipv6", "ipv4")
    assert counters.by_family()[family] >= 1 and counters.by_family()[other] == 0


async def test_strict_answers_only_tailscale(nursery):
    port, counters = await start(nursery, "127.0.0.1", strict=True)
    generic = aioice_stun.Message(aioice_stun.Method.BINDING, aioice_stun.Class.REQUEST)
    txid = os.urandom(12)
    # Loopback keeps order and the responder answers in order: were the generic request answered,
    # its reply would come first.
    reply, _ = await exchange(socket.AF_INET, ("127.0.0.1", port), bytes(generic),
                              tailscale_request(txid))
    assert reply[8:20] == txid
    seen = counters.by_disposition()
    assert seen["strict_ignored"] == seen["success"] >= 1


def junk(rng: random.Random) -> tuple[bytes, Disposition]:
    """One random junk datagram and the disposition it must get."""
    kind = rng.randrange(6)
    if kind == 0:  # short
        return rng.randbytes(rng.randrange(20)), Disposition.NOT_STUN
    if kind == 1:  # top bits set
        first = bytes([rng.randrange(0x40, 256)])
        return first + rng.randbytes(rng.randrange(19, 600)), Disposition.NOT_STUN
    if kind == 2:  # oversized, up to the largest UDP datagram
        size = rng.choice([1500, 9000, 65000])
        return b"\x00\x01\x00\x00" + rng.randbytes(size), Disposition.NOT_STUN
    req = tailscale_request(rng.randbytes(12))
    if kind == 3:  # bad fingerprint
        return req[:36] + bytes([req[36] ^ 0xFF]) + req[37:], Disposition.MALFORMED
    if kind == 4:  # attribute overrun
        return req[:22] + b"\x01\x00" + req[24:], Disposition.MALFORMED
    return b"\x01\x01" + req[2:], Disposition.NOT_BINDING  # a response


async def test_junk_flood_while_real_clients_are_answered(nursery):
    port, counters = await start(nursery, "127.0.0.1")
    rng = random.Random(1234)
    expected: Counter[str] = Counter()
    answers = {}

    async def clients():
        answers["turnutils"] = await turnutils_stunclient("127.0.0.1", port)
        answers["aioice"] = await trio.to_thread.run_sync(
            aioice_binding, ("127.0.0.1", port), "127.0.0.1", True)

    async with trio.open_nursery() as inner:
        inner.start_soon(clients)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            queued = 0
            for _ in range(5000):
                data, disposition = junk(rng)
                expected[disposition.name.lower()] += 1
                await sock.sendto(data, ("127.0.0.1", port))
                queued += len(data) + 1024  # + kernel overhead per datagram
                if queued > 100_000:  # stay well inside the responder's socket buffer: none lost
                    await trio.testing.wait_all_tasks_blocked()  # the responder drained them all
                    queued = 0
    assert answers["turnutils"][0] == "127.0.0.1"
    mapped, local = answers["aioice"]
    assert mapped == local
    seen = counters.by_disposition()
    assert seen["success"] >= 2
    assert {k: seen[k] for k in expected} == dict(expected)
    assert sum(seen.values()) == 5000 + seen["success"]  # nothing else, nothing lost


async def test_failed_reply_is_counted_and_the_loop_goes_on(nursery):
    """A request from source port 0 (sent raw) cannot be answered: Linux refuses sendto port 0."""
    port, counters = await start(nursery, "127.0.0.1")
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError:
        pytest.skip("needs CAP_NET_RAW to send from UDP port 0")
    payload = tailscale_request(os.urandom(12))
    with raw:  # UDP header: source port 0, checksum 0 (none, allowed over IPv4)
        raw.sendto(struct.pack("!HHHH", 0, port, 8 + len(payload), 0) + payload, ("127.0.0.1", 0))
    reply, local = await exchange(socket.AF_INET, ("127.0.0.1", port), tailscale_request(b"x" * 12))
    assert xor_mapped(reply) == local
    seen = counters.by_disposition()
    assert seen["write_error"] == 1 and seen["success"] >= 1


async def test_cancellation_closes_the_socket():
    async with trio.open_nursery() as nursery:
        port, _ = await start(nursery, "127.0.0.1")
        nursery.cancel_scope.cancel()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))  # free again
