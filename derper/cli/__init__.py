"""The derper command: flags, subcommands, service integration."""
