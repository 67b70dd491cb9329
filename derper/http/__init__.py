"""HTTP/1.1 on the main port and helper: the h11 front door, endpoints, upgrades."""
