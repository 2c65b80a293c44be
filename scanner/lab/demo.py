"""`portmesh demo`: a simulated cluster, injected firewall faults, a mesh from every host, and
a report that names exactly the faults.

With root: a 4-host dual-stack lab in network namespaces (scanner.lab.lab: IPv4 198.18.0.0/15
and IPv6 2001:2::/48 on every host; the inventory sets ``ip6``, ``enable_dual_stack_networks``
and ``calico_vxlan_mode_ipv6``, so Calico VXLAN is checked over both families) with five faults
in nftables:
  1. the etcd peer port (tcp/2380) dropped on the control-plane node,
  2. Calico VXLAN (udp/4789) dropped one way: node3 drops it from node2 only (both families),
  3. a slice of the NodePort range (tcp/30100-30199) rejected on node4,
  4. IP-in-IP (IP protocol 4) dropped on node2,
  5. Calico VXLAN over IPv6 only dropped on node4 (the ip6tables rule someone forgot; IPv4
     VXLAN to node4 passes), which the report names "calico.vxlan over IPv6".
`portmesh mesh` runs an agent with responders on every host over `ip netns exec`; every host
probes its planned flows (calico with VXLAN and IP-in-IP, the full NodePort range), the
verdicts are compared with the ground truth the faults imply, and the lab is removed.

Without root (no namespaces, no nftables, no raw sockets): the same story on loopback, as one
`portmesh mesh` too: hosts 127.0.0.2-127.0.0.5, an agent per host on this machine whose
responder binds its host's address and whose probes leave from it. A fault is a port that host's
responder leaves closed (MeshConfig.withhold), so a probe is answered with a reset (closed: a
fail where a responder is expected). Drops, ICMP and IP-in-IP need root
and are left out; the demo says so.

Output: the story and the report (the mesh's summary) on stderr, about 35 lines; the NDJSON on
stdout only when stdout is not a terminal (a file or a pipe), and with ``-o FILE`` a copy in
FILE, as ``-o`` means for scan and mesh.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import yaml

from scanner.core.flows import Flow
from scanner.core.privileges import CAP_NET_BIND_SERVICE, can_admin_net, has_cap
from scanner.engine.output import NdjsonOutput
from scanner.lab.addressing import subnet6_for
from scanner.lab.faults import Fault
from scanner.lab.lab import DUAL_STACK_VARS, write_inventory
from scanner.lab.netns import Lab
from scanner.lab.truth import expected
from scanner.mesh import MeshConfig, run_mesh
from scanner.plan.selection import SelectionOptions

LAB_NAME = "pmdemo"
LOOPBACK_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


@dataclass
class DemoConfig:
    output: str | None = None  # also write the NDJSON to this file
    force_loopback: bool = False
    keep: bool = False  # leave the lab up afterwards
    err: IO[str] | None = None
    name: str = LAB_NAME  # the lab's name; an existing lab of that name is never touched
    stdout: bool | None = None  # NDJSON on stdout; None: when stdout is not a terminal


def demo_faults() -> list:
    return [
        Fault("node1", "in", "tcp", ((2380, 2380),), "drop", None, "etcd peer port dropped"),
        Fault("node3", "in", "udp", ((4789, 4789),), "drop", "node2", "VXLAN blocked one way"),
        Fault("node4", "in", "tcp", ((30100, 30199),), "reject", None, "NodePort slice rejected"),
        Fault("node2", "in", "ipip", None, "drop", None, "IP-in-IP dropped"),
        Fault(
            "node4", "in", "udp", ((4789, 4789),), "drop", None, "VXLAN over IPv6 dropped",
            family="ipv6",
        ),
    ]


def run_demo(cfg: DemoConfig) -> int:
    err = cfg.err or sys.stderr
    if not cfg.force_loopback and can_admin_net() and _have("ip") and _have("nft"):
        return _lab_demo(cfg, err)
    why = "not root" if not can_admin_net() else "the ip/nft commands are missing"
    if cfg.force_loopback:
        why = "--loopback"
    err.write(
        f"portmesh demo: {why}: running the loopback demo (TCP and UDP only). Left out: nftables "
        "drops, ICMP and IP-in-IP, which need root (CAP_NET_ADMIN, CAP_NET_RAW) and a lab.\n"
    )
    return _loopback_demo(cfg, err)


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None


# -- the lab demo ---------------------------------------------------------------------------


def _lab_demo(cfg: DemoConfig, err: IO[str]) -> int:
    t0 = time.perf_counter()
    faults = demo_faults()
    lab = Lab.up(4, cfg.name)  # refuses a lab of that name that exists (kept, or in use)
    try:
        lab.apply_faults(faults)
        inv = write_inventory(lab, dual_stack_vars=DUAL_STACK_VARS)
        err.write(
            f"portmesh demo: lab {lab.name}: 4 dual-stack hosts on {lab.subnet} and "
            f"{subnet6_for(ipaddress.ip_network(lab.subnet))}, injected faults:\n"
        )
        for f in faults:
            err.write(f"  - {f.comment}: {f.describe()}\n")
        sel = ["--inventory", str(inv), "--with", "ipip"]
        catalog, site, selection = SelectionOptions(
            inventories=(str(inv),), with_features=("ipip",)
        ).resolve()
        result_file = lab.state_dir() / "demo.ndjson"
        err.write(
            "portmesh demo: `portmesh mesh` over `ip netns exec`: an agent and responders on every "
            "host, every host probes every peer\n"
        )
        mesh_rc = run_mesh(
            MeshConfig(
                catalog=catalog,
                site=site,
                selection=selection,
                exec_template=lab.exec_template(),
                output=_mesh_output(result_file),
                argv=["portmesh", "mesh", *sel, "--exec", lab.exec_template()],
                summary_to=err,
            )
        )
        if mesh_rc not in (0, 1):
            raise RuntimeError(f"the mesh ended with exit code {mesh_rc}")
        rc = _finish(cfg, err, result_file, _lab_truth(faults, lab), "injected", t0)
    finally:
        if cfg.keep:
            err.write(
                f"portmesh demo: lab kept; remove with: portmesh lab down --name {lab.name}\n"
            )
        else:
            lab.down()
    return rc


def _mesh_output(path: Path) -> Any:
    return NdjsonOutput(str(path), stdout=False)


def _finish(
    cfg: DemoConfig,
    err: IO[str],
    result_file: Path,
    expect_fail: Callable[[dict[str, Any]], tuple[bool, str]],
    what: str,
    t0: float,
) -> int:
    """Write the NDJSON where it goes; compare every verdict with the ground truth.

    The report itself is the mesh's summary, already on ``err``.
    ``expect_fail(result record) -> (should it fail, the expected state)``.
    """
    data = result_file.read_bytes()
    if cfg.output:
        Path(cfg.output).write_bytes(data)
    to_stdout = cfg.stdout if cfg.stdout is not None else not sys.stdout.isatty()
    if to_stdout:
        o = NdjsonOutput()
        o.write_raw(data)
        o.close()
    wrong = 0
    total = 0
    for line in data.splitlines():
        rec = orjson.loads(line)
        if rec.get("type") != "result":
            continue
        total += 1
        fail, state = expect_fail(rec)
        if fail != (rec.get("verdict") == "fail"):
            wrong += 1
            if wrong <= 10:
                err.write(
                    f"  MISMATCH {rec.get('src_host')} -> {rec['host']} {rec['proto']}/{rec['port']}: "
                    f"got {rec['state']}/{rec.get('verdict')}, expected {state}\n"
                )
    verdict = (
        f"exactly the {what} faults"
        if wrong == 0
        else f"{wrong} flows differ from the ground truth"
    )
    err.write(
        f"portmesh demo: {total} flows checked in {time.perf_counter() - t0:.1f}s; "
        f"the report shows {verdict}.\n"
    )
    if not to_stdout:
        where = f"in {cfg.output}" if cfg.output else "not printed on a terminal"
        err.write(
            f"portmesh demo: the {total} NDJSON results are {where}; pipe them "
            "(`portmesh demo | jq ...`) or add -o FILE.\n"
        )
    return 0 if wrong == 0 else 1


def _lab_truth(faults: list, lab: Any) -> Callable[[dict[str, Any]], tuple[bool, str]]:
    def truth(rec: dict[str, Any]) -> tuple[bool, str]:
        fl = Flow(
            rec["dst"], rec["port"], rec["proto"], rec["host"], rec["src"], rec.get("src_host")
        )
        e = expected(fl, faults, lab)
        return e.verdict == "fail", f"{e.state}/{e.verdict}"

    return truth


# -- the loopback demo ----------------------------------------------------------------------


# withheld ports per loopback host: the "faults" of the loopback story
LOOPBACK_FAULTS = {"node1": {2380}, "node4": set(range(30100, 30200))}


def _loopback_demo(cfg: DemoConfig, err: IO[str]) -> int:
    t0 = time.perf_counter()
    names = [f"node{i}" for i in range(1, 5)]
    addr = dict(zip(names, LOOPBACK_HOSTS, strict=True))
    with tempfile.TemporaryDirectory(prefix="portmesh-demo-") as tmp:
        d = Path(tmp)
        inv = d / "inventory.yml"
        inv.write_text(yaml.safe_dump({"all": {
            "hosts": {n: {"ansible_host": a, "ip": a, "access_ip": a} for n, a in addr.items()},
            "children": {
                "kube_control_plane": {"hosts": {"node1": None}},
                "etcd": {"hosts": {"node1": None}},
                "kube_node": {"hosts": {n: None for n in names[1:]}},
                "k8s_cluster": {"children": {"kube_control_plane": None, "kube_node": None}},
            },
        }}))  # fmt: skip
        sel = ["--inventory", str(inv)]
        catalogs: tuple[str, ...] = ()

        if not has_cap(CAP_NET_BIND_SERVICE):
            # a responder cannot open ports below 1024 without the capability: leave ssh out
            extra = d / "no-low-ports.toml"
            extra.write_text('[[requirement]]\nid = "node.ssh"\ndisabled = true\n')
            catalogs = (str(extra),)
            sel += ["--catalog", str(extra)]
            err.write(
                "portmesh demo: also left out: tcp/22 (ssh), a port below 1024 that a responder "
                "cannot open without CAP_NET_BIND_SERVICE.\n"
            )
        err.write(
            "portmesh demo: loopback cluster node1-node4 on 127.0.0.2-5; simulated faults:\n"
        )
        err.write("  - node1 does not answer tcp/2380 (etcd peer)\n")
        err.write("  - node4 does not answer tcp/30100-30199 (a NodePort slice)\n")
        err.write(
            "portmesh demo: `portmesh mesh` with every agent on this machine: each host's "
            "responder on its own address, every host probes every peer from it\n"
        )
        catalog, site, selection = SelectionOptions(
            inventories=(str(inv),), catalog_files=catalogs
        ).resolve()
        result_file = d / "demo.ndjson"
        template = "env PORTMESH_DEMO_HOST={name}"  # runs here: the agent is this Python
        mesh_rc = run_mesh(
            MeshConfig(
                catalog=catalog,
                site=site,
                selection=selection,
                exec_template=template,
                output=_mesh_output(result_file),
                argv=["portmesh", "mesh", *sel, "--exec", template],
                summary_to=err,
                witness=False,
                local_bind=True,
                # the faults: each host's responder leaves these ports closed, so a probe
                # gets a reset where a responder should answer, as from a firewall's reject
                withhold={n: frozenset(ps) for n, ps in LOOPBACK_FAULTS.items()},
            )
        )
        if mesh_rc not in (0, 1):
            raise RuntimeError(f"the mesh ended with exit code {mesh_rc}")

        def truth(rec: dict[str, Any]) -> tuple[bool, str]:
            fail = rec["port"] in LOOPBACK_FAULTS.get(rec["host"], set())
            return fail, "closed/fail" if fail else "open/pass"

        return _finish(cfg, err, result_file, truth, "simulated", t0)
