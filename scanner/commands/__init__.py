"""Subcommands, one module each, loaded lazily by scanner.cli."""
