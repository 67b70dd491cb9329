"""The relay core: sessions, the routing table, send queues, shared hub state."""
