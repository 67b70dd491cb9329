"""Sockets and byte streams: listeners, TLS, addresses, reading frames off a stream."""
