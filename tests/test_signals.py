"""A storm of signals coalesces: the server survives it, keeps relaying, and still shuts down."""

from __future__ import annotations

import os
import signal
import threading

import trio

from derper import client as dc
from tests.process import derper, free_port
from tests.relay_helpers import assert_relays

STORM = 2000  # per sender; the attack run used 2 x 2,000 kill -HUP


async def test_sighup_storm_under_load_neither_kills_nor_stalls_the_server(tmp_path):
    port = free_port()
    args = ["-dev", "-a", f"127.0.0.1:{port}", "-stun=false", "-metrics-addr", "off"]
    async with derper(args, tmp_path) as proc:
        pid = proc.proc.pid
        u = f"http://127.0.0.1:{port}/derp"
        async with dc.connect(u) as a, dc.connect(u) as b:
            def storm() -> None:
                for _ in range(STORM):
                    os.kill(pid, signal.SIGHUP)

            senders = [threading.Thread(target=storm) for _ in range(2)]
            for t in senders:
                t.start()
            while any(t.is_alive() for t in senders):  # relaying throughout the storm
                await assert_relays(a, b)
                await trio.sleep(0)
            for t in senders:
                t.join()
            await assert_relays(a, b)
            await assert_relays(b, a)
        reloads = proc.log.count("SIGHUP: reloading")
        assert 1 <= reloads < 2 * STORM  # coalesced by the kernel, not one reload each
        assert "Traceback" not in proc.log and "level=error" not in proc.log
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=10) == 0
