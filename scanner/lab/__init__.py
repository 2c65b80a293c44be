"""The lab: a cluster in network namespaces (netns; its names and subnets: addressing), the
`portmesh lab` commands with inventory and responders (lab), injected faults (faults: the
fault file; nft: its nftables rules; truth: the ground truth they imply), and `portmesh demo`.

May import: core, catalog, plan, probes, engine, responder, mesh, report.
"""
