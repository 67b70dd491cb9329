"""The regional mesh: links to the other relays of a region (spec §4.8)."""
