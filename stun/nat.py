"""NAT behaviour (RFC 5780 §4) from what the probes saw, and what it means for Tailscale.

Pure: the prober (``stun.prober``) sends what ``alternates`` says and hands back
``Observations``; ``classify`` turns them into a ``Report``. Every conclusion needs positive
evidence. An answer from the wrong address, two different mappings for one destination, or a
missing answer that a control probe cannot explain make that part ``unknown``, so a server that
lies or answers garbage costs the answer, never gives a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from derper.net.addr import host_literal
from stun.client import Address, Binding
from stun.message import CHANGE_IP, CHANGE_PORT

EI, AD, APD, UNKNOWN = ("endpoint-independent", "address-dependent",
                        "address-and-port-dependent", "unknown")
MAPPING_SOCKET, FILTERING_SOCKET, IPV6_SOCKET = "mapping", "filtering", "ipv6"
TAILSCALE_PORT = 41641


@dataclass(frozen=True)
class Probe:
    """One request and its answer: ``answer`` is None when nothing (believable) came back."""

    socket: str  # MAPPING_SOCKET, FILTERING_SOCKET or IPV6_SOCKET
    dest: Address
    change: int = 0  # CHANGE-REQUEST flags sent
    answer: Binding | int | None = None  # an int: the error code of an error response
    source: Address | None = None  # where the answer came from


@dataclass
class Observations:
    local: Address  # the mapping socket's own address, as the kernel picked it
    probes: list[Probe] = field(default_factory=list)
    server: tuple[Address, ...] = ()  # the RFC 5780 server's addresses (``alternates``), if any
    heard: bool = False  # any IPv4 datagram came back at all
    hairpin: bool | None = None
    local6: Address | None = None  # the IPv6 socket's own address, when there is one


@dataclass(frozen=True)
class Report:
    udp: bool
    public: str | None
    mapping: str
    filtering: str
    port_preserving: bool | None
    hairpin: bool | None
    ipv6: bool | None
    verdict: str  # direct | easy-peers-only | relayed | unknown
    summary: str
    helps: tuple[str, ...]
    notes: tuple[str, ...]


def alternates(dest: Address, binding: Binding) -> tuple[Address, ...]:
    """The RFC 5780 server's addresses as this client can reach them, indexed like
    ``stun.message.Layout`` (bit 1 alternate IP, bit 0 alternate port); () if it has none.

    A server with one IP (OTHER-ADDRESS's IP is the one it answered from) is reached at the IP
    we used, so a server behind a cloud's 1:1 NAT, which only knows its private IP, still works.
    """
    other, origin = binding.other, binding.origin or dest
    if other is None or other[1] in (0, dest[1]) or (":" in other[0]) != (":" in dest[0]):
        return ()
    if other[0] in (origin[0], dest[0]):
        return dest, (dest[0], other[1])
    return dest, (dest[0], other[1]), (other[0], dest[1]), other


def change_tests(server: tuple[Address, ...]) -> list[tuple[int, int]]:
    """(CHANGE-REQUEST flags, index of the socket that must answer) worth asking ``server``."""
    tests = [(CHANGE_PORT, 1)]
    if len(server) == 4:
        tests.insert(0, (CHANGE_IP | CHANGE_PORT, 3))
    return tests


def classify(obs: Observations) -> Report:
    notes: list[str] = []
    mapped, mapping, varies = _mapping(obs, notes)
    no_nat = mapped == obs.local
    filtering, open_filter = _filtering(obs, notes, varies)
    ipv6 = _ipv6(obs, notes)
    ipv4 = any(p.socket == MAPPING_SOCKET for p in obs.probes)
    udp = obs.heard or mapped is not None or (not ipv4 and bool(ipv6))
    port_preserving = None if mapped is None else mapped[1] == obs.local[1]
    if no_nat:
        notes.insert(0, "no NAT: the mapped address is this machine's own")
    if ipv4:
        verdict, summary, helps = _verdict(udp, mapping, varies, open_filter, no_nat)
    else:
        verdict, summary, helps = "unknown", "IPv4 was not measured: no server has an IPv4 " \
            "address, and most peers are reached over IPv4.", ()
    return Report(udp=udp, public=None if mapped is None else _text(mapped), mapping=mapping,
                  filtering=filtering, port_preserving=port_preserving,
                  hairpin=None if no_nat else obs.hairpin, ipv6=ipv6, verdict=verdict,
                  summary=summary, helps=helps, notes=tuple(notes))


def _text(addr: Address) -> str:
    return f"{host_literal(addr[0])}:{addr[1]}"


def _answered(probe: Probe, expect: Address) -> Binding | None:
    """The probe's Binding if it came from ``expect``; a reply from elsewhere is not believed."""
    if isinstance(probe.answer, Binding) and probe.source == expect:
        return probe.answer
    return None


def _mapping(obs: Observations, notes: list[str]) -> tuple[Address | None, str, bool]:
    """(first mapped address, mapping behaviour, whether the mapping is known to vary with the
    destination) from the plain requests of the mapping socket."""
    seen: dict[Address, Address] = {}
    for probe in obs.probes:
        if probe.socket != MAPPING_SOCKET or probe.change:
            continue
        binding = _answered(probe, probe.dest)
        if binding is None:
            continue
        if seen.setdefault(probe.dest, binding.mapped) != binding.mapped:
            notes.append(f"{_text(probe.dest)} gave two different mapped addresses to one "
                         "socket: not believed")
            return None, UNKNOWN, False
    if not seen:
        return None, UNKNOWN, False
    first = next(iter(seen.values()))
    if first == obs.local:
        return first, EI, False
    port_dependent = port_independent = address_dependent = address_independent = False
    dests = list(seen)
    for i, a in enumerate(dests):
        for b in dests[i + 1:]:
            same = seen[a] == seen[b]
            if a[0] == b[0]:
                port_dependent |= not same
                port_independent |= same
            else:
                address_dependent |= not same
                address_independent |= same
    if port_dependent:
        return first, APD, True
    if address_dependent:
        if port_independent:
            return first, AD, True
        notes.append("the mapped address changes with the server's address (a hard NAT); a "
                     "server with a second port would tell address- from address-and-port-"
                     "dependent")
        return first, UNKNOWN, True
    if address_independent:
        return first, EI, False
    if port_independent:
        notes.append("the mapping stays the same for another port of the server; add a STUN "
                     "server at another IP (e.g. stun.l.google.com:19302) to tell endpoint-"
                     "independent from address-dependent")
        return first, UNKNOWN, False
    notes.append("give two servers, or one with RFC 5780 (derper -stun-alt-port), to measure "
                 "the mapping")
    return first, UNKNOWN, False


def _filtering(obs: Observations, notes: list[str], varies: bool) -> tuple[str, bool | None]:
    """(filtering behaviour, whether a reply from a port we never sent to got in)."""
    server = obs.server
    if not server:
        notes.append("no RFC 5780 server among those given: filtering not measured")
        return UNKNOWN, None
    fresh = [p for p in obs.probes if p.socket == FILTERING_SOCKET and p.dest == server[0]]
    if not any(_answered(p, server[0]) for p in fresh if not p.change):
        notes.append("the filtering test's own first request went unanswered: filtering unknown")
        return UNKNOWN, None
    passed, honest = {}, {}
    for flags, index in change_tests(server):
        for probe in obs.probes:
            if probe.dest != server[0] or probe.change != flags or probe.socket == IPV6_SOCKET:
                continue
            ok = _answered(probe, server[index]) is not None
            if probe.answer is not None and not ok:
                notes.append(f"{_text(server[0])} answered CHANGE-REQUEST wrongly: filtering "
                             "unknown")
                return UNKNOWN, None
            if probe.socket == FILTERING_SOCKET:
                passed[flags] = ok
            honest[flags] = honest.get(flags, False) or ok
    both = CHANGE_IP | CHANGE_PORT
    if passed.get(both):
        return EI, True
    if passed.get(CHANGE_PORT):
        if both in passed and honest.get(both):
            return AD, True
        notes.append("replies from another port get in: endpoint-independent or address-"
                     "dependent filtering (a server with a second IP tells which)")
        return UNKNOWN, True
    if honest.get(CHANGE_PORT):
        return APD, False
    notes.append("with a new mapping for every destination, no control shows that the server "
                 "sent its replies from its other address: filtering unknown" if varies else
                 "the server's replies from its other address did not arrive even where they "
                 "should: filtering unknown")
    return UNKNOWN, None


def _ipv6(obs: Observations, notes: list[str]) -> bool | None:
    tried = [p for p in obs.probes if p.socket == IPV6_SOCKET]
    if not tried:
        return None
    answers = [b for b in (_answered(p, p.dest) for p in tried) if b is not None]
    if obs.local6 is not None and any(b.mapped == obs.local6 for b in answers):
        notes.append("IPv6 works without NAT: direct connections to peers that have IPv6 too")
    return bool(answers)


_HELPS_NAT = (
    "turn on UPnP, NAT-PMP or PCP on the router: tailscaled then asks it for a port mapping",
    f"or forward a UDP port on the router to each device (tailscaled uses {TAILSCALE_PORT} "
    "unless told otherwise with tailscaled --port)",
    "and run this relay close to the devices, so the relayed traffic stays fast",
)


def _verdict(udp: bool, mapping: str, varies: bool, open_filter: bool | None,
             no_nat: bool) -> tuple[str, str, tuple[str, ...]]:
    """The verdict code, a sentence and what helps. Direct needs the public port to stay the
    same for every peer (endpoint-independent mapping); hole punching then works with any peer
    that does the same, and with every peer when replies from new ports also get in."""
    if not udp:
        return ("relayed", "Tailscale will be relayed: no UDP came back from any STUN server "
                "(UDP is blocked on this network).",
                ("allow outgoing UDP (at least to port 41641 and 3478) on the firewall",
                 "else run this relay close to the devices: DERP over TCP 443 still works"))
    if varies:
        return ("relayed", "Tailscale will mostly be relayed: this NAT gives a new public port "
                "for every destination (a hard NAT), so only peers with a public address or a "
                "port forward can reach this device directly.", _HELPS_NAT)
    if mapping != EI:
        return ("unknown", "Cannot tell whether Tailscale connects directly: the mapping could "
                "not be measured.",
                ("run derper nat against two STUN servers, or one derper with -stun-alt-port",))
    if open_filter:
        where = "this device has a public address" if no_nat else "the NAT is easy"
        return ("direct", f"Direct connections should work: {where} and lets in replies "
                "from new ports.", ())
    why = ("the public port stays the same, but peers behind hard NATs cannot get in"
           if open_filter is False else "the public port stays the same; whether peers behind "
           "hard NATs get in could not be measured")
    return ("easy-peers-only", f"Direct connections only with peers on easy NATs: {why}, so "
            "connections to those are relayed.", _HELPS_NAT)
