"""The half-open pool (slowloris): per-source caps, and eviction that is fair by source."""

from __future__ import annotations

from derper.admission.limits import HandshakeSlots, source_key
from derper.metrics.counters import Stats


class Conn:
    """A connection task as the pool sees it: its evict callback records the eviction."""

    def __init__(self, slots: HandshakeSlots, source: str, capped: bool = True) -> None:
        self.evicted = False
        self.slot = slots.try_enter(source, self._evict, capped)

    def _evict(self) -> None:
        self.evicted = True


def pool(limit: int, per_source: int = 0) -> HandshakeSlots:
    return HandshakeSlots(limit, per_source, Stats())


def test_release_is_once_and_idempotent():
    slots = pool(2)
    a = Conn(slots, "192.0.2.1")
    a.slot.release()  # the session registered: no longer half-open
    a.slot.release()  # and the connection's own release at its end is a no-op
    assert slots.count == 0
    assert pool(0).try_enter("x", lambda: None) is not None  # 0 = no cap


def test_per_source_cap_refuses_at_once():
    slots = pool(100, per_source=3)
    held = [Conn(slots, "192.0.2.1") for _ in range(3)]
    assert Conn(slots, "192.0.2.1").slot is None
    assert Conn(slots, "198.51.100.1").slot is not None  # another address is unaffected
    held[0].slot.release()
    assert Conn(slots, "192.0.2.1").slot is not None
    assert slots.stats.rejected_half_open == 1


def test_full_pool_evicts_the_oldest_of_the_biggest_holder():
    slots = pool(4)
    attacker = [Conn(slots, "203.0.113.9") for _ in range(3)]
    other = Conn(slots, "198.51.100.1")
    newcomer = Conn(slots, "192.0.2.1")
    assert newcomer.slot is not None
    assert [c.evicted for c in attacker] == [True, False, False] and not other.evicted
    assert slots.count == 4 and slots.stats.evicted_half_open == 1


def test_a_source_at_its_share_is_refused_so_attackers_cannot_churn():
    slots = pool(4)
    attacker = [Conn(slots, "203.0.113.9") for _ in range(4)]
    assert Conn(slots, "203.0.113.9").slot is None  # the biggest holder cannot evict itself
    legit = Conn(slots, "192.0.2.1")
    assert legit.slot is not None and attacker[0].evicted
    # Now the attacker holds 3, the client 1: more attacker sockets are refused, and the
    # client's handshake is never pushed out by them.
    for _ in range(10):
        assert Conn(slots, "203.0.113.9").slot is None
    assert not legit.evicted
    assert slots.stats.rejected_half_open == 11


def test_fifty_attacking_addresses_cannot_keep_a_newcomer_out():
    """Ten times the cap from 50 addresses: the pool fills to fair shares, a newcomer still
    gets a place, and the attackers stop displacing each other."""
    slots = pool(100, per_source=64)
    attackers = [Conn(slots, f"203.0.113.{i % 50}") for i in range(1000)]
    assert slots.count == 100
    evicted_while_filling = slots.stats.evicted_half_open
    for j in range(5):
        assert Conn(slots, f"192.0.2.{j}").slot is not None
    assert slots.stats.evicted_half_open == evicted_while_filling + 5
    assert sum(a.slot is not None and not a.evicted for a in attackers) == 95


def test_pressure_from_half_full():
    slots = pool(4)
    Conn(slots, "a")
    assert not slots.under_pressure()
    Conn(slots, "b")
    assert slots.under_pressure()
    assert not pool(0).under_pressure()


def test_source_key_groups_ipv6_by_64():
    assert source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key(None) == ""


def test_behind_a_proxy_each_client_is_counted_under_its_own_address():
    """All connections arrive from the proxy; the PROXY header's address re-keys each one, so
    the per-source cap falls on the client, not on the proxy."""
    slots = pool(100, per_source=2)
    conns = [Conn(slots, "10.0.0.1", capped=False) for _ in range(5)]  # the proxy's address
    assert all(c.slot is not None for c in conns)  # 5 > 2: not capped as one source
    moved = [c.slot.rekey(addr) for c, addr in zip(conns, ["a", "b", "a", "a", "c"])]
    assert moved == [True, True, True, False, True]  # "a" is at its share at the fourth
    assert slots.count == 4 and slots.stats.rejected_half_open == 1
    assert conns[3].slot.release() is False  # already released by the refusal
