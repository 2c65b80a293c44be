"""Ansible as the engine for big fleets: the playbook as package data, and Kubean's YAML.

  portmesh.yml  the playbook (``portmesh ansible playbook`` prints it): responders on every
                host, a barrier, ``check`` on every host at once, the NDJSON fetched to the
                control node and joined there by ``portmesh report --join`` into the pair
                records and one-way verdicts of ``portmesh mesh``
  kubean.py     ``portmesh ansible kubean``: a ConfigMap holding the playbook and a
                ClusterOperation whose preHook runs it before ``cluster.yml``

May import: scanner (the version, errors) only.
"""

from __future__ import annotations

from importlib import resources

PLAYBOOK = "portmesh.yml"


def playbook_text() -> str:
    """The packaged playbook, as text."""
    return resources.files("scanner.ansible").joinpath(PLAYBOOK).read_text("utf-8")
