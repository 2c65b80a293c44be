"""Probes: one module per technique, each with the same small interface (see base.py)."""
