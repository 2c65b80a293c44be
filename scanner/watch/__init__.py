"""After install: ``portmesh watch``, the continuous port mesh. A pure schedule that covers every
ordered pair x every required port in a bounded sweep at a bounded probe rate (schedule), the
Prometheus text exposition with series O(requirements) (metrics), the agent loop that probes,
counts incoming probes per source and serves /metrics (agent), and the shipped alert rules and
Kubernetes manifests (rules.yml, manifests).

May import: core, catalog, plan, probes, engine, responder.
"""
