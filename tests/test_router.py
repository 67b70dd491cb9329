"""Key → connection routing (spec §4.3 duplicates, §4.7 PeerGone bookkeeping, §4.8 watchers)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from derper.metrics.counters import Stats
from derper.proto.wire import PeerGoneReason
from derper.relay.router import Presence, Router

_conn_ids = itertools.count(1)


@dataclass(eq=False)  # identity semantics, like real sessions (they live in sets)
class FakePeer:
    key: bytes
    conn_id: int = field(default_factory=lambda: next(_conn_ids))
    dup: bool = False
    remote_ip: str | None = "192.0.2.1"
    remote_port: int = 41641
    present_flags: int = 1
    rx_bytes: int = 0
    sibling: bool = False
    calls: list = field(default_factory=list)

    def deliver(self, frame, disco):
        self.calls.append(("deliver", bytes(frame), disco))

    def send_peer_gone(self, key, reason):
        self.calls.append(("peer_gone", key, reason))

    def send_peer_present(self, peer):
        self.calls.append(("present", peer.key, getattr(peer, "conn_id", None)))

    def notify_presence_gone(self, key):
        self.calls.append(("presence_gone", key))

    def close_by_peer_request(self):
        self.calls.append(("close",))


def key(n: int) -> bytes:
    return n.to_bytes(2, "big") * 16


A, B, C, R, S = (key(i) for i in range(1, 6))
GONE = PeerGoneReason.DISCONNECTED


@pytest.fixture
def router() -> Router:
    return Router(Stats())


def connect(router: Router, k: bytes) -> FakePeer:
    peer = FakePeer(k)
    router.register(peer)
    return peer


def dup_state(router: Router) -> tuple[int, int, int]:
    return router.dup_keys, router.dup_conns, router.stats.total_dup_client_conns


def peer_gones(peer: FakePeer) -> list:
    return [c for c in peer.calls if c[0] == "peer_gone"]


# ---- membership and duplicates ----------------------------------------------------------------

def test_single_connection(router):
    a = connect(router, A)
    assert router.active == {A: a} and router.conns == {A: [a]}
    assert a.dup is False
    assert (router.current_connections, router.clients_local) == (1, 1)
    router.unregister(a)
    assert router.active == {} and router.conns == {}
    assert (router.current_connections, router.clients_local) == (0, 0)
    assert router._last_activity == {}


def test_duplicates_newest_is_active_and_counters(router):
    a1 = connect(router, A)
    a2 = connect(router, A)
    assert router.active[A] is a2 and (a1.dup, a2.dup) == (True, True)
    assert dup_state(router) == (1, 2, 1)
    a3 = connect(router, A)
    assert router.active[A] is a3 and a3.dup is True
    assert dup_state(router) == (1, 3, 2)
    connect(router, B)
    assert dup_state(router) == (1, 3, 2)
    b2 = connect(router, B)
    assert dup_state(router) == (2, 5, 3)
    assert (router.current_connections, router.clients_local) == (5, 2)
    router.unregister(b2)
    assert dup_state(router) == (1, 3, 3)


def test_note_activity_switches_active(router):
    a1, a2 = connect(router, A), connect(router, A)
    router.note_activity(a1)
    assert router.active[A] is a1
    router.note_activity(a2)
    assert router.active[A] is a2


def test_pair_back_to_single(router):
    a1, a2 = connect(router, A), connect(router, A)
    router.unregister(a2)
    assert router.active[A] is a1 and a1.dup is False
    assert router.conns[A] == [a1]
    assert dup_state(router) == (0, 0, 1)
    router.unregister(a1)
    assert dup_state(router) == (0, 0, 1) and router.conns == {}


@pytest.mark.parametrize("activity, removed, expected_active", [
    ([], 2, 1),  # the active (newest) leaves: the next newest registrant takes over
    ([0], 0, 2),  # a1 became active by writing; after it leaves, a3 (newest) is most recent
    ([1, 0], 0, 1),  # a2 wrote after a3 registered: a2 is the most recent writer
    ([2, 1], 1, 2),
    ([0], 2, 0),  # a non-active member leaves: active unchanged
])
def test_removal_picks_most_recent_activity(router, activity, removed, expected_active):
    conns = [connect(router, A) for _ in range(3)]
    for i in activity:
        router.note_activity(conns[i])
    router.unregister(conns[removed])
    assert router.active[A] is conns[expected_active]
    assert dup_state(router) == (1, 2, 2)
    assert all(c.dup for c in router.conns[A])


def test_unregister_unknown_or_twice_is_noop(router):
    a = connect(router, A)
    stranger = FakePeer(A)
    router.unregister(stranger)
    router.unregister(FakePeer(B))
    assert router.active == {A: a} and dup_state(router) == (0, 0, 0)
    router.unregister(a)
    router.unregister(a)
    assert router.conns == {} and dup_state(router) == (0, 0, 0)


def test_close_key(router):
    a1, a2, b = connect(router, A), connect(router, A), connect(router, B)
    assert router.close_key(A) == 2
    assert a1.calls == [("close",)] and a2.calls == [("close",)] and b.calls == []
    assert router.close_key(C) == 0


# ---- PeerGone(Disconnected) bookkeeping -------------------------------------------------------

def test_peer_gone_to_receivers_only(router):
    s, r, bystander = connect(router, S), connect(router, R), connect(router, B)
    router.note_sent(S, r)
    router.unregister(s)
    assert peer_gones(r) == [("peer_gone", S, GONE)]
    assert peer_gones(bystander) == []


def test_peer_gone_only_when_last_connection_leaves(router):
    s1, s2, r = connect(router, S), connect(router, S), connect(router, R)
    router.note_sent(S, r)
    router.unregister(s2)
    assert peer_gones(r) == []
    router.unregister(s1)
    assert peer_gones(r) == [("peer_gone", S, GONE)]


def test_peer_gone_goes_to_the_conn_that_heard(router):
    s, r1, r2 = connect(router, S), connect(router, R), connect(router, R)
    router.note_sent(S, r1)
    router.unregister(s)
    assert (peer_gones(r1), peer_gones(r2)) == ([("peer_gone", S, GONE)], [])


@pytest.mark.parametrize("overlap", [True, False], ids=["reconnect-before-close",
                                                        "reconnect-after-close"])
def test_no_peer_gone_to_reconnected_receiver(router, overlap):
    s, r_old = connect(router, S), connect(router, R)
    router.note_sent(S, r_old)
    if overlap:
        r_new = connect(router, R)
        router.unregister(r_old)
    else:
        router.unregister(r_old)
        r_new = connect(router, R)
    router.unregister(s)
    assert peer_gones(r_new) == [] and peer_gones(r_old) == []


def test_one_peer_gone_per_departed_sender(router):
    s1, s2, r = connect(router, A), connect(router, B), connect(router, R)
    for _ in range(3):
        router.note_sent(A, r)
        router.note_sent(B, r)
    router.unregister(s1)
    router.unregister(s2)
    assert peer_gones(r) == [("peer_gone", A, GONE), ("peer_gone", B, GONE)]


def table_entries(router: Router) -> tuple[int, int]:
    return (sum(len(v) for v in router._receivers_of.values()),
            sum(len(v) for v in router._senders_to.values()))


def test_bookkeeping_does_not_grow_over_cycles(router):
    receiver, sender = connect(router, R), connect(router, S)
    for i in range(500):
        s = connect(router, key(1000 + i))  # short-lived sender to a long-lived receiver
        router.note_sent(s.key, receiver)
        router.unregister(s)
        r = connect(router, key(5000 + i))  # long-lived sender to a short-lived receiver
        router.note_sent(S, r)
        router.unregister(r)
    assert table_entries(router) == (0, 0)
    assert set(router._receivers_of) <= {S} and router._senders_to == {}
    assert peer_gones(receiver) == [("peer_gone", key(1000 + i), GONE) for i in range(500)]
    router.unregister(sender)
    router.unregister(receiver)
    assert router._receivers_of == {} and router._senders_to == {}
    assert router._last_activity == {} and router.conns == {} and router.active == {}


def test_bookkeeping_for_forwarded_sources_is_freed(router):
    r = connect(router, R)
    for i in range(1000):
        router.note_sent(key(1000 + i), r)  # a mesh peer forwarded a packet from a remote key
    router.unregister(r)
    assert router._receivers_of == {} and router._senders_to == {}


# ---- mesh watchers --------------------------------------------------------------------------

def test_watcher_gets_existing_and_new_registrations(router):
    a, b1 = connect(router, A), connect(router, B)
    b2 = connect(router, B)
    w = connect(router, C)
    router.add_watcher(w)
    assert sorted(w.calls) == sorted([("present", A, a.conn_id), ("present", B, b2.conn_id),
                                      ("present", C, w.conn_id)])  # active conns only
    w.calls.clear()
    r1 = connect(router, R)
    r2 = connect(router, R)  # every registration is announced, duplicates too
    assert w.calls == [("present", R, r1.conn_id), ("present", R, r2.conn_id)]
    w.calls.clear()
    router.unregister(r2)  # a duplicate set shrinking is not a departure
    router.unregister(b1)
    assert w.calls == []
    router.unregister(r1)
    router.unregister(a)
    assert w.calls == [("presence_gone", R), ("presence_gone", A)]


def test_unregistered_watcher_is_forgotten(router):
    w = connect(router, C)
    router.add_watcher(w)
    router.unregister(w)
    assert router.watchers == set()
    w.calls.clear()
    connect(router, A)
    assert w.calls == []


# ---- mesh forwarders (Go's rules, spec §4.8) ----------------------------------------------------

class FakeLink:
    """A mesh link as the router sees it: a Peer, never a local client."""

    def __init__(self, name: str, sibling: bool = False) -> None:
        self.key = name.encode().ljust(32, b"\0")
        self.sibling = sibling


def forwarder_counters(router: Router) -> tuple[int, int, int]:
    return (router.multiforwarder_created, router.multiforwarder_deleted,
            router.forwarder_delete_other)


def test_a_local_connection_always_wins(router):
    link = FakeLink("b")
    router.add_forwarder(A, link)
    assert router.active.get(A) is None and router.forwarder(A) is link
    a = connect(router, A)
    assert router.active[A] is a  # the reader looks here first; the forwarder waits
    router.unregister(a)
    assert router.forwarder(A) is link  # the key is still in the region: no PeerGone
    assert (router.clients_local, router.clients_remote) == (0, 1)


def test_first_claimant_stays_preferred_and_oldest_remaining_takes_over(router):
    l1, l2, l3 = FakeLink("1"), FakeLink("2"), FakeLink("3")
    for link in (l1, l2, l3, l2):  # a repeated claim changes nothing
        router.add_forwarder(A, link)
    assert router.forwarder(A) is l1 and forwarder_counters(router) == (1, 0, 0)
    router.remove_forwarder(A, l2)
    assert router.forwarder(A) is l1
    router.remove_forwarder(A, l1)
    assert router.forwarder(A) is l3 and forwarder_counters(router) == (1, 1, 0)
    router.remove_forwarder(A, l1)  # not registered (any more)
    router.remove_forwarder(B, l1)
    assert forwarder_counters(router) == (1, 1, 2)
    router.remove_forwarder(A, l3)
    assert router.forwarder(A) is None and router.forwarders == {}


def test_peer_gone_when_the_key_leaves_the_whole_region(router):
    r, link = connect(router, R), FakeLink("b")
    router.add_forwarder(S, link)
    router.note_sent(S, r)  # r received a packet forwarded in from S
    s = connect(router, S)  # S also connects here, then leaves: the forwarder still has it
    router.unregister(s)
    assert peer_gones(r) == []
    router.remove_forwarder(S, link)
    assert peer_gones(r) == [("peer_gone", S, GONE)]


def test_forwarder_removal_with_a_local_connection_sends_no_peer_gone(router):
    r, s, link = connect(router, R), connect(router, S), FakeLink("b")
    router.note_sent(S, r)
    router.add_forwarder(S, link)
    router.remove_forwarder(S, link)
    assert peer_gones(r) == [] and router.active[S] is s
    router.unregister(s)
    assert peer_gones(r) == [("peer_gone", S, GONE)]


def test_watchers_hear_of_local_keys_only(router):
    w, link = connect(router, C), FakeLink("b")
    router.add_watcher(w)
    w.calls.clear()
    router.add_forwarder(A, link)  # never re-announced: one hop at most
    router.remove_forwarder(A, link)
    assert w.calls == []


# ---- sibling workers (-workers): the host is one node to the region ----------------------------

def presence(k: bytes) -> Presence:
    return Presence(k, "192.0.2.9", 41641, 1)


def watcher(router: Router, k: bytes, sibling: bool = False) -> FakePeer:
    w = FakePeer(k, sibling=sibling)
    router.register(w)
    router.add_watcher(w)
    w.calls.clear()
    return w


def presents(w: FakePeer) -> list:
    return [c[:2] for c in w.calls if c[0] in ("present", "presence_gone")]


def test_region_watchers_hear_of_sibling_keys_and_siblings_do_not(router):
    region, sib_w = watcher(router, R), watcher(router, S, sibling=True)
    region.calls.clear()
    sib = FakeLink("w1", sibling=True)
    router.add_forwarder(A, sib, presence(A))
    assert presents(region) == [("present", A)] and presents(sib_w) == []
    late = FakePeer(C)
    router.register(late)
    router.add_watcher(late)  # a node that starts watching later hears of A too
    assert ("present", A) in presents(late)
    assert router.clients_remote == 0  # the sibling's key is this host's, not another node's
    router.remove_forwarder(A, sib)
    assert presents(region)[-1] == ("presence_gone", A)
    assert [c for c in presents(sib_w) if c[1] == A] == []  # siblings hear of local keys only


def test_a_local_departure_is_not_gone_for_the_region_while_a_sibling_has_the_key(router):
    region, sib_w = watcher(router, R), watcher(router, S, sibling=True)
    a = connect(router, A)
    router.add_forwarder(A, FakeLink("w1", sibling=True), presence(A))
    region.calls.clear()
    sib_w.calls.clear()
    router.unregister(a)
    assert presents(region) == []  # still reachable through this host
    assert presents(sib_w) == [("presence_gone", A)]  # the sibling's copy is the host's now


def test_duplicates_across_workers_last_writer_wins(router):
    sib_w = watcher(router, S, sibling=True)
    sib = FakeLink("w1", sibling=True)
    a = connect(router, A)
    assert router.active[A] is a and not a.dup
    router.add_forwarder(A, sib, presence(A))  # the sibling's connection of A is newer
    assert router.active.get(A) is None and router.forwarder(A) is sib and a.dup
    assert router.local(A) is a  # a packet the sibling forwards here still reaches a
    sib_w.calls.clear()
    router.note_activity(a)  # a writes: it is the newest again, and the siblings hear so
    assert router.active[A] is a and presents(sib_w) == [("present", A)]
    sib_w.calls.clear()
    router.note_activity(a)  # only a change is announced
    assert presents(sib_w) == []
    router.add_forwarder(A, sib, presence(A))
    router.remove_forwarder(A, sib)  # the sibling's connection left: ours takes over
    assert router.active[A] is a and not a.dup


def test_a_sibling_forwarder_is_where_a_packet_from_the_region_may_go_next(router):
    region_link, sib = FakeLink("r"), FakeLink("w1", sibling=True)
    router.add_forwarder(A, region_link)
    assert router.sibling_forwarder(A) is None  # never from one node on to another
    router.add_forwarder(A, sib, presence(A))
    assert router.sibling_forwarder(A) is sib and router.forwarder(A) is region_link
