"""The temporary responder a host runs before install (server), who holds a port it could not
bind (holders, from /proc), and the witness that counts incoming probes per source (witness),
so a mesh can tell a one-way drop.

May import: core.
"""
