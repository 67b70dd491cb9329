"""The DERP wire, pure: frames, handshake, meta certificate, key text. No I/O here."""
