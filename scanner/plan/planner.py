"""The plan: catalog x site x selection -> flows, lazily (pure: no I/O).

Every requirement is evaluated once per cluster K of the site ("a leg"):

- the condition is checked against K's effective configuration: K's ClusterConfig (kubespray
  variables, the site file) over ``default_features`` below, under the flags of the Selection
  (``--cni``, ``--with``, ``--without`` win, with the source "flag --cni" etc.);
- the destinations are K's hosts with ``dst_role`` (``node`` means every Kubernetes node:
  hosts with the node, control_plane or worker role), or ``dst_fallback`` when the role selects
  nobody (etcd -> control plane; a worker's kube_api VIP -> its control plane); ``vip:X`` is
  K's VIP X, else the site's VIP X; ``bootstrap`` is the site's bootstrap node;
- the sources are K's hosts with one of ``src_roles`` (``src_scope = "site"``: every cluster's
  hosts); ``global`` is every node of the global service cluster; ``scanner`` is the host
  running the check (src=None, src_host="scanner", unless the Selection names it);
- ports come from the entry, placeholders resolved from K's ClusterConfig.

This gives the document's directions: control-plane ports from every node of the same cluster;
every-node and CNI ports between all nodes of a cluster (both directions); bootstrap and
registry ports from every node of every cluster; Insight VIP from every node of every cluster;
a worker cluster's 22 and API port from every node of the global cluster; the Istio gateway
VIP from the scanner. No flow goes from a host to itself (same name or same address).

Defaults (``default_features``), when neither the variables, the site file nor a flag say:
kubespray's own defaults (roles/kubespray-defaults and network_plugin/calico in kubespray
2.2x, which Kubean ships): kube_network_plugin calico, calico_network_backend vxlan (so no BGP,
no TCP 179), calico_vxlan_mode Always (UDP 4789), calico_ipip_mode Never (no IP-in-IP);
typha, WireGuard, MetalLB and kube-vip off. Older kubespray (before 2.20) defaulted to bird +
IP-in-IP: such clusters say so in their vars (``calico_ipip_mode: Always``), or use
``--with ipip,bgp --without vxlan``. A global service cluster has istio and insight on; a
worker cluster has deploy on (its flows still need the VIPs / the global cluster to exist).
Every other feature is off.

Order: requirement by requirement, cluster by cluster, and inside a leg port-major, then
source, then destination: consecutive flows go to different destinations where possible.

NodePort sampling (``Selection.nodeport_sample = K``, entries with ``sample = true``): the K
ports spread evenly over the range plus both ends, the same for every pair (deterministic);
``plan_meta`` says which mode was used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from scanner.catalog import Catalog, Requirement, expand_ports
from scanner.core.flows import Flow
from scanner.core.model import Cluster, ClusterConfig, Host, Setting, Site
from scanner.core.ports import parse_ports
from scanner.plan.endpoints import is_endpoint_var
from scanner.plan.kubean import redact
from scanner.plan.selection import Selection

NODE_ROLES = frozenset({"node", "control_plane", "worker"})

# kubespray's defaults for the features its variables control (see the module docstring).
_KUBESPRAY_DEFAULTS: dict[str, Setting] = {
    "bgp": Setting(False, "default: kubespray calico_network_backend vxlan"),
    "vxlan": Setting(True, "default: kubespray calico_vxlan_mode Always"),
    "ipip": Setting(False, "default: kubespray calico_ipip_mode Never"),
    "typha": Setting(False, "default: kubespray typha_enabled false"),
    "wireguard": Setting(False, "default: kubespray calico_wireguard_enabled false"),
    "wireguard6": Setting(False, "default: kubespray calico_wireguard_enabled false"),
    "metallb": Setting(False, "default: kubespray metallb_enabled false"),
    "kube-vip": Setting(False, "default: kubespray kube_vip_enabled false"),
}
_KIND_DEFAULTS: dict[str, dict[str, Setting]] = {
    "global": {
        "istio": Setting(True, "default: global service cluster"),
        "insight": Setting(True, "default: global service cluster"),
    },
    "worker": {"deploy": Setting(True, "default: worker cluster")},
}
# placeholder -> the kubespray variable behind it (for --explain)
_PLACEHOLDER_VARS = {
    "nodeport_range": "kube_apiserver_node_port_range",
    "apiserver_port": "kube_apiserver_port",
    "registry_port": "registry_host",
    "minio_port": "minio_address",
}

End = tuple[str, "str | None"]  # (name, address); address None: the scanner, not yet known


def default_features(kind: str) -> dict[str, Setting]:
    """The features of a cluster of this kind when nothing else says (see the docstring)."""
    return {**_KUBESPRAY_DEFAULTS, **_KIND_DEFAULTS.get(kind, {})}


@dataclass(frozen=True)
class Effective:
    """A cluster's configuration after defaults, variables and flags."""

    cni: Setting
    features: dict[str, Setting]
    config: ClusterConfig

    def feature(self, name: str) -> Setting:
        return self.features.get(name) or Setting(False, "default: off")

    def port_values(self) -> dict[str, str | None]:
        c = self.config
        rng = c.nodeport_range.value
        nodeport = f"{rng[0]}-{rng[1]}" if isinstance(rng, (tuple, list)) else str(rng)
        return {
            "nodeport_range": nodeport,
            "apiserver_port": str(c.apiserver_port.value),
            "registry_port": _port_of(c.registry),
            "minio_port": _port_of(c.minio),
        }

    def port_setting(self, name: str) -> Setting | None:
        c = self.config
        return {
            "nodeport_range": c.nodeport_range,
            "apiserver_port": c.apiserver_port,
            "registry_port": c.registry,
            "minio_port": c.minio,
        }.get(name)


def _port_of(s: Setting | None) -> str | None:
    if s is None:
        return None
    v = s.value
    if isinstance(v, (tuple, list)) and len(v) >= 2 and v[1] is not None:
        return str(v[1])
    return None


def effective(cluster: Cluster, selection: Selection) -> Effective:
    cfg = cluster.config
    features = {**default_features(cluster.kind), **cfg.features}
    for f in selection.with_features:
        features[f] = Setting(True, "flag --with")
    for f in selection.without_features:
        features[f] = Setting(False, "flag --without")
    cni = Setting(selection.cni, "flag --cni") if selection.cni else cfg.cni
    return Effective(cni, features, cfg)


def sample_ports(ports: list[int], k: int) -> list[int]:
    """K ports spread evenly over ``ports`` plus both ends (all of them when that is not fewer)."""
    n = len(ports)
    if k + 2 >= n:
        return list(ports)
    # step (n-1)/(k+1) > 1 here, so the rounded indices are distinct
    idx = {0, n - 1} | {round(i * (n - 1) / (k + 1)) for i in range(1, k + 1)}
    return [ports[i] for i in sorted(idx)]


@dataclass(frozen=True)
class Leg:
    """One requirement in one cluster: who talks to whom on which ports, and why."""

    req: Requirement
    cluster: Cluster
    applies: bool
    why: str
    srcs: tuple[End, ...] = ()
    dsts: tuple[End, ...] = ()
    ports: tuple[int | None, ...] = ()
    af: str = "ipv4"  # the address family of every flow of this leg

    def count(self) -> int:
        if not (self.srcs and self.dsts and self.ports):
            return 0
        return _pairs(self.srcs, self.dsts) * len(self.ports)

    def flows(self) -> Iterator[Flow]:
        proto, rid = self.req.proto, self.req.id
        dsts = self.dsts
        for port in self.ports:
            for sname, saddr in self.srcs:
                for dname, daddr in dsts:
                    if dname == sname or daddr == saddr:
                        continue
                    yield Flow(daddr, port, proto, dname, saddr, sname, rid)  # type: ignore[arg-type]


def _pairs(srcs: tuple[End, ...], dsts: tuple[End, ...]) -> int:
    """Source x destination pairs minus self pairs (same name or same address), arithmetically."""
    by_name = Counter(n for n, _ in dsts)
    by_addr = Counter(a for _, a in dsts)
    by_both = Counter(dsts)
    selfs = 0
    for s in srcs:
        name, addr = s
        selfs += by_name[name] + (by_addr[addr] if addr is not None else 0)
        if addr is not None:
            selfs -= by_both[s]
    return len(srcs) * len(dsts) - selfs


def legs(catalog: Catalog, site: Site, selection: Selection) -> Iterator[Leg]:
    """Every (requirement, cluster, address family), applying or not, in plan order."""
    effs = {c.name: effective(c, selection) for c in site.clusters}
    views: dict[str, tuple[Site, dict[str, Cluster], tuple[str, ...]]] = {}
    all_ipv4 = _all_ipv4(site)
    boot_ports: dict[str, set[int | None]] = {c.name: set() for c in site.clusters}
    for req in catalog:
        for cluster in site.clusters:
            eff = effs[cluster.name]
            for af, af_why, checked in leg_families(req, eff):
                if not checked:
                    yield Leg(req, cluster, False, af_why, af=af)
                    continue
                if af == "ipv4" and all_ipv4:
                    leg = _leg(req, cluster, eff, site, selection)
                    if eff.config.families.value != ("ipv4",):
                        # a dual-stack cluster: say why this one stays on IPv4
                        leg = replace(leg, why=f"{leg.why}; {af_why}")
                    leg = replace(leg, af=af)
                else:
                    if af not in views:
                        views[af] = family_view(site, af)
                    view, clusters, missing = views[af]
                    leg = _leg(req, clusters[cluster.name], eff, view, selection)
                    why = f"{leg.why}; {af_why}"
                    gone = [n for n in missing if n in {h.name for h in cluster.hosts}]
                    if gone and leg.applies:
                        why += f"; not checked over {_AF_NAME[af]}: no {_AF_NAME[af]} address for "
                        why += ", ".join(gone) + (" (set ip6 / access_ip6)" if af == "ipv6" else "")
                    leg = replace(leg, cluster=cluster, why=why, af=af)
                if leg.applies and req.dst_role == "bootstrap":
                    boot_ports[cluster.name].update(leg.ports)
                yield leg
    for cluster in site.clusters:
        yield from _endpoint_legs(cluster, site, selection, boot_ports[cluster.name])


_AF_NAME = {"ipv4": "IPv4", "ipv6": "IPv6"}


def leg_families(req: Requirement, eff: Effective) -> list[tuple[str, str, bool]]:
    """[(family, why, checked)]: the address families a requirement is checked over in a
    cluster (``checked`` False: a family the requirement would use but the cluster's settings
    leave out, with why; planned as a leg that does not apply, so explain says it).

    WireGuard for IPv6 (calico.wireguard6, UDP 51821) goes over IPv6 only. Calico's IPv4
    WireGuard (calico.wireguard, UDP 51820) and IP-in-IP carry IPv4 over an IPv4 underlay:
    IPv4 only, not checked in an IPv6-only cluster. Calico VXLAN goes over IPv4 when the
    cluster has IPv4 (calico_vxlan_mode, the IPv4 pool's) and over IPv6 when
    calico_vxlan_mode_ipv6 (the IPv6 pool's) is on. Everything else (the API server, kubelet,
    etcd, ...) over the cluster's main family, which is IPv4 unless the cluster is IPv6 only
    (kubespray binds them to main_ip).
    """
    fams = eff.config.families
    main = fams.value[0] if fams.value else "ipv4"
    feats = req.condition.features
    main_why = f"over {_AF_NAME[main]}: the cluster's main family [{fams.source}]"
    if "wireguard6" in feats:
        return [
            ("ipv6", "over IPv6: WireGuard for IPv6 [calico_wireguard_enabled, dual stack]", True)
        ]
    if req.proto == "ipip" or ("wireguard" in feats and req.condition.cni == ("calico",)):
        what = "IP-in-IP" if req.proto == "ipip" else "Calico's IPv4 WireGuard (UDP 51820)"
        if main == "ipv4":
            return [("ipv4", main_why, True)]
        return [
            (
                "ipv4",
                f"not checked: {what} carries IPv4 over an IPv4 underlay; the cluster is IPv6 "
                f"only [{fams.source}]"
                + ("; WireGuard for IPv6 is calico.wireguard6" if req.proto != "ipip" else ""),
                False,
            )
        ]
    if "vxlan" not in feats:
        return [(main, main_why, True)]
    vx6 = eff.config.vxlan6
    if main == "ipv6":  # IPv6 only: the IPv6 pool's mode decides
        if vx6.value:
            return [("ipv6", f"over IPv6: Calico VXLAN for IPv6 [{vx6.source}]", True)]
        return [("ipv6", f"not checked: Calico VXLAN for IPv6 is off [{vx6.source}]", False)]
    if vx6.value:
        return [
            ("ipv4", main_why, True),
            ("ipv6", f"also over IPv6: Calico VXLAN for IPv6 [{vx6.source}]", True),
        ]
    if "ipv6" in fams.value:  # dual stack without VXLAN for IPv6: say so on the IPv4 leg
        return [("ipv4", f"{main_why}; not over IPv6: VXLAN for IPv6 is off [{vx6.source}]", True)]
    return [("ipv4", main_why, True)]


def _all_ipv4(site: Site) -> bool:
    return not any(":" in h.address for h in site.hosts())


def family_view(site: Site, af: str) -> tuple[Site, dict[str, Cluster], tuple[str, ...]]:
    """The site as seen over one family: hosts at their address of that family (IPv6: address6),
    VIPs of that family; hosts without one are left out and named in the third value."""
    missing: list[str] = []

    def addr(h: Host) -> str | None:
        if af == "ipv6":
            return h.address6 or (h.address if ":" in h.address else None)
        return None if ":" in h.address else h.address

    def host(h: Host) -> Host | None:
        a = addr(h)
        if a is None:
            missing.append(h.name)
            return None
        return replace(h, address=a)

    def vips(d: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in d.items() if (":" in v) == (af == "ipv6")}

    clusters = tuple(
        replace(c, hosts=tuple(x for x in map(host, c.hosts) if x is not None), vips=vips(c.vips))
        for c in site.clusters
    )
    boot = host(site.bootstrap) if site.bootstrap is not None else None
    view = replace(site, clusters=clusters, bootstrap=boot, vips=vips(site.vips))
    return view, {c.name: c for c in clusters}, tuple(missing)


def _endpoint_req(name: str, port: int | None) -> Requirement:
    return Requirement(
        id=f"endpoint.{name}",
        component=name,
        proto="tcp",
        ports=None if port is None else str(port),
        description=f"{name}: a host outside the inventory every node pulls from",
        dst_role="node",
        # kubespray's container-engine and download roles run on k8s_cluster:etcd; only nodes
        # use the API load balancer
        src_roles=("node",) if name == "loadbalancer_apiserver" else ("node", "etcd"),
        reference="kubespray variables (registry, files, mirrors)",
        section="endpoint",
    )


def _endpoint_legs(
    k: Cluster, site: Site, sel: Selection, boot_ports: set[int | None]
) -> Iterator[Leg]:
    """Flows from every node to each endpoint the variables name (scanner/plan/endpoints.py);
    no reverse direction. A site's bootstrap node wins: an endpoint on it at a port the
    bootstrap.* requirements already check is not planned twice."""
    b = site.bootstrap
    for e in k.config.endpoints:
        req = _endpoint_req(e.name, e.port)
        why = e.source + (f"; also {', '.join(e.vars[1:])}" if len(e.vars) > 1 else "")
        if b is not None and e.host in (b.address, b.name) and e.port in boot_ports:
            yield Leg(req, k, False, f"{why}; on the site's bootstrap node {b.name}: bootstrap.*")
            continue
        srcs = _srcs(req, k, site, sel)
        if not srcs:
            gone = " (after --from)" if sel.sources is not None else ""
            yield Leg(req, k, True, f"{why}; no source hosts with role node{gone}")
            continue
        af = "ipv6" if ":" in e.host else "ipv4"
        yield Leg(req, k, True, why, srcs, ((e.name, e.host),), (e.port,), af)
    for name, raw in k.config.unresolved.items():
        if is_endpoint_var(name):
            yield Leg(
                _endpoint_req(name, None),
                k,
                False,
                redact(f"{name}={raw!r}: the template does not resolve to a host here; not planned"),
            )


def plan(catalog: Catalog, site: Site, selection: Selection) -> Iterator[Flow]:
    """The flows, lazily, in plan order."""
    for leg in legs(catalog, site, selection):
        if leg.applies:
            yield from leg.flows()


def count_plan(catalog: Catalog, site: Site, selection: Selection) -> int:
    """len(list(plan(...))) without building a single flow."""
    return sum(leg.count() for leg in legs(catalog, site, selection) if leg.applies)


def explain(catalog: Catalog, site: Site, selection: Selection) -> Iterator[dict[str, Any]]:
    """Per requirement and cluster: in the plan or not, and why (which setting decided)."""
    for leg in legs(catalog, site, selection):
        n = leg.count() if leg.applies else 0
        yield {
            "type": "explain",
            "req": leg.req.id,
            "cluster": leg.cluster.name,
            "kind": leg.cluster.kind,
            "included": n > 0,
            "flows": n,
            "af": leg.af,
            "why": leg.why,
        }


def flow_record(f: Flow) -> dict[str, Any]:
    """The NDJSON record of one planned flow (``portmesh plan``)."""
    return {
        "type": "flow",
        "src": f.src,
        "src_host": f.src_host,
        "dst": f.dst,
        "af": f.af,
        "host": f.host,
        "proto": f.proto,
        "port": f.port,
        "req": f.req,
    }


def requirements_for(catalog: Catalog, selection: Selection) -> Iterator[Requirement]:
    """The entries that apply to a cluster with the selection's CNI and features (on top of the
    defaults); cluster-kind conditions are not checked (``portmesh catalog --cni/--with``)."""
    eff = effective(Cluster("catalog", "standalone", ()), selection)
    for req in catalog:
        cond = req.condition
        if cond.cni and eff.cni.value not in cond.cni:
            continue
        if all(eff.feature(f).value for f in cond.features):
            yield req


def effective_ports(req: Requirement, eff: Effective) -> tuple[str | None, str | None]:
    """A requirement's ports with its placeholders resolved for this cluster, and the kubespray
    variable(s) they follow (None when the ports are fixed)."""
    if req.ports is None:
        return None, None
    used = [n for n in _PLACEHOLDER_VARS if "${" + n in req.ports]
    var = ",".join(_PLACEHOLDER_VARS[n] for n in used) or None
    return expand_ports(req.ports, eff.port_values()) or req.ports, var


def plan_meta(catalog: Catalog, site: Site, selection: Selection) -> dict[str, Any]:
    """What the plan was built from, for the start record of plan/check/mesh."""
    k = selection.nodeport_sample
    clusters = []
    for c in site.clusters:
        eff = effective(c, selection)
        clusters.append(
            {
                "name": c.name,
                "kind": c.kind,
                "hosts": len(c.hosts),
                "cni": eff.cni.value,
                "features": sorted(f for f, s in eff.features.items() if s.value),
                "nodeport_range": eff.port_values()["nodeport_range"],
                "families": list(eff.config.families.value),
            }
        )
    return {
        "catalog": list(catalog.files),
        "site": site.source,
        "nodeport": "full" if k is None else "sample",
        "nodeport_sample": k,
        "sources": None if selection.sources is None else sorted(selection.sources),
        "clusters": clusters,
    }


# --------------------------------------------------------------------------- one leg


def _src(source: str) -> str:
    """Where a setting came from, in brackets of another kind than the source's own
    ("[default (kubespray)]", not "(default (kubespray))")."""
    return f"[{source}]"


def _leg(req: Requirement, k: Cluster, eff: Effective, site: Site, sel: Selection) -> Leg:
    ok, why = _condition(req, k, eff)
    if not ok:
        return Leg(req, k, False, _counted_elsewhere(req, k, site) or why)
    always = why == ALWAYS
    ports, port_why = _ports(req, eff, sel)
    if port_why:
        why = f"{why}; {port_why}"
    if ports is None:
        return Leg(req, k, False, why)
    dsts, dst_why = _dsts(req, k, site)
    if not dsts:
        # nothing to probe: the missing hosts are the reason, not "always required"
        return Leg(req, k, True, dst_why if always else f"{dst_why}; {why}")
    if dst_why:
        why = f"{why}; {dst_why}"
    if req.dst_role == "vip:kube_api":
        for e in k.config.endpoints:  # kubespray: loadbalancer_apiserver.port wins
            if e.name == "loadbalancer_apiserver" and any(d[1] == e.host for d in dsts):
                ports = (e.port,)
                why = f"{why}; port {e.port} ({e.source})"
    srcs = _srcs(req, k, site, sel)
    if not srcs:
        roles = ", ".join(req.src_roles)
        gone = " (after --from)" if sel.sources is not None else ""
        none = f"no source hosts with role {roles}{gone}"
        return Leg(req, k, True, none if always else f"{none}; {why}")
    return Leg(req, k, True, why, srcs, dsts, ports)


def _counted_elsewhere(req: Requirement, k: Cluster, site: Site) -> str:
    """For a requirement of another kind of cluster whose sources come from every cluster
    (e.g. Insight, reached from every node): k's hosts are sources there, say so."""
    cond = req.condition
    if req.src_scope != "site" or not cond.cluster:
        return ""
    owners = [c.name for c in site.clusters if c.kind in cond.cluster and c is not k]
    if not owners or not any(_has(h.roles, role) for h in k.hosts for role in req.src_roles):
        return ""
    return (
        f"counted under {', '.join(owners)} (only {'/'.join(cond.cluster)} clusters have it; its "
        f"sources are every cluster's hosts, {k.name}'s among them)"
    )


ALWAYS = "always required"


def _condition(req: Requirement, k: Cluster, eff: Effective) -> tuple[bool, str]:
    cond = req.condition
    parts: list[str] = []
    if cond.cluster:
        if k.kind not in cond.cluster:
            kinds = "/".join(cond.cluster)
            return False, f"only for {kinds} clusters; {k.name} is {k.kind}"
        parts.append(f"{k.name} is a {k.kind} cluster")
    if cond.cni:
        if eff.cni.value not in cond.cni:
            return (
                False,
                f"needs cni {'|'.join(cond.cni)}; cni is {eff.cni.value} {_src(eff.cni.source)}",
            )
        parts.append(f"cni {eff.cni.value} {_src(eff.cni.source)}")
    for f in cond.features:
        s = eff.feature(f)
        if not s.value:
            return False, f"feature {f} is off {_src(s.source)}"
        parts.append(f"feature {f} on {_src(s.source)}")
    return True, "; ".join(parts) or ALWAYS


def _ports(
    req: Requirement, eff: Effective, sel: Selection
) -> tuple[tuple[int | None, ...] | None, str]:
    if req.ports is None:
        return (None,), ""
    values = eff.port_values()
    notes: list[str] = []
    for name in _PLACEHOLDER_VARS:
        if "${" + name not in req.ports:
            continue
        var = _PLACEHOLDER_VARS[name]
        s = eff.port_setting(name)
        if var in eff.config.unresolved:
            notes.append(redact(f"{var} unresolved ({eff.config.unresolved[var]!r})"))
        if s is not None:
            notes.append(f"{name} {values[name]} {_src(s.source)}")
    spec = expand_ports(req.ports, values)
    if spec is None:
        return None, "; ".join([*notes, f"ports {req.ports}: a variable without a value"])
    ports = [p for _, p in parse_ports(spec)]
    if req.sample and sel.nodeport_sample is not None:
        ports = sample_ports(ports, sel.nodeport_sample)
        notes.append(f"sampled {len(ports)} ports (--nodeport-sample {sel.nodeport_sample})")
    return tuple(ports), "; ".join(notes)


def _has(host_roles: frozenset[str], role: str) -> bool:
    if role == "node":
        return not host_roles.isdisjoint(NODE_ROLES)
    return role in host_roles


def _role_ends(role: str, k: Cluster, site: Site) -> tuple[list[End], str]:
    """The hosts (or VIP) with ``role`` as seen from cluster k, and a reason when there are none."""
    if role.startswith("vip:"):
        name = role[4:]
        if name in k.vips:
            return [(f"vip:{name}@{k.name}", k.vips[name])], ""
        if name in site.vips:
            return [(f"vip:{name}", site.vips[name])], ""
        return [], f"no {name} VIP address in the site or cluster {k.name}"
    if role == "bootstrap":
        b = site.bootstrap
        return (
            ([(b.name, b.address)], "") if b is not None else ([], "no bootstrap node in the site")
        )
    if role == "global":
        out = [(h.name, h.address) for h in _global_nodes(site)]
        return out, "" if out else "no global service cluster in the site"
    out = [(h.name, h.address) for h in k.hosts if _has(h.roles, role)]
    return out, "" if out else f"no {role} hosts in cluster {k.name}"


def _global_nodes(site: Site) -> Iterator[Any]:
    for c in site.clusters:
        for h in c.hosts:
            if "global" in h.roles or (c.kind == "global" and _has(h.roles, "node")):
                yield h


def _dsts(req: Requirement, k: Cluster, site: Site) -> tuple[tuple[End, ...], str]:
    """The destinations and a note: why there are none, or that the fallback role was used."""
    ends, why = _role_ends(req.dst_role, k, site)
    if not ends and req.dst_fallback:
        ends, why2 = _role_ends(req.dst_fallback, k, site)
        why = f"{why}: {req.dst_fallback} instead" if ends else f"{why}, and {why2}"
    return tuple(_unique(ends)), why


def _srcs(req: Requirement, k: Cluster, site: Site, sel: Selection) -> tuple[End, ...]:
    ends: list[End] = []
    clusters = site.clusters if req.src_scope == "site" else (k,)
    for role in req.src_roles:
        if role == "scanner":
            name = sel.scanner or "scanner"
            h = site.host(sel.scanner) if sel.scanner else None
            ends.append((name, h.address if h is not None else None))
        elif role in ("global", "bootstrap"):
            ends.extend(_role_ends(role, k, site)[0])
        else:
            for c in clusters:
                ends.extend((h.name, h.address) for h in c.hosts if _has(h.roles, role))
    out = _unique(ends)
    if sel.sources is not None:
        out = [e for e in out if e[0] in sel.sources]
    return tuple(out)


def _unique(ends: list[End]) -> list[End]:
    seen: set[str] = set()
    out: list[End] = []
    for e in ends:
        if e[0] not in seen:
            seen.add(e[0])
            out.append(e)
    return out
