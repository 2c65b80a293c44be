"""The `portmesh lab` commands on top of scanner.lab.netns: a lab as a cluster. Its kubespray
inventory, its responders, its faults and ground truth, and ``lab up`` / ``down`` / ``status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from scanner.catalog import load_catalog
from scanner.core.flows import Flow
from scanner.core.model import natural_key
from scanner.core.tags import load_secret, new_secret
from scanner.errors import InputError
from scanner.lab import spawn
from scanner.lab.addressing import check_name
from scanner.lab.faults import check_hosts, load_fault_file
from scanner.lab.netns import (
    MAX_HOSTS,
    Lab,
    LabError,
    list_netns,
    netns_pids,
    require_root,
    run_dir,
)
from scanner.lab.spawn import start_time
from scanner.lab.truth import expected, hit
from scanner.plan.planner import legs, plan
from scanner.plan.selection import SelectionOptions, selection_argv
from scanner.responder.server import ranges_text

# fault-file role words -> kubespray inventory groups
_ROLE_GROUPS = {
    "control_plane": "kube_control_plane",
    "etcd": "etcd",
    "worker": "kube_node",
    "node": "kube_node",
    "calico_rr": "calico_rr",
}


def default_roles(names: list[str]) -> dict[str, tuple[str, ...]]:
    """The first host is control plane + etcd (and a node), the rest are workers."""
    out: dict[str, tuple[str, ...]] = {}
    for i, n in enumerate(names):
        out[n] = ("control_plane", "etcd") if i == 0 else ("worker",)
    return out


def inventory_doc(
    lab: Lab,
    roles: dict[str, tuple[str, ...]] | None = None,
    dual_stack_vars: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A kubespray/Kubean-style YAML inventory (the hosts.yml of Kubean's hosts-conf ConfigMap).

    Hosts carry ip6 (their 2001:2::/48 lab address); ``dual_stack_vars`` (e.g.
    ``{"enable_dual_stack_networks": True, "calico_vxlan_mode_ipv6": "Always"}``) go to all.vars,
    which is what makes the plan check anything over IPv6."""
    roles = {**default_roles(lab.host_names()), **(roles or {})}
    groups: dict[str, dict[str, Any]] = {g: {} for g in dict.fromkeys(_ROLE_GROUPS.values())}
    for h in lab.hosts:
        for r in roles.get(h.name, ()):
            g = _ROLE_GROUPS.get(r)
            if g is None:
                raise InputError(
                    f"roles of {h.name!r}: unknown role {r!r} (use {', '.join(_ROLE_GROUPS)})"
                )
            groups[g][h.name] = None
    return {
        "all": {
            "hosts": {
                h.name: {
                    "ansible_host": h.addr,
                    "ip": h.addr,
                    "access_ip": h.addr,
                    **({"ip6": h.addr6} if h.addr6 else {}),
                }
                for h in lab.hosts
            },
            "children": {
                **{g: {"hosts": members} for g, members in groups.items()},
                "k8s_cluster": {"children": {"kube_control_plane": None, "kube_node": None}},
            },
            **({"vars": dict(dual_stack_vars)} if dual_stack_vars else {}),
        }
    }


# the variables of a dual-stack lab inventory (lab up --dual-stack)
DUAL_STACK_VARS: dict[str, Any] = {
    "enable_dual_stack_networks": True,
    "calico_vxlan_mode_ipv6": "Always",
}


def write_inventory(
    lab: Lab,
    roles: dict[str, tuple[str, ...]] | None = None,
    dual_stack_vars: dict[str, Any] | None = None,
) -> Path:
    p = lab.state_dir() / "inventory.yml"
    p.write_text(
        f"# portmesh lab {lab.name}: {lab.subnet}\n"
        + yaml.safe_dump(inventory_doc(lab, roles, dual_stack_vars), sort_keys=False)
    )
    return p


def start_responders(
    lab: Lab, ttl: float, timeout: float = 60.0, selection: Any = None
) -> dict[str, dict[str, Any]]:
    """Start a responder in every lab host, detached (scanner.lab.spawn: forked from here).

    Each one answers on every port the plan probes its host on (as ``portmesh respond
    --inventory ... --as NAME``), logs its NDJSON to ``<state>/<host>.responder.ndjson``; its
    pid and start time go to ``<state>/<host>.responder.pid``. Returns host -> ready record
    (LabError if one fails).
    """
    d = lab.state_dir()
    secret = load_secret(path=str(d / "secret")) or b""
    # the selection options (--with, --cni, --vars, ...) shape the ports, as for the truth
    opts = dataclasses.replace(
        selection or SelectionOptions(), inventories=(str(d / "inventory.yml"),), hosts=None
    )
    catalog, site, sel = opts.resolve()
    ports = spawn.host_ports(catalog, site, sel)
    logs = {h.name: d / f"{h.name}.responder.ndjson" for h in lab.hosts}
    pids = spawn.spawn([(h.name, h.ns) for h in lab.hosts], ports, secret, ttl, logs)
    for name, pid in pids.items():
        (d / f"{name}.responder.pid").write_text(f"{pid} {spawn.start_time(pid)}\n")
    ready: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(ready) < len(pids):
        for name, pid in pids.items():
            if name in ready:
                continue
            log = logs[name]
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"ready"' in line:
                    ready[name] = json.loads(line)
            if name not in ready:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                    code = os.waitstatus_to_exitcode(status)
                    raise LabError(
                        f"the responder in {name} exited ({code}): {(tail or ['no output'])[0]}"
                    )
        if len(ready) < len(pids):
            if time.monotonic() > deadline:
                raise LabError(f"responders not ready after {timeout:g} s")
            time.sleep(0.05)
    return ready


@dataclass
class LabUpConfig:
    hosts: int = 4
    name: str = "pm"
    faults_file: str | None = None
    responders: bool = True
    ttl: float = 600.0
    show_flows: bool = False
    dual_stack: bool = False
    selection: Any = None  # SelectionOptions without inventories: --with, --cni, --vars, ...
    truth_file: bool = False  # write every flow's ground truth (truth.ndjson)


def lab_up(cfg: LabUpConfig, out: Any = None) -> int:
    """``portmesh lab up``: build, fault, inventory, responders, ground truth summary."""

    out = out or sys.stdout
    check_name("lab", cfg.name)
    require_root()
    names = [f"node{i}" for i in range(1, cfg.hosts + 1)] if 1 <= cfg.hosts <= MAX_HOSTS else []
    if not names:
        raise InputError(f"--hosts: {cfg.hosts} is not within 1-{MAX_HOSTS}")
    ff = load_fault_file(cfg.faults_file) if cfg.faults_file else None
    faults = list(ff.faults) if ff else []
    check_hosts(faults, names, cfg.faults_file or "faults")
    if ff:
        unknown = sorted(set(ff.roles) - set(names))
        if unknown:
            raise InputError(f"{cfg.faults_file}: roles: {unknown[0]!r} is not a lab host")

    sel_opts = cfg.selection or SelectionOptions()
    sel_opts.selection(load_catalog(sel_opts.catalog_files))  # bad --with etc.: before building
    sel_args = selection_argv(sel_opts)
    lab = Lab.up(cfg.hosts, cfg.name)
    try:
        lab.apply_faults(faults)
        inv = write_inventory(
            lab, ff.roles if ff else None, DUAL_STACK_VARS if cfg.dual_stack else None
        )
        secret = lab.state_dir() / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(new_secret() + b"\n")
        if cfg.faults_file:
            shutil.copyfile(cfg.faults_file, lab.state_dir() / "faults.yml")
        ready = start_responders(lab, cfg.ttl, selection=sel_opts) if cfg.responders else {}
    except BaseException:
        lab.down()
        raise
    w = out.write
    w(f"lab {lab.name}: {len(lab.hosts)} hosts on {lab.subnet}")
    w(f" (this host: {lab.host_addr})\n" if lab.host_addr else "\n")
    for h in lab.hosts:
        r = ready.get(h.name)
        resp = ""
        if r:
            resp = f"  responder pid {r['pid']}: tcp {r['bound']['tcp'] or '-'} udp {r['bound']['udp'] or '-'}"
        v6 = f" {h.addr6}" if h.addr6 else ""
        w(f"  {h.name:<8} {h.addr:<15}{v6} netns {h.ns}{resp}\n")
    w(f"inventory: {inv}\n")
    w(f"secret file: {lab.state_dir() / 'secret'}\n")
    w(f"exec template: {lab.exec_template()}\n")
    w(f"mesh: {shlex.join([*shlex.split(mesh_command(lab)), *sel_args])}\n")
    if sel_args:
        w(f"selection: {shlex.join(sel_args)} (give the same to plan, check and mesh)\n")
    for f in faults:
        w(f"fault: {f.describe()}\n")
    mode = "responder" if cfg.responders else "bare"
    unmatched = truth_summary(lab, inv, faults, out, cfg.show_flows, mode, sel_opts, cfg.truth_file)
    for f, hint in unmatched:
        err = sys.stderr
        err.write(
            f"portmesh lab up: warning: fault {f.describe()!r} matches no planned flow{hint}\n"
        )
    w(f"remove with: portmesh lab down --name {lab.name}\n")
    return 0


def mesh_command(lab: Lab) -> str:
    """The mesh over this lab, as docs/mesh.md shows it: the lab's secret file shares the lab's
    responders with the mesh (its agents' probes carry the secret they answer to)."""
    d = lab.state_dir()
    return (
        f"portmesh mesh -i {shlex.quote(str(d / 'inventory.yml'))} "
        f"--exec {shlex.quote(lab.exec_template())} "
        f"--secret-file {shlex.quote(str(d / 'secret'))}"
    )


def truth_summary(
    lab: Lab,
    inventory: Path,
    faults: list,
    out: Any,
    show_flows: bool,
    mode: str,
    selection_opts: Any = None,
    truth_file: bool = False,
) -> list[tuple[Any, str]]:
    """Count every host's planned flows as the faults decide them and print what should fail.

    Only the (source, destination) pairs a fault can touch are looked at flow by flow; every
    other pair passes as a whole (a 100-host lab over the full NodePort range is 27 M flows).
    ``truth_file``: also write every flow's ground truth to ``<state>/truth.ndjson``.

    Returns the faults that match no planned flow (each with a hint): a fault that changes
    nothing is almost always a mistake (a protocol the plan lacks, a port it does not probe).
    """
    opts = dataclasses.replace(
        selection_opts or SelectionOptions(), inventories=(str(inventory),), hosts=None
    )
    catalog, site, selection = opts.resolve()
    counts = {"pass": 0, "fail": 0, "unknown": 0}
    groups: dict[tuple[Any, ...], list[int]] = {}
    unmatched = list(faults)

    def note(fl: Any, e: Any) -> None:
        nonlocal unmatched
        if unmatched:
            unmatched = [f for f in unmatched if hit(fl, [f], lab) is None]
        counts[e.verdict] = counts.get(e.verdict, 0) + 1
        if e.verdict == "fail":
            key = (
                fl.src_host,
                fl.host,
                fl.proto,
                fl.af,
                e.state,
                e.reason,
                fl.req if show_flows else None,
            )
            groups.setdefault(key, []).append(fl.port or 0)

    path = lab.state_dir() / "truth.ndjson"
    if truth_file:
        _write_truth(path, catalog, site, selection, faults, lab, mode, note)
        where = f" -> {path}"
    else:
        _count_truth(catalog, site, selection, faults, lab, mode, note, counts)
        where = " (per-flow file: --truth-file)"
    total = sum(counts.values())  # every planned flow: pass + fail + unknown
    out.write(
        f"ground truth ({mode}): {total} planned flows, {counts['pass']} pass, "
        f"{counts['fail']} fail, {counts['unknown']} unknown{where}\n"
    )
    for (src, dst, proto, af, state, reason, req), ports in sorted(
        groups.items(), key=lambda kv: tuple(natural_key(str(x)) for x in kv[0])
    ):
        pr = ranges_text(p for p in ports if p)
        what = f"{proto}/{pr}" if pr else proto
        what += " over IPv6" if af == "ipv6" else ""
        extra = f" [{req}]" if req else ""
        out.write(f"  fail {src} -> {dst} {what}: {state} ({reason}){extra}\n")
    planned = [(leg.req.proto, leg.af) for leg in legs(catalog, site, selection) if leg.count()]
    protos = {p for p, _ in planned}
    hints = []
    for f in unmatched:
        over = " over IPv6" if f.family == "ipv6" else " over IPv4" if f.family else ""
        if f.proto not in protos:
            feature = {"ipip": "ipip"}.get(f.proto)
            turn = f": turn it on with --with {feature}" if feature else ""
            hints.append((f, f" (the plan has no {f.proto} flows{turn})"))
        elif f.family and (f.proto, f.family) not in planned:
            hints.append(
                (f, f" (the plan has no {f.proto} flows{over}: `portmesh plan --explain` says "
                 "which requirements go over which family)")
            )  # fmt: skip
        else:
            hints.append(
                (f, f" (no planned {f.proto} flow{over} to or from {f.host} on those ports)")
            )
    return hints


def _count_truth(catalog, site, selection, faults, lab, mode, note, counts) -> None:
    names = {h.addr: h.name for h in lab.hosts}
    touched = {(f.host, f.direction, f.proto) for f in faults}
    for leg in legs(catalog, site, selection):
        if not (leg.applies and leg.srcs and leg.dsts and leg.ports):
            continue
        proto, rid, ports = leg.req.proto, leg.req.id, leg.ports
        for sname, saddr in leg.srcs:
            src_hit = (names.get(saddr, sname), "out", proto) in touched
            for dname, daddr in leg.dsts:
                if dname == sname or daddr == saddr:
                    continue
                if not src_hit and (names.get(daddr, dname), "in", proto) not in touched:
                    counts["pass"] += len(ports)  # no fault can touch this pair
                    continue
                for port in ports:
                    fl = Flow(daddr, port, proto, dname, saddr, sname, rid)  # type: ignore[arg-type]
                    note(fl, expected(fl, faults, lab, mode=mode))


def _write_truth(path, catalog, site, selection, faults, lab, mode, note) -> None:
    with open(path, "wb") as fh:
        for fl in plan(catalog, site, selection):
            e = expected(fl, faults, lab, mode=mode)
            note(fl, e)
            rec = {
                "type": "truth",
                "src": fl.src,
                "src_host": fl.src_host,
                "dst": fl.dst,
                "host": fl.host,
                "proto": fl.proto,
                "port": fl.port,
                "req": fl.req,
                "state": e.state,
                "reason": e.reason,
                "verdict": e.verdict,
            }
            fh.write(orjson.dumps(rec) + b"\n")


def lab_down(name: str, out: Any = None) -> int:

    out = out or sys.stdout
    check_name("lab", name)
    require_root()
    existed = (run_dir() / name / "lab.json").exists() or any(
        ns.startswith(f"{name}-") for ns in list_netns()
    )
    _kill_recorded_responders(name)
    Lab.cleanup(name)
    out.write(f"lab {name}: removed\n" if existed else f"lab {name}: nothing to remove\n")
    return 0


def _kill_recorded_responders(name: str) -> None:
    # down() ends every process inside the lab's namespaces; these pid files only cover a
    # responder whose namespace is already gone. A pid is signalled only when its command line
    # still says it is a portmesh responder, or its start time is the one recorded (pids are
    # reused).
    for pidfile in (run_dir() / name).glob("*.responder.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid_s, _, started = pidfile.read_text().strip().partition(" ")
            pid = int(pid_s)
            if started:  # forked by scanner.lab.spawn: the same process if it started then

                if start_time(pid) == started:
                    os.kill(pid, signal.SIGTERM)
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"respond" in cmd and b"--as" in cmd:
                os.kill(pid, signal.SIGTERM)


def lab_status(name: str | None, out: Any = None) -> int:

    out = out or sys.stdout
    names = [check_name("lab", name)] if name else Lab.names()
    if not names:
        out.write("no labs\n")
        return 0
    for n in names:
        try:
            lab = Lab.load(n)
        except LabError as e:
            out.write(f"lab {n}: {e}\n")
            continue
        st = lab.status()
        out.write(f"lab {n}: {lab.subnet}, exec: {st['exec']}\n")
        out.write(f"  mesh: {mesh_command(lab)}\n")
        for h in st["hosts"]:
            pids = netns_pids(h["ns"]) if h["present"] else []
            state = "up" if h["present"] else "MISSING"
            out.write(f"  {h['name']:<8} {h['addr']:<15} {h['ns']} {state}")
            out.write(f" processes {','.join(map(str, pids))}\n" if pids else "\n")
    return 0
