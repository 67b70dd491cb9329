"""Counters on the hot path and their expositions (/debug/varz, /metrics)."""
