"""Probes: one module per technique (tcp connect, syn, udp, icmp, ipip), each with the same
small interface (base.py); payload templates (payloads), the shared raw ICMP receiver (rawrecv),
one classifier of ICMP errors and errnos (classify), and the deadline sweep (deadlines).

May import: core.
"""
