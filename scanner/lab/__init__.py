"""The lab: a cluster in network namespaces (netns), the `portmesh lab` commands with
inventory, responders and ground truth (lab), nftables faults (faults), and `portmesh demo`.

May import: core, catalog, plan, probes, engine, responder, mesh, report.
"""
