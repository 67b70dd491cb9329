"""STUN server run beside the DERP relay: a sans-IO Binding codec and a trio UDP responder.

Tailscale clients get exactly the Go derper's answers; generic RFC 5389/8489 and RFC 3489 clients
get correct answers too (the Go derper ignores them) unless strict mode is asked for.
"""
