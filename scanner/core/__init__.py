"""The shared vocabulary every stage speaks: hosts and sites (model), flows, port specs
(ports), the one result type and its encoder (results), verdicts, responder tags, and the one
place that answers "may we open raw sockets, how many descriptors" (privileges). Pure.

May import: scanner (the version, errors) only.
"""
