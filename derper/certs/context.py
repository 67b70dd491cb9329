"""The server's TLS configuration: an SSLContext per certificate, swapped whole on reload.

Every new connection takes ``ServerTLS.context`` at accept time, so a new certificate never
touches a live connection and a broken one simply never replaces the working one.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from .bundle import CertBundle, CertError


def make_context(bundle: CertBundle, meta_pem: bytes, required_sni: str | None) -> ssl.SSLContext:
    """TLS ≥ 1.2, ALPN ``http/1.1`` only (``/derp`` needs the raw HTTP/1.1 stream), the meta
    certificate last in the chain, and, for a DNS hostname, SNI that must name it (as Go does)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    # No session tickets: DERP clients (Tailscale's included) keep no TLS session cache, so a
    # ticket is never used; TLS 1.3 would make one per connection and send it in its own write.
    ctx.num_tickets = 0
    # Follow the client's cipher order, as Go's server does: Tailscale clients on AES hardware
    # ask for AES-128-GCM, cheaper per relayed byte than the AES-256 that OpenSSL puts first.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    # load_cert_chain only reads files: hand it a private temporary one.
    fd, path = tempfile.mkstemp(prefix="derper-chain-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bundle.chain_pem.rstrip(b"\n") + b"\n" + meta_pem + bundle.key_pem)
        ctx.load_cert_chain(path)
    except ssl.SSLError as e:
        raise CertError(f"OpenSSL refused the certificate: {e.reason or e}") from e
    finally:
        os.unlink(path)
    if required_sni:
        wanted = required_sni.lower().rstrip(".")

        def check_sni(_obj, server_name, _ctx):
            if server_name is None or server_name.lower().rstrip(".") != wanted:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        ctx.sni_callback = check_sni
    return ctx


class ServerTLS:
    """The context new connections take; ``None`` until a first certificate is installed (a
    Let's Encrypt certificate may still be on its way)."""

    def __init__(self, meta_pem: bytes, required_sni: str | None) -> None:
        self._meta_pem = meta_pem
        self._required_sni = required_sni
        self.bundle: CertBundle | None = None
        self.context: ssl.SSLContext | None = None

    def install(self, bundle: CertBundle) -> None:
        """Serve ``bundle`` to every new connection; raises CertError if OpenSSL refuses it."""
        context = make_context(bundle, self._meta_pem, self._required_sni)
        self.bundle, self.context = bundle, context
