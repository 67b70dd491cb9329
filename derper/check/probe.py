"""The trio side of ``derper check``: ask the relay, record what it answered, let ``results``
judge.

Everything goes through the one DERP client (``derper.client``), its TCP/TLS dialling
(``net.dial``), the one h11 exchange (``http.client``) and the STUN codec (``stun.client``); no
second wire implementation. Each probe runs under ``timeout`` of its own, so an unreachable,
silent, slow or garbage-spewing server ends every check within it. The DERP chain (tcp → tls →
certificate → fast_start → derp → relay), STUN and the captive-portal request run at once.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import warnings
from dataclasses import dataclass

import trio

from stun.client import Binding, parse_response
from stun.message import tailscale_request

from ..client import DerpClient, DerpClientError, connect
from ..derpmap import NO_ADDRESS
from ..http import client as http_client
from ..net import dial
from ..net.addr import host_literal
from ..proto.keys import KeyPair
from ..proto.messages import ReceivedPacket
from ..proto.pin import PREFIX as PIN_PREFIX, pin_problem
from . import results
from .results import Attempt, Check, DerpOutcome, RelayOutcome, StunAttempt, skipped

RELAY_ROUNDS = 3
_STUN_TRIES = 4
_MAX_DETAIL = 200  # characters of a server's error text a check line shows


@dataclass(frozen=True)
class Target:
    """One relay to check, as a client of a DERP map would see it."""

    label: str
    host: str  # HostName: TLS name (SNI), Host header, DNS name
    port: int
    tls: bool = True
    ipv4: str = ""  # "" → DNS of host; "none" → off; else the address to dial
    ipv6: str = ""
    cert_name: str = ""  # a sha256-raw: pin, or the name to verify instead of host
    insecure: bool = False  # InsecureForTests
    stun_port: int = 3478  # -1: not checked
    http_port: int = 80  # -1: not checked
    http_required: bool = False  # a failure there fails (CanPort80, or the server serves it)
    derp: bool = True  # False: a STUN-only node
    on_relay_host: bool = False  # the dns check also asks whether the name points here


@dataclass(frozen=True)
class Facts:
    """What answered, for the DERP map's consistency rules."""

    resolved: tuple[str, ...]
    stun_answered: bool | None
    captive_ok: bool | None


def verify_context(ca_file: str = "") -> ssl.SSLContext:
    """The system roots (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured), plus ``ca_file``."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(ca_file)
    return ctx


def _probe_context() -> ssl.SSLContext:
    """No verification and every TLS version, so that an old server is seen, not refused."""
    ctx = dial.pinned_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # seeing old versions is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def check_target(target: Target, *, timeout: float, trust: ssl.SSLContext,
                       hints: dict[tuple[str, int], str] | None = None
                       ) -> tuple[list[Check], Facts]:
    """Every check of ``target`` in ``results.NAMES`` order (derp_map is the caller's)."""
    hints = hints or {}
    host = target.host.strip("[]")
    is_ip = results.is_ip(host)
    resolved, dns_error = ([host], "") if is_ip else await _resolve(host, timeout)
    addresses = _dial_addresses(target, host, resolved)
    out: dict[str, Check] = {}
    stun: list[StunAttempt] = []
    captive: list[bool] = []

    async def run_stun() -> None:
        if target.stun_port < 0:
            out["stun"] = skipped("stun", "not checked (STUN port -1)")
            return
        stun.extend(await _all([_stun_one(a, target.stun_port, timeout) for a in addresses]))
        out["stun"] = results.stun_check(stun, hints.get(("udp", target.stun_port), ""))

    async def run_captive() -> None:
        if target.http_port < 0:
            out["captive_portal"] = skipped("captive_portal", "not checked (HTTP port -1)")
            return
        if not addresses:
            out["captive_portal"] = skipped("captive_portal", "no address to connect to")
            return
        v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        out["captive_portal"] = check = await _captive((v4 or addresses)[0], target.http_port,
                                                       timeout, target.http_required,
                                                       hints.get(("tcp", target.http_port), ""))
        captive.append(check.status == results.OK)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_stun)
        nursery.start_soon(run_captive)
        await _derp_chain(target, host, addresses, timeout, trust, hints, out)
    if target.on_relay_host and not is_ip and resolved:
        public = sorted({a.mapped[0] for a in stun if a.mapped})
        out["dns"] = results.dns_check(host, resolved, dns_error, local=_on_this_host(resolved),
                                       public=public)
    else:
        out["dns"] = results.dns_check(host, resolved, dns_error)
    checks = [out[name] for name in results.NAMES if name in out]
    facts = Facts(tuple(resolved), bool([a for a in stun if a.mapped]) if stun else None,
                  captive[0] if captive else None)
    return checks, facts


def _dial_addresses(target: Target, host: str, resolved: list[str]) -> list[str]:
    """One address per family, as a Tailscale client picks them: the map's IPv4/IPv6 when set
    (``none`` or any non-address turns the family off), else the first DNS record."""
    out = []
    for family, given in ((4, target.ipv4), (6, target.ipv6)):
        if given == NO_ADDRESS:
            continue
        if given:
            if results.is_ip(given) and ipaddress.ip_address(given).version == family:
                out.append(given)
            continue
        found = [a for a in resolved if ipaddress.ip_address(a).version == family]
        if found:
            out.append(found[0])
    return out


async def _resolve(host: str, timeout: float) -> tuple[list[str], str]:
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except trio.TooSlowError:
        return [], f"the lookup timed out after {timeout:g}s"
    except (socket.gaierror, UnicodeError) as e:
        return [], getattr(e, "strerror", None) or str(e)
    found: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in found:
            found.append(sockaddr[0])
    return found, ""


def _on_this_host(addresses: list[str]) -> set[str]:
    """The addresses this machine can bind: the ones on its own interfaces."""
    local = set()
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((address, 0))
            except OSError:
                continue
        local.add(address)
    return local


async def _all(jobs: list) -> list:
    """Await the coroutines ``jobs`` at once; their results, in order."""
    done: list = [None] * len(jobs)

    async def one(i: int) -> None:
        done[i] = await jobs[i]

    async with trio.open_nursery() as nursery:
        for i in range(len(jobs)):
            nursery.start_soon(one, i)
    return done


def _os_error(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused (nothing listens there, or a firewall rejects it)"
    return (e.strerror or str(e) or type(e).__name__).lower()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"


# ---- tcp, tls, certificate ---------------------------------------------------------------------

async def _tcp_one(address: str, port: int, timeout: float
                   ) -> tuple[Attempt, trio.SocketStream | None]:
    start = trio.current_time()
    try:
        with trio.fail_after(timeout):
            stream = await dial.open_tcp(address, port)
    except trio.TooSlowError:
        return Attempt(address, port, error=f"no answer within {timeout:g}s (dropped by a "
                                            "firewall?)"), None
    except OSError as e:
        return Attempt(address, port, error=_os_error(e)), None
    return Attempt(address, port, trio.current_time() - start), stream


async def _tls(stream: trio.SocketStream, host: str, timeout: float
               ) -> tuple[dial.TLSFacts | None, str, str]:
    """(facts, cipher, error) of a handshake that verifies nothing; error as ``tls_check``
    wants it."""
    tls = dial.tls_client(stream, ssl_context=_probe_context(), cert_pin=None,
                          server_hostname=host)
    try:
        with trio.fail_after(timeout):
            facts = await dial.tls_handshake(tls, None)
    except trio.TooSlowError:
        return None, "", f"timeout: no answer within {timeout:g}s"
    except (trio.BrokenResourceError, OSError) as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLError):
            return None, "", cause.reason or str(cause)
        return None, "", "closed"
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await tls.aclose()
    cipher = tls.ssl_object.cipher()
    return facts, cipher[0] if cipher else "", ""


async def _verify(address: str, port: int, name: str, timeout: float,
                  trust: ssl.SSLContext) -> tuple[int, str] | None:
    """OpenSSL's (code, message) when the chain does not verify for ``name``; None if it does."""
    try:
        with trio.fail_after(timeout):
            stream = await dial.open_tcp(address, port)
    except trio.TooSlowError:
        return -1, "could not connect again to verify: timeout"
    except OSError as e:
        return -1, f"could not connect again to verify: {_os_error(e)}"
    tls = dial.tls_client(stream, ssl_context=trust, cert_pin=None, server_hostname=name)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        return -1, "the verifying handshake timed out"
    except (trio.BrokenResourceError, OSError) as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_code, cause.verify_message
        return -1, _short(str(e))
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await tls.aclose()
    return None


async def _derp_chain(target: Target, host: str, addresses: list[str], timeout: float,
                      trust: ssl.SSLContext, hints: dict, out: dict[str, Check]) -> None:
    later = ("tls", "certificate", "fast_start", "derp", "relay")
    if not target.derp:
        out["tcp"] = skipped("tcp", "a STUN-only node (STUNOnly): no DERP to check")
        out.update((name, skipped(name, "a STUN-only node")) for name in later)
        return
    tried = await _all([_tcp_one(a, target.port, timeout) for a in addresses])
    out["tcp"] = results.tcp_check([a for a, _ in tried], hints.get(("tcp", target.port), ""))
    streams = [s for _, s in tried if s is not None]
    for extra in streams[1:]:
        await extra.aclose()
    if not streams:
        out.update((name, skipped(name, "TCP did not connect")) for name in later)
        return
    address = next(a.address for a, s in tried if s is not None)
    opts: dict = {"dial": (address, target.port)}
    verified = True
    if target.tls:
        facts, cipher, error = await _tls(streams[0], host, timeout)
        out["tls"] = results.tls_check(facts.version if facts else None, cipher, error)
        if facts is None:
            out.update((name, skipped(name, "the TLS handshake failed")) for name in later[1:])
            return
        verified = await _certificate(target, host, address, facts, timeout, trust, out, opts)
        out["fast_start"] = results.fast_start_check(facts.version, facts.chain)
    else:
        await streams[0].aclose()
        for name in later[:3]:
            out[name] = skipped(name, "plain HTTP (http:// target): no TLS")
    scheme = "https" if target.tls else "http"
    url = f"{scheme}://{host_literal(host)}:{target.port}/derp"
    outcome = await _derp(url, opts, timeout, verified)
    out["derp"] = results.derp_check(outcome)
    if outcome.step and not outcome.refused:
        out["relay"] = skipped("relay", "the DERP handshake failed")
        return
    out["relay"] = results.relay_check(await _relay(url, opts, timeout))


async def _certificate(target: Target, host: str, address: str, facts: dial.TLSFacts,
                       timeout: float, trust: ssl.SSLContext, out: dict[str, Check],
                       opts: dict) -> bool:
    """The certificate check; fills the client's TLS options in ``opts`` (unverified when the
    certificate failed, so that derp and relay still say whether the rest works). Returns
    whether the certificate was verified."""
    leaf = results.leaf_of(facts.chain)
    now = datetime.datetime.now(datetime.timezone.utc)
    pin = target.cert_name if target.cert_name.lower().startswith(PIN_PREFIX) else ""
    if target.insecure:
        out["certificate"] = results.certificate_check(leaf, host, now, insecure=True)
    elif pin:
        out["certificate"] = results.certificate_check(
            leaf, host, now, pin=pin, pin_problem=pin_problem(facts.chain, pin, now))
    else:
        name = target.cert_name or host
        verify_error = await _verify(address, target.port, name, timeout, trust)
        out["certificate"] = results.certificate_check(leaf, name, now,
                                                       verify_error=verify_error)
    ok = out["certificate"].status in (results.OK, results.WARN) and not target.insecure
    if ok and pin:
        opts["cert_pin"] = pin
    elif ok:
        opts["ssl_context"] = trust
        if target.cert_name:
            opts["server_hostname"] = target.cert_name
    else:
        opts["ssl_context"] = dial.pinned_context()  # no verification: the check above failed
    return ok


# ---- derp and relay ----------------------------------------------------------------------------

def _refused(e: DerpClientError) -> bool:
    """The server took ClientInfo and closed without ServerInfo: how admission says no."""
    return e.step == "handshake" and isinstance(e.__cause__, EOFError)


async def _derp(url: str, opts: dict, timeout: float, verified: bool) -> DerpOutcome:
    start = trio.current_time()
    try:
        async with connect(url, KeyPair.generate(), timeout=timeout, **opts) as c:
            return DerpOutcome(trio.current_time() - start, c.server_key, c.server_info.version,
                               c.fast_start, verified=verified)
    except DerpClientError as e:
        return DerpOutcome(step=e.step, error=_short(e.detail), refused=_refused(e),
                           verified=verified)


async def _relay(url: str, opts: dict, timeout: float) -> RelayOutcome:
    """Two fresh clients; one packet each way until the first arrives (a server may register
    a client only after its ServerInfo), then ``RELAY_ROUNDS`` timed round trips."""
    rtts = []
    try:
        with trio.fail_after(timeout):
            async with connect(url, KeyPair.generate(), timeout=timeout, **opts) as a, \
                    connect(url, KeyPair.generate(), timeout=timeout, **opts) as b:
                await _first_packet(a, b)
                for _ in range(RELAY_ROUNDS):
                    payload = os.urandom(16)
                    start = trio.current_time()
                    await a.send(b.public_key, payload)
                    await _packet_from(b, a.public_key, payload)
                    await b.send(a.public_key, payload)
                    await _packet_from(a, b.public_key, payload)
                    rtts.append(trio.current_time() - start)
    except trio.TooSlowError:
        return RelayOutcome(tuple(rtts), f"packets did not arrive within {timeout:g}s")
    except DerpClientError as e:
        return RelayOutcome(error=_short(e.detail), refused=_refused(e))
    return RelayOutcome(tuple(rtts))


async def _first_packet(a: DerpClient, b: DerpClient) -> None:
    payload = os.urandom(16)
    while True:
        await a.send(b.public_key, payload)
        with trio.move_on_after(0.2):
            await _packet_from(b, a.public_key, payload)
            return


async def _packet_from(client: DerpClient, source: bytes, payload: bytes) -> None:
    while True:
        m = await client.recv()
        if isinstance(m, ReceivedPacket) and m.source == source and m.data == payload:
            return


# ---- stun, captive_portal ----------------------------------------------------------------------

async def _stun_one(address: str, port: int, timeout: float) -> StunAttempt:
    """A Tailscale Binding request (what clients send), resent until answered or ``timeout``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    txid = os.urandom(12)
    request = tailscale_request(txid)
    garbage = False
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        start = trio.current_time()
        try:
            await sock.connect((address, port))
            with trio.move_on_after(timeout):
                while True:
                    await sock.send(request)
                    with trio.move_on_after(timeout / _STUN_TRIES):
                        while True:
                            answer = parse_response(await sock.recv(2048), txid)
                            if isinstance(answer, Binding):
                                return StunAttempt(address, port, trio.current_time() - start,
                                                   answer.mapped)
                            garbage = True
        except ConnectionRefusedError:
            return StunAttempt(address, port, error=f"port unreachable: nothing listens on UDP "
                                                    f"{port}")
        except OSError as e:
            return StunAttempt(address, port, error=_os_error(e))
    if garbage:
        return StunAttempt(address, port, error="answered, but not with a valid STUN Binding "
                                                "response")
    return StunAttempt(address, port, error=f"no answer within {timeout:g}s")


async def _captive(address: str, port: int, timeout: float, required: bool,
                   hint: str) -> Check:
    """``/generate_204`` with the challenge a Tailscale client sends (``ts_<IPv4>``)."""
    where = f"{host_literal(address)}:{port}"
    challenge = f"ts_{address}"
    start = trio.current_time()
    try:
        with trio.fail_after(timeout):
            resp = await http_client.request(
                "GET", f"http://{where}/generate_204",
                headers=[("X-Tailscale-Challenge", challenge)])
    except trio.TooSlowError:
        return results.captive_portal_check(where, None, False, 0, f"no answer within "
                                            f"{timeout:g}s", required=required, hint=hint)
    except http_client.HTTPClientError as e:
        return results.captive_portal_check(where, None, False, 0, _short(str(e)),
                                            required=required, hint=hint)
    echoed = (b"x-tailscale-response", f"response {challenge}".encode()) in resp.headers
    return results.captive_portal_check(where, resp.status, echoed,
                                        trio.current_time() - start, "", required=required,
                                        hint=hint)
