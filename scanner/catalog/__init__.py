"""The port catalog: every row of the DCE 5.0 port document as data (``requirements.toml``).

``load_catalog(extra_files=())`` is the one loader: it reads the packaged file, then each
``--catalog FILE`` in order, and validates every entry. Errors name the file, the entry and the
field (``CatalogError``, exit 2 in the CLI).

File format (TOML; the packaged file and user files are the same)::

    [[requirement]]
    id = "calico.vxlan"            # stable id: [a-z0-9][a-z0-9._-]*
    section = "calico"             # the document section (optional, for tables and tests)
    component = "calico"
    proto = "udp"                  # tcp | udp | icmp | ipip (one entry per protocol)
    ports = "4789"                 # nmap syntax (22,80 / 30000-32767); absent for icmp/ipip
    description = "Calico CNI with VXLAN enabled"
    dst_role = "node"              # the role that opens the port (scanner/core/model.py ROLES)
    dst_fallback = "control_plane" # optional: used when dst_role selects nobody in the cluster
    src_roles = ["node"]           # the roles that connect to it
    src_scope = "cluster"          # cluster (default): sources from the same cluster;
                                   # site: sources from every cluster of the site
    condition = { cni = "calico", feature = "vxlan" }   # optional, see below
    sample = false                 # true: --nodeport-sample K applies to this entry
    reference = "https://..."      # where the requirement comes from
    note = "..."                   # optional remark (e.g. the 10257/10259 swap)

A user file may also hold ``[[requirement]] id = "metallb.metrics.udp" disabled = true`` to
drop an entry. An entry whose id already exists replaces it (in place); new ids are appended.

Ports that kubespray variables change are written as placeholders, resolved per cluster from
its ``ClusterConfig`` by the planner::

    ${nodeport_range}       "lo-hi" from kube_apiserver_node_port_range (default 30000-32767)
    ${apiserver_port}       kube_apiserver_port (default 6443)
    ${registry_port:443}    the port of registry_host; after the colon: the value when unset
    ${minio_port:9000}      the port of minio_address

A placeholder without a default whose value is unknown leaves the entry out of the plan, and
``plan --explain`` says so.

Conditions (all keys optional; a list means "any of" for cni and cluster, "all of" for
feature): ``cni`` the cluster's CNI (kube_network_plugin; calico is the default),
``feature`` feature words (vxlan, ipip, bgp, typha, wireguard, wireguard6, metallb, kube-vip,
istio, insight, deploy, or any word a user file introduces), ``cluster`` the cluster kind
(global, worker, standalone). Which features are on by default is the planner's business
(scanner/plan/planner.py, ``default_features``).

May import: core.
"""

from __future__ import annotations

from scanner.catalog.loader import (
    FEATURES,
    KNOWN_CNIS,
    PORT_VARS,
    Catalog,
    Condition,
    Requirement,
    expand_ports,
    load_catalog,
)

__all__ = [
    "FEATURES",
    "KNOWN_CNIS",
    "PORT_VARS",
    "Catalog",
    "Condition",
    "Requirement",
    "expand_ports",
    "load_catalog",
]
