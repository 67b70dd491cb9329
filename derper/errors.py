"""derper's failures, split by who is at fault (as h11 splits Local/RemoteProtocolError).

- ``ProtocolError``: the peer broke the protocol (a bad frame, handshake, HTTP request or
  STUN message). That one connection is closed with a log line; nothing else is disturbed.
- ``ConfigError``: the configuration cannot work. The message says what to change; the
  server refuses to start (or, on reload, keeps what it had).
- ``IOFailure``: talking to something failed: a connect, TLS, a closed socket, a CA or an
  admission URL that does not answer.

Every message is safe to log and to show an operator.
"""

from __future__ import annotations


class DerperError(Exception):
    """Base of every error derper raises on purpose."""


class ProtocolError(DerperError, ValueError):
    """The peer sent something the protocol does not allow; its connection must close."""


class ConfigError(DerperError, ValueError):
    """The configuration (flags, environment, files on disk) cannot work."""


class IOFailure(DerperError):
    """Reaching or talking to another party failed."""
