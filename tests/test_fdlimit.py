"""Open files: the soft limit is raised to the hard one, and DERP connections are capped below
it, so a relay full of clients answers 503 instead of failing accepts in a loop."""

from __future__ import annotations

import trio

from derper import client as dc
from derper.cli.fdlimit import HEADROOM, connection_cap
from tests.process import derper, free_port
from tests.relay_helpers import assert_relays
from tests.system import require_binary


def test_connection_cap_leaves_room_for_both_half_open_pools_and_headroom():
    assert connection_cap(20_000, 1024) == 20_000 - 2048 - HEADROOM
    assert connection_cap(20_000, 0) == 20_000 - 2048 - HEADROOM  # no cap: assume the default
    assert connection_cap(300, 1024) == 64  # never nothing


async def test_soft_limit_raised_and_the_cap_answers_503_before_files_run_out(tmp_path):
    prlimit = require_binary("prlimit", "util-linux")
    port = free_port()
    # soft 100, hard 500: derper takes 500, and caps DERP at 500 - 2 x 32 - 256 = 180.
    args = ["-dev", "-a", f"127.0.0.1:{port}", "-stun=false", "-metrics-addr", "off",
            "-max-handshakes", "32"]
    cap = 500 - 2 * 32 - HEADROOM
    async with derper(args, tmp_path, wrapper=[prlimit, "--nofile=100:500"]) as proc:
        limits = open(f"/proc/{proc.proc.pid}/limits").read()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["500", "500"]
                   for line in limits.splitlines()), limits
        assert f"max_clients={cap}" in proc.log
        u = f"http://127.0.0.1:{port}/derp"
        clients, refused = [], 0
        async with trio.open_nursery() as nursery:
            async def hold(done: trio.Event) -> None:
                nonlocal refused
                try:
                    async with dc.connect(u, timeout=5) as c:
                        clients.append(c)
                        done.set()
                        await trio.sleep_forever()
                except dc.DerpClientError as e:
                    assert "503" in str(e), e
                    refused += 1
                    done.set()

            for _ in range(cap + 20):
                done = trio.Event()
                nursery.start_soon(hold, done)
                await done.wait()
            assert (len(clients), refused) == (cap, 20)
            await assert_relays(clients[0], clients[-1])  # still relaying at the cap
            assert proc.log.count("DERP connection cap reached") == 1  # once, not per client
            assert "accept failed" not in proc.log
            nursery.cancel_scope.cancel()
