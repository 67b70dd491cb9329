"""Who may connect and how fast: admission checks, limits, rate config, fair share."""
