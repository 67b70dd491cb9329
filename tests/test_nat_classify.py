"""The classifier on hand-made observations: each NAT kind, plain servers, and liars.

A simulated NAT (mapping and filtering rules) answers the probes the prober would send, so the
classifier is checked against the behaviour that produced the observations.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from stun.client import Binding
from stun.message import CHANGE_IP, CHANGE_PORT
from stun.nat import (AD, APD, EI, FILTERING_SOCKET, MAPPING_SOCKET, UNKNOWN, Observations, Probe,
                      alternates, change_tests, classify)

LOCAL = ("192.0.2.2", 40000)
PUBLIC_IP = "198.51.100.1"
A1, A2 = "203.0.113.1", "203.0.113.2"
SERVER = ((A1, 3478), (A1, 3479), (A2, 3478), (A2, 3479))
KINDS = [EI, AD, APD]


class FakeNat:
    """A NAT with ``mapping`` and ``filtering`` behaviour, and a server that may misbehave."""

    def __init__(self, mapping: str, filtering: str, *, server: tuple = SERVER,
                 ignores_change: bool = False, preserve: bool = True) -> None:
        self.mapping, self.filtering, self.server = mapping, filtering, server
        self.ignores_change, self.preserve = ignores_change, preserve
        self.maps: dict[tuple, int] = {}  # (socket, key) → public port
        self.sent: dict[str, set] = {}  # socket → destinations sent to

    def _public(self, sock: str, dest: tuple) -> tuple[str, int]:
        key = {EI: (), AD: dest[0], APD: dest}[self.mapping]
        port = self.maps.setdefault((sock, key), (LOCAL[1] if self.preserve and not self.maps
                                                  else 50000 + len(self.maps)))
        return PUBLIC_IP, port

    def _lets_in(self, sock: str, source: tuple) -> bool:
        sent = self.sent.get(sock, set())
        if self.filtering == EI:
            return bool(sent)
        if self.filtering == AD:
            return any(d[0] == source[0] for d in sent)
        return source in sent

    def probe(self, sock: str, dest: tuple, change: int = 0) -> Probe:
        self.sent.setdefault(sock, set()).add(dest)
        mapped = self._public(sock, dest)
        index = self.server.index(dest) if dest in self.server else 0
        if change and not self.ignores_change:
            index ^= (2 if change & CHANGE_IP else 0) | (1 if change & CHANGE_PORT else 0)
        source = self.server[index] if dest in self.server else dest
        if not self._lets_in(sock, source):
            return Probe(sock, dest, change)
        # An endpoint-dependent mapping filters per mapping, too: only replies to the same one.
        if self.mapping != EI and self._public(sock, source) != mapped and source != dest:
            return Probe(sock, dest, change)
        other = self.server[index ^ (3 if len(self.server) == 4 else 1)]
        return Probe(sock, dest, change, Binding(mapped, source, other), source)

    def observe(self) -> Observations:
        """What ``stun.prober.observe`` would record against this NAT and one server."""
        obs = Observations(LOCAL)
        first = self.probe(MAPPING_SOCKET, self.server[0])
        obs.probes.append(first)
        obs.server = alternates(self.server[0], first.answer) if first.answer else ()
        obs.probes += [self.probe(MAPPING_SOCKET, d) for d in obs.server[1:]]
        if obs.server:
            obs.probes.append(self.probe(FILTERING_SOCKET, self.server[0]))
            obs.probes += [self.probe(FILTERING_SOCKET, self.server[0], f)
                           for f, _ in change_tests(obs.server)]
            obs.probes.append(self.probe(MAPPING_SOCKET, self.server[0]))
            obs.probes += [self.probe(MAPPING_SOCKET, self.server[0], f)
                           for f, _ in change_tests(obs.server)]
        obs.heard = any(p.answer for p in obs.probes)
        obs.hairpin = False
        return obs


@pytest.mark.parametrize("filtering", KINDS)
@pytest.mark.parametrize("mapping", KINDS)
def test_every_nat_kind_against_a_four_address_server(mapping, filtering):
    report = classify(FakeNat(mapping, filtering).observe())
    assert report.mapping == mapping
    assert report.public == f"{PUBLIC_IP}:{LOCAL[1]}" and report.port_preserving
    if mapping == EI:
        assert report.filtering == filtering
        assert report.verdict == ("easy-peers-only" if filtering == APD else "direct")
    else:
        # No control probe can show the server honest: a missing reply is not taken as proof.
        assert report.filtering in (filtering, UNKNOWN)
        assert report.verdict == "relayed"


@pytest.mark.parametrize(("filtering", "want"), [(EI, UNKNOWN), (AD, UNKNOWN), (APD, APD)])
def test_one_ip_server_tells_port_filtering_only(filtering, want):
    nat = FakeNat(EI, filtering, server=SERVER[:2])
    obs = nat.observe()
    report = classify(obs)
    assert (report.mapping, report.filtering, report.verdict) == (UNKNOWN, want, "unknown")
    assert any("another IP" in note for note in report.notes)
    obs.probes.append(nat.probe(MAPPING_SOCKET, (A2, 3478)))  # a plain server at another IP
    report = classify(obs)
    assert (report.mapping, report.filtering) == (EI, want)
    assert report.verdict == ("easy-peers-only" if filtering == APD else "direct")


def test_server_ignoring_change_request_gives_unknown_filtering():
    report = classify(FakeNat(EI, EI, ignores_change=True).observe())
    assert report.filtering == UNKNOWN and report.verdict == "easy-peers-only"
    assert any("wrongly" in note for note in report.notes)


def test_server_dropping_change_requests_is_caught_by_the_control():
    obs = FakeNat(EI, EI).observe()
    obs.probes = [p if not p.change else Probe(p.socket, p.dest, p.change) for p in obs.probes]
    report = classify(obs)
    assert report.filtering == UNKNOWN


def test_two_mappings_for_one_destination_are_not_believed():
    obs = FakeNat(EI, APD).observe()
    obs.probes.append(Probe(MAPPING_SOCKET, SERVER[0], 0, Binding((PUBLIC_IP, 1)), SERVER[0]))
    report = classify(obs)
    assert (report.mapping, report.verdict) == (UNKNOWN, "unknown")


def test_answer_from_the_wrong_address_is_not_believed():
    obs = Observations(LOCAL, [Probe(MAPPING_SOCKET, SERVER[0], 0, Binding((PUBLIC_IP, 5)),
                                     ("192.0.2.99", 3478))], heard=True)
    report = classify(obs)
    assert (report.udp, report.public, report.mapping) == (True, None, UNKNOWN)


def test_nothing_came_back_means_udp_blocked():
    report = classify(Observations(LOCAL, [Probe(MAPPING_SOCKET, SERVER[0])]))
    assert (report.udp, report.verdict) == (False, "relayed")
    assert report.hairpin is None and report.ipv6 is None


def test_no_nat():
    report = classify(Observations(LOCAL, [Probe(MAPPING_SOCKET, SERVER[0], 0, Binding(LOCAL),
                                                 SERVER[0])]))
    assert report.mapping == EI and report.notes[0].startswith("no NAT")


@pytest.mark.parametrize(("mapped", "mapping", "verdict"), [
    ([1, 1, 1], EI, "easy-peers-only"),  # plain servers: filtering unknown
    ([1, 2, 2], UNKNOWN, "relayed"),     # varies with the address only: AD or APD
    ([1, 1, 2], APD, "relayed"),         # one server, two ports: varies with the port
    ([1, 2, 1], AD, "relayed"),          # varies with the address, not the port
])
def test_plain_servers_compared(mapped, mapping, verdict):
    dests = {(1, 2, 2): [(A1, 3478), (A2, 3478), ("203.0.113.3", 3478)],
             (1, 1, 2): [(A1, 3478), (A2, 3478), (A2, 3479)]}.get(
                 tuple(mapped), [(A1, 3478), (A2, 3478), (A1, 3479)])
    obs = Observations(LOCAL, [Probe(MAPPING_SOCKET, d, 0, Binding((PUBLIC_IP, m)), d)
                               for d, m in zip(dests, mapped)], heard=True)
    report = classify(obs)
    assert (report.mapping, report.verdict) == (mapping, verdict)


def test_alternates():
    dest = (A1, 3478)
    assert alternates(dest, Binding(LOCAL)) == ()
    assert alternates(dest, Binding(LOCAL, ("10.0.0.5", 3478), ("10.0.0.5", 3479))) == (
        dest, (A1, 3479))  # behind a 1:1 NAT, one IP: reached where we reached it
    assert alternates(dest, Binding(LOCAL, dest, (A2, 3479))) == SERVER
    assert alternates(dest, Binding(LOCAL, dest, ("2001:db8::2", 3479))) == ()
    assert alternates(dest, Binding(LOCAL, dest, (A2, 3478))) == ()


PROBES = st.builds(
    Probe, st.sampled_from([MAPPING_SOCKET, FILTERING_SOCKET, "ipv6"]), st.sampled_from(SERVER),
    st.sampled_from([0, CHANGE_PORT, CHANGE_IP | CHANGE_PORT]),
    st.one_of(st.none(), st.integers(300, 699), st.builds(
        Binding, st.tuples(st.just(PUBLIC_IP), st.integers(1, 4)),
        st.one_of(st.none(), st.sampled_from(SERVER)),
        st.one_of(st.none(), st.sampled_from(SERVER)))),
    st.one_of(st.none(), st.sampled_from(SERVER)))


@given(probes=st.lists(PROBES, max_size=10), server=st.sampled_from([(), SERVER, SERVER[:2]]),
       hairpin=st.sampled_from([None, True, False]))
def test_any_observations_classify_into_the_documented_values(probes, server, hairpin):
    report = classify(Observations(LOCAL, probes, server, heard=bool(probes), hairpin=hairpin))
    assert report.mapping in KINDS + [UNKNOWN] and report.filtering in KINDS + [UNKNOWN]
    assert report.verdict in ("direct", "easy-peers-only", "relayed", "unknown")
    if report.verdict == "direct":  # needs proof of both halves
        assert report.mapping == EI and (report.filtering in (EI, AD) or any(
            "another port" in n for n in report.notes))
