"""TLS certificates: bundles and checks, SSL contexts, manual files, ACME, HTTP-01."""
