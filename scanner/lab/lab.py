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
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner.core.model import natural_key
from scanner.errors import InputError
from scanner.lab.netns import (
    MAX_HOSTS,
    Lab,
    LabError,
    check_name,
    list_netns,
    netns_pids,
    require_root,
    run_dir,
)

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
    import yaml

    p = lab.state_dir() / "inventory.yml"
    p.write_text(
        f"# portmesh lab {lab.name}: {lab.subnet}\n"
        + yaml.safe_dump(inventory_doc(lab, roles, dual_stack_vars), sort_keys=False)
    )
    return p


def start_responders(
    lab: Lab, ttl: float, timeout: float = 60.0, selection: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Start ``portmesh respond --inventory ... --as NAME`` in every lab host, detached.

    Each one logs its NDJSON to ``<state>/<host>.responder.ndjson`` and its pid goes to
    ``<state>/<host>.responder.pid``. Returns host -> ready record (LabError if one fails).
    """

    d = lab.state_dir()
    inv = d / "inventory.yml"
    secret = d / "secret"
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    for h in lab.hosts:
        log = d / f"{h.name}.responder.ndjson"
        with open(log, "wb") as out, open(os.devnull, "rb") as devnull:
            p = lab.popen(
                h.name,
                [
                    sys.executable, "-m", "scanner", "respond",
                    "--inventory", str(inv), "--as", h.name,
                    "--secret-file", str(secret), "--ttl", f"{ttl:g}", "--bind", "::",
                    *(selection or []),
                ],
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # detached: survives the terminal, ends by TTL or down
            )  # fmt: skip
        (d / f"{h.name}.responder.pid").write_text(f"{p.pid}\n")
        procs[h.name] = (p, log)
    ready: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(ready) < len(procs):
        for name, (p, log) in procs.items():
            if name in ready:
                continue
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"ready"' in line:
                    ready[name] = json.loads(line)
            if name not in ready and p.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise LabError(f"the responder in {name} exited ({p.returncode}): {tail[0]}")
        if len(ready) < len(procs):
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


def lab_up(cfg: LabUpConfig, out: Any = None) -> int:
    """``portmesh lab up``: build, fault, inventory, responders, ground truth summary."""

    from scanner.core.tags import new_secret
    from scanner.lab.faults import check_hosts, load_fault_file

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
    from scanner.catalog import load_catalog
    from scanner.plan.selection import SelectionOptions, selection_argv

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
        ready = start_responders(lab, cfg.ttl, selection=sel_args) if cfg.responders else {}
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
    unmatched = truth_summary(lab, inv, faults, out, cfg.show_flows, mode, sel_opts)
    for f, hint in unmatched:
        err = sys.stderr
        err.write(f"portmesh lab up: warning: fault {f.describe()!r} matches no planned flow{hint}\n")
    w(f"remove with: portmesh lab down --name {lab.name}\n")
    return 0


def mesh_command(lab: Lab) -> str:
    """The mesh over this lab, as docs/mesh.md shows it: the lab's secret file shares the lab's
    responders with the mesh (its agents' probes carry the secret they answer to)."""
    import shlex

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
) -> list[tuple[Any, str]]:
    """Plan every host's flows, write the ground truth NDJSON and print what should fail.

    Returns the faults that match no planned flow (each with a hint): a fault that changes
    nothing is almost always a mistake (a protocol the plan lacks, a port it does not probe).
    """
    import orjson

    from scanner.lab.faults import expected
    from scanner.plan.selection import SelectionOptions
    from scanner.responder.server import ranges_text

    opts = dataclasses.replace(
        selection_opts or SelectionOptions(), inventories=(str(inventory),), hosts=None
    )
    catalog, site, selection = opts.resolve()
    from scanner.lab.faults import hit

    unmatched = list(faults)
    protos: set[str] = set()
    from scanner.plan.planner import plan

    path = lab.state_dir() / "truth.ndjson"
    counts = {"pass": 0, "fail": 0, "unknown": 0}
    groups: dict[tuple[Any, ...], list[int]] = {}
    with open(path, "wb") as fh:
        for fl in plan(catalog, site, selection):
            protos.add(fl.proto)
            if unmatched:
                unmatched = [f for f in unmatched if hit(fl, [f], lab) is None]
            e = expected(fl, faults, lab, mode=mode)
            counts[e.verdict] = counts.get(e.verdict, 0) + 1
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
            if e.verdict == "fail":
                key = (
                    fl.src_host,
                    fl.host,
                    fl.proto,
                    e.state,
                    e.reason,
                    fl.req if show_flows else None,
                )
                groups.setdefault(key, []).append(fl.port or 0)
    total = sum(counts.values())  # every planned flow: pass + fail + unknown
    out.write(
        f"ground truth ({mode}): {total} planned flows, {counts['pass']} pass, "
        f"{counts['fail']} fail, {counts['unknown']} unknown -> {path}\n"
    )
    for (src, dst, proto, state, reason, req), ports in sorted(
        groups.items(), key=lambda kv: tuple(natural_key(str(x)) for x in kv[0])
    ):
        pr = ranges_text(p for p in ports if p)
        what = f"{proto}/{pr}" if pr else proto
        extra = f" [{req}]" if req else ""
        out.write(f"  fail {src} -> {dst} {what}: {state} ({reason}){extra}\n")
    hints = []
    for f in unmatched:
        if f.proto not in protos:
            feature = {"ipip": "ipip"}.get(f.proto)
            turn = f": turn it on with --with {feature}" if feature else ""
            hints.append((f, f" (the plan has no {f.proto} flows{turn})"))
        else:
            hints.append((f, f" (no planned {f.proto} flow to or from {f.host} on those ports)"))
    return hints


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
    # still says it is a portmesh responder (pids are reused).
    for pidfile in (run_dir() / name).glob("*.responder.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
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
