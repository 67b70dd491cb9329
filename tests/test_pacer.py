"""Turns on the event loop for work that is not relaying (``admission.pacer``), on trio's mock
clock: nothing waits on a quiet relay; while relaying, steps beyond the share wait in line, one
per pass of the scheduler (never idling the loop), accepts wait behind every step, and closes
take turns with both."""

from __future__ import annotations

import trio
import trio.testing

from derper.admission.pacer import MAX_CHARGE, Pacer


def run(test) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


class Relaying:
    """A relayed-packet counter: busy while ``on``, each look at it sees a new packet."""

    def __init__(self, on: bool = True) -> None:
        self.on = on
        self.count = 0

    def __call__(self) -> int:
        if self.on:
            self.count += 1
        return self.count


def test_a_quiet_relay_never_waits():
    async def main():
        pacer = Pacer(Relaying(on=False), clock=trio.current_time)
        start = trio.current_time()
        for _ in range(1000):
            await pacer.turn()
            await pacer.admit()
            pacer.charge(0.01)
        assert trio.current_time() == start and pacer.waited == 0

    run(main)


def test_while_relaying_steps_beyond_the_share_go_one_per_pass_and_never_idle():
    async def main():
        pacer = Pacer(Relaying(), clock=trio.current_time, share=0.5, slice=0.004)
        passes = 0
        at_once = []

        async def count_passes():
            nonlocal passes
            while True:
                passes += 1
                await trio.lowlevel.checkpoint()

        async def worker():
            for _ in range(100):
                before = passes
                await pacer.turn()
                at_once.append(passes == before)
                pacer.charge(0.001)  # a step that took 1 ms of the loop

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pacer.run)
            nursery.start_soon(count_passes)
            start = trio.current_time()
            async with trio.open_nursery() as workers:
                for _ in range(10):
                    workers.start_soon(worker)
            assert trio.current_time() == start  # the clock never moved: nothing slept
            assert passes >= 1000 - sum(at_once)  # the rest went one per pass
            nursery.cancel_scope.cancel()
        assert 4 <= sum(at_once) <= 6  # what the slice held ran at once
        assert pacer.waited == 1000 - sum(at_once)

    run(main)


def test_steps_go_in_order_and_accepts_after_every_step():
    async def main():
        pacer = Pacer(Relaying(), clock=trio.current_time)
        order = []
        pacer.charge(MAX_CHARGE)  # the slice is spent: everyone waits in line

        async def step(name):
            await pacer.turn()
            order.append(name)

        async def accept(name):
            await pacer.admit()
            order.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept, "accept")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                nursery.start_soon(step, f"step {i}")
                await trio.testing.wait_all_tasks_blocked()
            assert order == []
            nursery.start_soon(pacer.run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert order == ["step 0", "step 1", "step 2", "accept"]

    run(main)


def test_closes_take_turns_with_steps_and_never_hold_up_a_newcomer():
    """Thousands of sessions closing at once must not keep a new client's handshake (or its
    accept) waiting behind all of them: the lines take turns."""
    async def main():
        pacer = Pacer(Relaying(), clock=trio.current_time)
        order = []
        pacer.charge(MAX_CHARGE)

        async def wait(kind, name):
            await {"close": pacer.close_turn, "step": pacer.turn, "accept": pacer.admit}[kind]()
            order.append(name)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(wait, "close", f"close {i}")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "accept", "accept")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(2):
                nursery.start_soon(wait, "step", f"step {i}")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(pacer.run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert order[:6] == ["step 0", "close 0", "step 1", "close 1", "accept", "close 2"]
        assert order[6:] == [f"close {i}" for i in range(3, 50)]

    run(main)


def test_a_cancelled_waiter_leaves_the_line():
    async def main():
        pacer = Pacer(Relaying(), clock=trio.current_time)
        pacer.charge(MAX_CHARGE)
        got = []
        first = trio.CancelScope()

        async def step(name, scope=None):
            with scope or trio.CancelScope():
                await pacer.turn()
                got.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, "cancelled", first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(step, "second")
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()  # its connection closed while it waited
            nursery.start_soon(pacer.run)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert got == ["second"]

    run(main)


def test_a_step_that_waited_for_its_peer_is_charged_at_most_max_charge():
    async def main():
        pacer = Pacer(Relaying(), clock=trio.current_time)
        with pacer.measured():
            await trio.sleep(5)  # a send the peer took its time to take
        assert pacer.charged == MAX_CHARGE

    run(main)
