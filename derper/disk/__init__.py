"""What the server keeps on disk: atomic writes, the key file, watching files change."""
