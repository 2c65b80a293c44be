"""Subcommands, one module each, loaded lazily by scanner.cli: each parses and validates its
options into a config object and calls one library function. No scanning logic here.

May import: every package below it (core, catalog, plan, probes, engine, responder, mesh,
report, lab).
"""
