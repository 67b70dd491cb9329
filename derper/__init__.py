"""derper: a self-hosted Tailscale DERP relay and STUN server, wire-compatible with cmd/derper."""

__version__ = "0.1.0"
