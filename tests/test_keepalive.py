"""The one keepalive timer: each session's KeepAlive every period (its own jitter), never early,
at most a tick late; a session removed is never told again."""

from __future__ import annotations

import trio

from derper.relay.keepalive import JITTER, Keepalives, KeepaliveSchedule


def run(schedule: KeepaliveSchedule, until: float, step: float) -> dict[str, list[float]]:
    """Tick every ``step`` seconds up to ``until``: when each item was handed out."""
    seen: dict[str, list[float]] = {}
    t = 0.0
    while t <= until:
        for item in schedule.due(t):
            seen.setdefault(item, []).append(round(t, 6))
        t += step
    return seen


def test_each_item_comes_due_every_period_of_its_own():
    s = KeepaliveSchedule(tick=1.0)
    s.add("a", 0.0, 60.0)
    s.add("b", 0.0, 64.5)
    seen = run(s, 200.0, 0.5)
    assert seen["a"] == [60.0, 120.0, 180.0]
    assert seen["b"] == [65.0, 129.0, 194.0]  # the first tick at or after 64.5, 129, 193.5
    assert len(s) == 2


def test_never_early_and_at_most_a_tick_late_when_the_timer_runs_late():
    s = KeepaliveSchedule(tick=1.0)
    s.add("a", 0.25, 10.0)
    assert s.due(9.0) == []
    assert s.due(13.7) == ["a"]  # the timer was late: due at 10.25, handed out at once
    assert s.due(20.0) == []  # next due a period after it was due: 20.25
    assert s.due(23.9) == ["a"]
    assert s.due(100.0) == ["a"]  # late by more than a period: once, not once per period
    assert s.due(109.0) == []
    assert s.due(110.0) == ["a"]


def test_removed_items_are_never_handed_out():
    s = KeepaliveSchedule(tick=1.0)
    for name in "abc":
        s.add(name, 0.0, 5.0)
    s.remove("b")
    s.remove("b")  # twice, or an item never added: nothing happens
    s.remove("zz")
    assert sorted(s.due(5.0)) == ["a", "c"]
    s.remove("a")
    assert s.due(10.0) == ["c"]
    assert len(s) == 1


def test_an_idle_gap_costs_nothing_and_adding_later_works():
    s = KeepaliveSchedule(tick=0.5)
    assert s.due(1e6) == []
    s.add("a", 1e6, 2.0)
    assert s.due(1e6 + 1.9) == []
    assert s.due(1e6 + 2.0) == ["a"]


def test_the_server_timer_jitters_each_session_within_go_s_range():
    async def main():
        timer = Keepalives(60.0)
        t0 = trio.current_time()
        for i in range(200):
            timer.add(i)
        schedule = timer.schedule
        assert schedule.due(t0 + 59.9) == []
        early = schedule.due(t0 + 62.5)
        late = schedule.due(t0 + 60 * (1 + JITTER) + schedule.tick)
        assert 0 < len(early) < 200 and sorted(early + late) == list(range(200))
        timer.remove(5)
        assert len(schedule) == 199

    trio.run(main)
