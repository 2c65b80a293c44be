"""The mesh: an agent on every host, every host probes every peer, both ends joined.

  agent.py        ``portmesh agent``: the NDJSON control protocol over stdin/stdout
  wire.py         what crosses the agent's channel: the site as JSON, field checks, the output
  probing.py      the agent's probe job: its slice of the plan, held/unsure port verdicts
  coordinator.py  ``portmesh mesh``: phases, forwarding, unreachable hosts, the summaries
  transport.py    exec templates (ssh, ip netns exec, ...) and the air-gapped wheel bundle
  pairs.py        the pair join (pure): per (req, a, b) verdicts, bounded by hosts^2

``from scanner.mesh import MeshConfig, run_mesh`` is the library entry point (``portmesh
demo`` uses it); the names load lazily so that the agent's responder child, which imports
``scanner.mesh.agent``, does not pay for the coordinator.

May import: core, catalog, plan, probes (settings only), engine, responder.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MeshConfig", "run_mesh"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        # lazy: the coordinator costs the agent's responder child ~57 ms (measured, median of
        # 10, after scanner.mesh.agent); see the docstring
        from scanner.mesh import coordinator

        return getattr(coordinator, name)
    raise AttributeError(f"module 'scanner.mesh' has no attribute {name!r}")
