"""Several worker processes on one host: the supervisor, each worker's part, and what they share."""
