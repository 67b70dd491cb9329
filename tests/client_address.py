"""What address derper took a client to have: its session (PeerPresent, limits), its
connect log line and the ``Source`` the admission URL was sent. Shared by the proxy tests."""

from __future__ import annotations

import json

from derper.proto.keys import public_text
from derper.server import Server
from tests.admission_servers import FakeBackend, serve_tcp
from tests.relay_helpers import wait_until


async def allow_all_backend(nursery) -> FakeBackend:
    """A ``-verify-client-url`` controller admitting everyone, recording each ``Source``."""
    return await serve_tcp(FakeBackend(lambda seen: (200, b'{"Allow":true}')), nursery)


def sources(backend: FakeBackend) -> list[str]:
    return [json.loads(seen.body)["Source"] for seen in backend.requests]


def logged_remote(caplog, key_text: str) -> str:
    """The ``remote`` of the last "client connected" line for the node ``key_text``."""
    lines = [r for r in caplog.records if r.getMessage() == "client connected"
             and getattr(r, "fields", {}).get("key") == key_text]
    assert lines, "no connect line"
    return lines[-1].fields["remote"].rsplit(":", 1)[0].strip("[]")


async def addresses_seen(server: Server, backend: FakeBackend, caplog, key: bytes) -> set[str]:
    """Every address derper has for the connected node ``key``; a set of one when it agrees
    with itself. Set caplog to INFO for ``derper`` before the client connects."""
    await wait_until(lambda: key in server.relay.router.active)
    session = server.relay.router.active[key]
    return {session.remote_ip, logged_remote(caplog, public_text(key)), sources(backend)[-1]}
