"""A simulated cluster on this machine: one network namespace per host on a bridge.

Layout of a lab named ``pm`` with hosts node1..nodeN::

    namespace pm-sw        bridge br0 (STP off, no forward delay) and one port per host
    namespace pm-node1     lo up, eth0 = 198.18.K.1/24 and 2001:2:0:K::1/64 (veth, peer p1 in pm-sw)
    ...
    namespace pm-nodeN     lo up, eth0 = 198.18.K.N/24
    root namespace         (host_link=True) a veth into the bridge with 198.18.K.254/24,
                           so a process here reaches the lab; its only route is the lab's /24

K (0..511, a /24 out of 198.18.0.0/15) is derived from the lab name, so labs with different
names run side by side; if that /24 is taken the next free one is used. The switch sits in its
own namespace, so the root namespace gains nothing but the optional host link.

Every link is created directly inside its namespace (``ip link add ... netns``) and configured
with one ``ip -batch`` per namespace, run concurrently: ``Lab.up`` with 4 hosts takes a few tens
of milliseconds. IPv6 link-local generation is off on every lab link (``addrgenmode none``), so
there is no DAD or router-solicitation noise on the wire.

What a lab made is recorded in ``/run/portmesh/<lab>/lab.json`` (``PORTMESH_RUN_DIR`` overrides
the directory) before it is made, and every link carries the alias ``portmesh-lab:<lab>``:
``Lab.cleanup(name)`` finds the leftovers of a crashed run by both, and removes those only.
Removing a namespace also removes its nftables rules; processes still running inside a lab
namespace (responders, agents) are ended first, since they would keep the namespace alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanner.errors import InputError, PrivilegeError, ScannerError
from scanner.lab import conntrack, sysctls
from scanner.lab.addressing import (
    HOST_LINK_OCTET,
    LAB_NET,
    canon6,
    check_name,
    root_ifname,
    subnet6_for,
    subnet_for,
    subnet_index,
)
from scanner.lab.faults import check_hosts
from scanner.lab.nft import nft_ruleset

SWITCH = "sw"
ALIAS_PREFIX = "portmesh-lab:"
MAX_HOSTS = 250


def run_dir() -> Path:
    return Path(os.environ.get("PORTMESH_RUN_DIR", "/run/portmesh"))


class LabError(ScannerError):
    """A lab could not be built or torn down (the message says which command failed)."""


@dataclass(frozen=True, slots=True)
class LabHost:
    name: str  # inventory host name (node1, ...)
    ns: str  # network namespace name (<lab>-<name>)
    addr: str  # IPv4 address on the lab bridge
    addr6: str | None = None  # IPv6 address on the lab bridge (2001:2::/48), None in old labs


def require_root() -> None:
    """Raise PrivilegeError unless this process may build namespaces; LabError if ip is missing."""
    if os.geteuid() != 0:
        raise PrivilegeError(
            "the lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN to create network namespaces): "
            "run it with sudo"
        )
    if shutil.which("ip") is None:
        raise LabError("the lab needs iproute2's 'ip' command, which is not on PATH")








def _ip(
    args: list[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    cp = subprocess.run(["ip", *args], input=input, capture_output=True, text=True)
    if check and cp.returncode != 0:
        what = " ".join(args) if input is None else f"{' '.join(args)} (batch)"
        err = cp.stderr.strip().replace("\n", "; ")
        raise LabError(f"ip {what} failed: {err}")
    return cp


def list_netns() -> list[str]:
    cp = _ip(["netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _link_aliases(ns: str | None) -> dict[str, str]:
    """ifname -> alias for the links of a namespace (None: the root namespace)."""
    args = (["-n", ns] if ns else []) + ["-o", "link", "show"]
    cp = _ip(args, check=False)
    out: dict[str, str] = {}
    for line in cp.stdout.splitlines():
        m = re.match(r"^\d+:\s+([^:@\s]+)[@:]", line)
        a = re.search(r"\\\s+alias (\S+)", line)
        if m and a:
            out[m.group(1)] = a.group(1)
    return out


def _root_routes() -> list[ipaddress.IPv4Network]:
    cp = _ip(["-4", "route", "show", "root", str(LAB_NET)], check=False)
    nets = []
    for line in cp.stdout.splitlines():
        tok = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(tok if "/" in tok else f"{tok}/32", strict=False))
    return nets


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    d = run_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _labs_on_disk() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    d = run_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*/lab.json")):
        with contextlib.suppress(OSError, ValueError):
            st = json.loads(p.read_text())
            out[st["name"]] = st
    return out


class Lab:
    """A running (or half-built) lab. Build with ``Lab.up``, remove with ``down``."""

    def __init__(
        self,
        name: str,
        hosts: list[LabHost],
        subnet: str,
        *,
        host_link: bool = True,
        host_addr: str | None = None,
        host_addr6: str | None = None,
    ) -> None:
        self.name = name
        self.hosts = hosts
        self.subnet = subnet
        self.host_link = host_link
        self.host_addr = host_addr  # the root namespace's address on the lab bridge, or None
        self.host_addr6 = host_addr6  # ... and its IPv6 address
        self.switch_ns = f"{name}-{SWITCH}"
        self.root_if = root_ifname(name) if host_link else None

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        hosts: int = 4,
        name: str = "pm",
        *,
        names: list[str] | None = None,
        host_link: bool = True,
    ) -> Lab:
        """Build a lab of ``hosts`` hosts (node1..nodeN) or of the given host names."""
        check_name("lab", name)
        if names is None:
            if not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
                raise InputError(f"bad host count {hosts!r}: use 1-{MAX_HOSTS}")
            names = [f"node{i}" for i in range(1, hosts + 1)]
        else:
            if not 1 <= len(names) <= MAX_HOSTS:
                raise InputError(f"bad host list: use 1-{MAX_HOSTS} names")
            for n in names:
                check_name("host", n)
            if len(set(names)) != len(names):
                raise InputError(f"bad host list {names!r}: duplicate names")
            if SWITCH in names:
                raise InputError(f"bad host name {SWITCH!r}: reserved for the lab's switch")
        require_root()

        with _state_lock():
            existing = set(list_netns())
            wanted = [f"{name}-{n}" for n in names] + [f"{name}-{SWITCH}"]
            clash = [ns for ns in wanted if ns in existing]
            if clash or (run_dir() / name / "lab.json").exists():
                raise LabError(
                    f"lab {name!r} already exists (namespace {clash[0] if clash else '?'}): "
                    f"remove it with 'portmesh lab down --name {name}' or pick another --name"
                )
            if host_link and root_ifname(name) in _root_link_names():
                raise LabError(
                    f"a link named {root_ifname(name)!r} already exists in the root namespace"
                )
            subnet = cls._pick_subnet(name)
            subnet6 = subnet6_for(subnet)
            addrs = list(subnet.hosts())
            lab = cls(
                name,
                [
                    LabHost(n, f"{name}-{n}", str(addrs[i]), str(subnet6[i + 1]))
                    for i, n in enumerate(names)
                ],
                str(subnet),
                host_link=host_link,
                host_addr=str(addrs[HOST_LINK_OCTET - 1]) if host_link else None,
                host_addr6=str(subnet6[HOST_LINK_OCTET]) if host_link else None,
            )
            lab._save_state()
        try:
            sysctls.claim(lab.state_dir(), len(lab.hosts))  # the kernel's ARP table size
            lab._build()
        except BaseException:
            lab.down()
            raise
        return lab

    @staticmethod
    def _pick_subnet(name: str) -> ipaddress.IPv4Network:
        taken = {st.get("subnet") for st in _labs_on_disk().values()}
        routes = _root_routes()
        start = subnet_index(name)
        for i in range(512):
            net = subnet_for((start + i) % 512)
            if str(net) in taken or any(net.overlaps(r) for r in routes):
                continue
            return net
        raise LabError("no free /24 left in 198.18.0.0/15 for another lab")

    def _build(self) -> None:
        alias = ALIAS_PREFIX + self.name
        sw = self.switch_ns
        root = [f"netns add {sw}"] + [f"netns add {h.ns}" for h in self.hosts]
        for i, h in enumerate(self.hosts, 1):
            root.append(f"link add eth0 netns {h.ns} type veth peer name p{i} netns {sw}")
        if self.root_if:
            root.append(f"link add {self.root_if} type veth peer name uplink netns {sw}")
        _ip(["-batch", "-"], input="\n".join(root) + "\n")

        batches: list[tuple[list[str], list[str]]] = []
        plen = ipaddress.ip_network(self.subnet).prefixlen
        for h in self.hosts:
            batches.append(
                (
                    ["-n", h.ns, "-batch", "-"],
                    [
                        "link set lo up",
                        f"link set eth0 alias {alias}",
                        "link set eth0 addrgenmode none",
                        f"addr add {h.addr}/{plen} dev eth0",
                        *([f"addr add {h.addr6}/64 dev eth0 nodad"] if h.addr6 else []),
                        "link set eth0 up",
                    ],
                )
            )
        swcmds = [
            "link set lo up",
            "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            f"link set br0 alias {alias}",
            "link set br0 addrgenmode none",
            "link set br0 up",
        ]
        ports = [f"p{i}" for i in range(1, len(self.hosts) + 1)]
        if self.root_if:
            ports.append("uplink")
        for p in ports:
            swcmds += [
                f"link set {p} alias {alias}",
                f"link set {p} addrgenmode none",
                f"link set {p} master br0",
                f"link set {p} up",
            ]
        batches.append((["-n", sw, "-batch", "-"], swcmds))
        if self.root_if:
            batches.append(
                (
                    ["-batch", "-"],
                    [
                        f"link set {self.root_if} alias {alias}",
                        f"link set {self.root_if} addrgenmode none",
                        f"addr add {self.host_addr}/{plen} dev {self.root_if}",
                        *(
                            [f"addr add {self.host_addr6}/64 dev {self.root_if} nodad"]
                            if self.host_addr6
                            else []
                        ),
                        f"link set {self.root_if} up",
                    ],
                )
            )
        procs = [
            (
                args,
                subprocess.Popen(
                    ["ip", *args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                cmds,
            )
            for args, cmds in batches
        ]
        errors = []
        for args, p, cmds in procs:
            _, err = p.communicate("\n".join(cmds) + "\n")
            if p.returncode != 0:
                errors.append(f"ip {' '.join(args[:2])}: {err.strip()}")
        if errors:
            raise LabError("lab setup failed: " + "; ".join(errors))
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        # A link set up is not yet passing packets: the kernel's linkwatch applies carrier
        # changes (and attaches the real qdisc) in deferred work, rate-limited to one batch a
        # second, so the first packets of a fresh lab can vanish (measured here: one bridge port
        # stayed DOWN for 0.5 s, and the first connect of a test took 1 s, one SYN retransmit).
        # Wait until every lab link reports operstate UP and every bridge port forwards.
        nss = self.namespaces()
        want_ports = len(self.hosts) + (1 if self.root_if else 0)
        deadline = time.monotonic() + timeout
        while True:
            procs = [
                subprocess.Popen(
                    ["ip", "-n", ns, "-o", "link", "show"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                for ns in nss
            ]
            if self.root_if:
                procs.append(
                    subprocess.Popen(
                        ["ip", "-o", "link", "show", self.root_if],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                )
            procs.append(
                subprocess.Popen(
                    ["bridge", "-n", self.switch_ns, "link", "show"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                if shutil.which("bridge")
                else subprocess.Popen(
                    ["true"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
            )
            outs = [p.communicate()[0] for p in procs]
            bridge_out = outs.pop()
            down = [
                line.split(":")[1].strip()
                for out in outs
                for line in out.splitlines()
                if not re.match(r"^\d+:\s+lo:", line) and "state UP" not in line
            ]
            forwarding = bridge_out.count("state forwarding") if bridge_out else want_ports
            if not down and forwarding >= want_ports:
                return
            if time.monotonic() > deadline:
                raise LabError(f"lab links did not come up within {timeout:g} s: {', '.join(down)}")
            time.sleep(0.03)

    # ---- state ----------------------------------------------------------------------------

    def state_dir(self) -> Path:
        return run_dir() / self.name

    def _save_state(self) -> None:
        d = self.state_dir()
        d.mkdir(parents=True, exist_ok=True)
        st = {
            "name": self.name,
            "subnet": self.subnet,
            "host_link": self.host_link,
            "host_addr": self.host_addr,
            "host_addr6": self.host_addr6,
            "root_if": self.root_if,
            "switch_ns": self.switch_ns,
            "hosts": [
                {"name": h.name, "ns": h.ns, "addr": h.addr, "addr6": h.addr6} for h in self.hosts
            ],
        }
        tmp = d / "lab.json.tmp"
        tmp.write_text(json.dumps(st, indent=1) + "\n")
        tmp.replace(d / "lab.json")

    @classmethod
    def load(cls, name: str) -> Lab:
        """The lab of that name as recorded by ``up`` (raises LabError when there is none)."""
        check_name("lab", name)
        p = run_dir() / name / "lab.json"
        try:
            st = json.loads(p.read_text())
            return cls(
                st["name"],
                [LabHost(h["name"], h["ns"], h["addr"], h.get("addr6")) for h in st["hosts"]],
                st["subnet"],
                host_link=bool(st.get("host_link")),
                host_addr=st.get("host_addr"),
                host_addr6=st.get("host_addr6"),
            )
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} (nothing in {p.parent})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LabError(f"bad lab state file {p}: {e}") from None

    @classmethod
    def names(cls) -> list[str]:
        """Names of the labs recorded on this machine."""
        return sorted(_labs_on_disk())

    # ---- using ----------------------------------------------------------------------------

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InputError(
            f"lab {self.name!r} has no host {name!r} (hosts: {', '.join(self.host_names())})"
        )

    def host_names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def by_addr(self, addr: str) -> LabHost | None:
        for h in self.hosts:
            if h.addr == addr or (h.addr6 is not None and h.addr6 == canon6(addr)):
                return h
        return None

    def netns_argv(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.host(host).ns]

    def run(self, host: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run a command inside a lab host (ip netns exec); kwargs go to subprocess.run."""
        return subprocess.run([*self.netns_argv(host), *argv], **kw)

    def popen(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start a command inside a lab host; ``down`` ends it if the caller did not."""
        return subprocess.Popen([*self.netns_argv(host), *argv], **kw)

    def nft(self, host: str, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -`` syntax) into a lab host's namespace."""
        if shutil.which("nft") is None:
            raise LabError(
                "the lab's faults need the 'nft' command (nftables), which is not on PATH"
            )
        cp = self.run(host, ["nft", "-f", "-"], input=ruleset, capture_output=True, text=True)
        if cp.returncode != 0:
            lines = [ln.strip() for ln in cp.stderr.splitlines() if "Error" in ln]
            err = "; ".join(lines or [cp.stderr.strip()])
            raise LabError(f"nft in lab host {host!r} failed: {err}")

    def apply_faults(self, faults: list) -> None:
        """Load the nftables rules of these faults (scanner.lab.faults.Fault) into every lab host.

        Each host's table ``inet portmesh`` is replaced as a whole, so applying a new set removes
        the old one; hosts without faults get an empty table. Then each host's conntrack table
        is flushed: the rules match a connection's first packet only, and an entry left by an
        earlier flow on the same 5-tuple (a reused source port) would let a packet pass them.
        """
        check_hosts(faults, self.host_names())
        for h in self.hosts:
            self.nft(h.name, nft_ruleset([f for f in faults if f.host == h.name], self))
        for h in self.hosts:  # after the rules: no flow can slip in between
            try:
                conntrack.flush(h.ns)
            except OSError as e:
                raise LabError(
                    f"cannot flush the conntrack table of lab host {h.name!r} ({e.strerror or e}):"
                    " earlier flows could pass the new faults"
                ) from None

    def exec_template(self) -> str:
        """The mesh's --exec template: how a command reaches a lab host ({name} placeholder)."""
        return f"ip netns exec {self.name}-{{name}}"

    def status(self) -> dict[str, Any]:
        """What exists of this lab right now (for ``portmesh lab status``)."""
        present = set(list_netns())
        return {
            "name": self.name,
            "subnet": self.subnet,
            "host_addr": self.host_addr,
            "host_addr6": self.host_addr6,
            "exec": self.exec_template(),
            "switch": {"ns": self.switch_ns, "present": self.switch_ns in present},
            "hosts": [
                {
                    "name": h.name,
                    "ns": h.ns,
                    "addr": h.addr,
                    "addr6": h.addr6,
                    "present": h.ns in present,
                }
                for h in self.hosts
            ],
        }

    # ---- tearing down ---------------------------------------------------------------------

    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts] + [self.switch_ns]

    def down(self) -> None:
        """Remove every namespace, link and rule this lab made, and nothing else. Idempotent."""
        present = set(list_netns())
        mine = [ns for ns in self.namespaces() if ns in present]
        _end_processes(mine)
        cmds = []
        if self.root_if and _link_aliases(None).get(self.root_if) == ALIAS_PREFIX + self.name:
            cmds.append(f"link del {self.root_if}")
        elif self.root_if and self.root_if in _root_link_names():
            # half-built: created but not yet labelled; its peer sits in our switch namespace
            cmds.append(f"link del {self.root_if}")
        cmds += [f"netns del {ns}" for ns in mine]
        if cmds:
            _ip(["-force", "-batch", "-"], input="\n".join(cmds) + "\n", check=False)
        shutil.rmtree(self.state_dir(), ignore_errors=True)
        sysctls.release(self.state_dir())

    @classmethod
    def cleanup(cls, name: str) -> None:
        """Remove what is left of a lab of that name (a crashed run), found by state and alias."""
        check_name("lab", name)
        with contextlib.suppress(LabError):
            cls.load(name).down()
        alias = ALIAS_PREFIX + name
        prefix = f"{name}-"
        found = []
        for ns in list_netns():
            if ns.startswith(prefix) and alias in _link_aliases(ns).values():
                found.append(ns)
        _end_processes(found)
        cmds = [f"link del {ifn}" for ifn, a in _link_aliases(None).items() if a == alias]
        cmds += [f"netns del {ns}" for ns in found]
        if cmds:
            _ip(["-force", "-batch", "-"], input="\n".join(cmds) + "\n", check=False)
        shutil.rmtree(run_dir() / name, ignore_errors=True)
        sysctls.release(run_dir() / name)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"Lab({self.name!r}, hosts={self.host_names()}, subnet={self.subnet!r})"


def _root_link_names() -> set[str]:
    cp = _ip(["-o", "link", "show"], check=False)
    out = set()
    for line in cp.stdout.splitlines():
        m = re.match(r"^\d+:\s+([^:@\s]+)[@:]", line)
        if m:
            out.add(m.group(1))
    return out


def netns_pids(ns: str) -> list[int]:
    cp = _ip(["netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def _end_processes(namespaces: list[str], grace: float = 1.0) -> None:
    """End the processes running inside our lab namespaces: SIGTERM, then SIGKILL after grace."""
    pids = [p for ns in namespaces for p in netns_pids(ns) if p != os.getpid()]
    if not pids:
        return
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = [p for p in pids if _alive(p)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # a zombie counts as gone; it is left for its parent (a Popen of the caller) to reap
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
