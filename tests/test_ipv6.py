"""IPv6 end to end (issue 15).

Loopback (``::1``, no root needed unless said): TCP over IPv6 by connect() and said so per flow
and in the summary, UDP with ICMPv6 port unreachable, ICMPv6 echo (raw socket as root, the
unprivileged datagram socket as ``nobody`` in a private namespace), ICMPv6 error parsing.
Lab (root): ground truth over IPv6 from nftables faults: open, closed, dropped and
admin-prohibited for TCP, UDP and ICMPv6.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from scanner.core import tags
from scanner.core.flows import Flow
from scanner.probes import icmp6
from scanner.probes.base import ProbeOptions

SCAN = [sys.executable, "-m", "scanner", "scan", "--no-progress"]
V6 = "::1"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind((V6, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 on loopback (::1)")


def scan(*args: str, timeout: float = 60) -> tuple[list[dict], dict]:
    cp = subprocess.run([*SCAN, *args], capture_output=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr
    lines = [orjson.loads(line) for line in cp.stdout.splitlines()]
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "summary"
    results = lines[1:-1]
    assert lines[0]["planned"] == lines[-1]["results"] == len(results)
    return results, lines[-1]


@pytest.fixture
def v6_ports() -> Iterator[tuple[int, int, int, int]]:
    """(open tcp, closed tcp, open udp, closed udp) on ::1; the UDP one echoes every datagram."""
    tcp = socket.create_server((V6, 0), family=socket.AF_INET6, backlog=64)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.bind((V6, 0))
    udp.settimeout(0.05)
    free = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, kind)
        s.bind((V6, 0))
        free.append(s.getsockname()[1])
        s.close()
    stop = threading.Event()

    def serve() -> None:
        tcp.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = tcp.accept()
                conn.close()
            with contextlib.suppress(OSError):
                data, peer = udp.recvfrom(2048)
                udp.sendto(data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield tcp.getsockname()[1], free[0], udp.getsockname()[1], free[1]
    stop.set()
    t.join()
    tcp.close()
    udp.close()


# ---- loopback ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "connect"])
def test_tcp_and_udp_over_ipv6_loopback(v6_ports: tuple[int, int, int, int], method: str) -> None:
    to, tc, uo, uc = v6_ports
    results, summary = scan(
        V6, "127.0.0.1", "-p", f"T:{to},{tc},U:{uo},{uc}", "--method", method, "--retries", "0"
    )
    got = {(r["dst"], r["proto"], r["port"]): r for r in results}
    # auto: raw SYN for both families with CAP_NET_RAW (syn6.py over IPv6), else connect
    m = "syn" if method == "auto" and os.geteuid() == 0 else "connect"
    assert {(k, r["state"], r["reason"]) for k, r in got.items() if k[0] == V6} == {
        ((V6, "tcp", to), "open", "syn-ack"),
        # the kernel's RST: nmap's word per method (-sS reset, -sT conn-refused)
        ((V6, "tcp", tc), "closed", "reset" if m == "syn" else "conn-refused"),
        ((V6, "udp", uo), "open", "udp-response"),
        ((V6, "udp", uc), "closed", "port-unreach"),  # ICMPv6 type 1 code 4 via IPV6_RECVERR
    }
    for (dst, proto, _), r in got.items():
        assert r["af"] == ("ipv6" if dst == V6 else "ipv4")
        # every IPv6 TCP result says how it was probed; IPv4 ones follow the run's method
        assert r.get("tcp_method") == (m if (dst, proto) == (V6, "tcp") else None)
    assert summary["tcp_methods"] == {"ipv4": m, "ipv6": m}
    assert summary["tcp_method"] == m  # one method for both families: never "mixed" now
    _validate([*results, summary])


@pytest.mark.parametrize("method", ["auto", "connect"])
def test_an_ipv6_only_run_says_the_method_it_used(
    v6_ports: tuple[int, int, int, int], method: str
) -> None:
    to, tc, _, _ = v6_ports
    results, summary = scan(V6, "-p", f"{to},{tc}", "--method", method)
    m = "syn" if method == "auto" and os.geteuid() == 0 else "connect"
    assert summary["tcp_method"] == m
    assert summary["tcp_methods"] == {"ipv6": m}
    assert [r["tcp_method"] for r in results] == [m, m]


def test_ipv6_ranges_and_cidr_are_scanned(v6_ports: tuple[int, int, int, int]) -> None:
    to = v6_ports[0]
    results, _ = scan("::1-1", "::1/128", "-p", str(to))
    assert [(r["dst"], r["state"]) for r in results] == [(V6, "open"), (V6, "open")]


def test_icmpv6_echo_on_loopback() -> None:
    results, _ = scan(V6, "--icmp")
    (r,) = results
    can = _can_raw6() or _can_dgram6()
    want = ("open", "echo-reply") if can else ("error", "needs-cap-net-raw")
    assert (r["state"], r["reason"], r["af"], r["proto"]) == (*want, "ipv6", "icmp")


def _can_raw6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6).close()
        return True
    except OSError:
        return False


def _can_dgram6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6).close()
        return True
    except OSError:
        return False


_DGRAM6_IN_NETNS = """
import asyncio, sys
from scanner.core.flows import Flow
from scanner.probes import icmp6
from scanner.probes.base import ProbeOptions
async def go():
    p = icmp6.Icmp6Prober(ProbeOptions(), mode="dgram")
    await p.start(asyncio.get_running_loop())
    assert p.mode == "dgram", p.mode
    try:
        return await asyncio.gather(*(p.probe(Flow("::1", None, "icmp"), 1.0) for _ in range(5)))
    finally:
        p.close()
print(sorted({(o.state, o.reason) for o in asyncio.run(go())}))
"""


@pytest.mark.parametrize("mode", ["raw", "dgram"])
def test_icmp6_prober_modes_on_loopback(mode: str) -> None:
    if mode == "raw" and not _can_raw6():
        pytest.skip("raw ICMPv6 sockets need CAP_NET_RAW")
    if mode == "dgram" and not _can_dgram6():
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("the ICMPv6 datagram socket is not allowed (net.ipv4.ping_group_range)")
        # as root: a network namespace of its own (no route out, only lo) whose
        # ping_group_range admits the datagram socket, and the probe run there
        script = (
            "ip link set lo up && "
            "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range && "
            f'exec "{sys.executable}" -c "$0"'
        )
        cp = subprocess.run(
            ["unshare", "-n", "sh", "-c", script, _DGRAM6_IN_NETNS],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )  # fmt: skip
        assert cp.returncode == 0, cp.stderr[-2000:]
        assert cp.stdout.strip() == "[('open', 'echo-reply')]", cp.stdout
        return

    async def go() -> list:
        p = icmp6.Icmp6Prober(ProbeOptions(), mode=mode)
        await p.start(asyncio.get_running_loop())
        assert p.mode == mode
        try:
            return await asyncio.gather(*(p.probe(Flow(V6, None, "icmp"), 1.0) for _ in range(5)))
        finally:
            p.close()

    outs = asyncio.run(go())
    assert [(o.state, o.reason) for o in outs] == [("open", "echo-reply")] * 5
    assert all(o.rtt_ms is not None and o.rtt_ms >= 0 for o in outs)


def test_icmp6_prober_without_sockets_says_why() -> None:
    async def go():
        p = icmp6.Icmp6Prober(ProbeOptions(), mode="none")
        await p.start(asyncio.get_running_loop())
        return await p.probe(Flow(V6, None, "icmp"), 0.2)

    o = asyncio.run(go())
    assert (o.state, o.reason) == ("error", "needs-cap-net-raw")


# ---- ICMPv6 error parsing (pure) ----------------------------------------------------------------


def _quoting_error(typ: int, code: int, dst: str, ident: int, seq: int, tag: bytes) -> bytes:
    req = icmp6.echo_request(ident, seq, tag)
    ip6 = struct.pack("!IHBB", 6 << 28, len(req), 58, 64)
    ip6 += socket.inet_pton(socket.AF_INET6, "2001:2::1") + socket.inet_pton(socket.AF_INET6, dst)
    return struct.pack("!BBHI", typ, code, 0, 0) + ip6 + req


@pytest.mark.parametrize(
    ("typ", "code", "reason"),
    [
        (1, 1, "admin-prohibited"),  # nft reject with icmpx admin-prohibited
        (1, 4, "port-unreach"),  # nft reject with icmpx port-unreachable
        (1, 3, "host-unreach"),  # address unreachable (no neighbour)
        (1, 0, "net-unreach"),
        (1, 5, "admin-prohibited"),  # source address failed policy
        (1, 6, "admin-prohibited"),  # reject route
        (3, 0, "time-exceeded"),
    ],
)
def test_icmpv6_errors_resolve_the_request_they_quote(typ: int, code: int, reason: str) -> None:
    async def go():
        loop = asyncio.get_running_loop()
        p = icmp6.Icmp6Prober(ProbeOptions(), mode="none")
        p.loop = loop
        dst = socket.inet_pton(socket.AF_INET6, "2001:2::2")
        tag = tags.make_tag(b"", b"12345678")
        fut = loop.create_future()
        p.pending[(dst, 7)] = (fut, tag, loop.time())
        # someone else's request (other identifier), then another tag: both ignored
        p.on_message(_quoting_error(typ, code, "2001:2::2", p.ident ^ 1, 7, tag), "2001:2::2", 0)
        p.on_message(_quoting_error(typ, code, "2001:2::2", p.ident, 7, b"x" * 16), "2001:2::2", 0)
        assert not fut.done()
        p.on_message(_quoting_error(typ, code, "2001:2::2", p.ident, 7, tag), "2001:2::fe", 0)
        return await fut

    o = asyncio.run(go())
    assert (o.state, o.reason) == ("filtered", reason)
    assert o.extra == {"icmp_from": "2001:2::fe"}  # a router answered, not the host


def test_icmp6_filter_passes_only_what_we_read() -> None:
    words = struct.unpack("=8I", icmp6.icmp6_filter(129, 1, 3))
    passed = {t for t in range(256) if not words[t >> 5] & (1 << (t & 31))}
    assert passed == {1, 3, 129}


# ---- unprivileged, in a private network namespace -------------------------------------------------


def _private_ns_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a private network namespace"
    for tool in ("unshare", "setpriv", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def test_unprivileged_icmpv6_and_udp_errors_as_nobody() -> None:
    """As nobody (no capabilities) in a private namespace whose ping_group_range allows it:
    ICMPv6 echo by the datagram socket, and ICMPv6 admin-prohibited from nftables read from
    the error queues (echo and UDP), all without privileges."""
    reason = _private_ns_reason()
    if reason:
        pytest.skip(reason)
    ruleset = (
        "table inet t {\n chain input {\n type filter hook input priority 0; policy accept;\n"
        " meta nfproto ipv6 udp dport 9 reject with icmpx type admin-prohibited\n"
        " ip6 daddr ::2 icmpv6 type echo-request reject with icmpx type admin-prohibited\n }\n}\n"
    )
    script = (
        "set -e; ip link set lo up; ip -6 addr add ::2/128 dev lo nodad;"
        " sysctl -q -w net.ipv4.ping_group_range='0 2147483647';"
        " nft -f -;"
        " exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all"
        f" {_sh(sys.executable)} -m scanner scan ::1 ::2 --icmp -p U:9 --no-progress --retries 0"
    )
    cp = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        input=ruleset.encode(),
        capture_output=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert cp.returncode == 0, cp.stderr
    lines = [orjson.loads(x) for x in cp.stdout.splitlines()]
    got = {(r["dst"], r["proto"]): (r["state"], r["reason"]) for r in lines[1:-1]}
    assert got == {
        ("::1", "icmp"): ("open", "echo-reply"),
        ("::2", "icmp"): ("filtered", "admin-prohibited"),
        ("::1", "udp"): ("filtered", "admin-prohibited"),
        ("::2", "udp"): ("filtered", "admin-prohibited"),
    }


def _validate(recs: list[dict]) -> None:
    """Every record against scanner/schema.json."""
    import importlib.resources
    import json

    from jsonschema import Draft202012Validator

    schema = json.loads(importlib.resources.files("scanner").joinpath("schema.json").read_text())
    v = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for rec in recs:
        assert [e.message for e in v.iter_errors(rec)] == [], rec


def _sh(s: str) -> str:
    import shlex

    return shlex.quote(s)


# ---- dual-stack planning (pure) -----------------------------------------------------------------

DUAL = """
all:
  hosts:
    node1: {ip: 198.18.0.1, ip6: "2001:2::1"}
    node2: {ip: 198.18.0.2, access_ip6: "2001:2:0:0::2", ip6: "2001:2::99"}
    node3: {ip: 198.18.0.3}
  children:
    kube_control_plane: {hosts: {node1: {}}}
    etcd: {hosts: {node1: {}}}
    kube_node: {hosts: {node2: {}, node3: {}}}
    k8s_cluster: {children: {kube_control_plane: {}, kube_node: {}}}
  vars:
"""


def _site(tmp_path, extra_vars: str, text: str = DUAL):
    from scanner.plan.inventory import load_site

    p = tmp_path / "hosts.yml"
    p.write_text(text + "".join(f"    {line}\n" for line in extra_vars.splitlines()))
    return load_site([str(p)])


def _by_req(site) -> dict[str, set[tuple[str, str | None, str, str]]]:
    from scanner.catalog.loader import load_catalog
    from scanner.plan.planner import plan
    from scanner.plan.selection import Selection

    out: dict[str, set] = {}
    for f in plan(load_catalog(), site, Selection()):
        out.setdefault(f.req, set()).add((f.af, f.src, f.dst, f.proto))
    return out


def test_ip6_and_access_ip6_are_read(tmp_path) -> None:
    site = _site(tmp_path, "enable_dual_stack_networks: true")
    got = {h.name: (h.address, h.address6) for h in site.hosts()}
    # access_ip6 wins over ip6, and addresses are written the one canonical way
    assert got == {
        "node1": ("198.18.0.1", "2001:2::1"),
        "node2": ("198.18.0.2", "2001:2::2"),
        "node3": ("198.18.0.3", None),
    }
    assert site.clusters[0].config.families.value == ("ipv4", "ipv6")


def test_a_bad_ip6_is_one_line_naming_the_host(tmp_path) -> None:
    from scanner.errors import InventoryError

    with pytest.raises(InventoryError, match=r"host node1: ip6='198.18.0.9' is not an IPv6"):
        _site(tmp_path, "", DUAL.replace('ip6: "2001:2::1"', "ip6: 198.18.0.9"))


def test_ipv4_cluster_plans_nothing_over_ipv6(tmp_path) -> None:
    by = _by_req(_site(tmp_path, "calico_wireguard_enabled: true"))
    assert {af for flows in by.values() for af, *_ in flows} == {"ipv4"}
    assert "calico.wireguard6" not in by  # wireguard6 needs IPv6 on


def test_dual_stack_wireguard6_and_vxlan6_go_over_ipv6(tmp_path) -> None:
    by = _by_req(
        _site(
            tmp_path,
            "enable_dual_stack_networks: true\n"
            "calico_wireguard_enabled: true\n"
            "calico_vxlan_mode_ipv6: Always",
        )
    )
    # WireGuard v6 (51821) between the hosts that have IPv6 addresses, over IPv6 only
    assert by["calico.wireguard6"] == {
        ("ipv6", "2001:2::1", "2001:2::2", "udp"),
        ("ipv6", "2001:2::2", "2001:2::1", "udp"),
    }
    # VXLAN over both families; WireGuard v4 and the control plane over the main one (IPv4)
    assert {af for af, *_ in by["calico.vxlan"]} == {"ipv4", "ipv6"}
    assert {af for af, *_ in by["calico.wireguard"]} == {"ipv4"}
    for req in ("k8s.apiserver", "etcd.client", "k8s.kubelet"):
        assert {af for af, *_ in by[req]} == {"ipv4"}, req


def test_vxlan6_off_by_default_in_dual_stack(tmp_path) -> None:
    by = _by_req(_site(tmp_path, "ipv6_stack: true"))
    assert {af for af, *_ in by["calico.vxlan"]} == {"ipv4"}


def test_ipv6_only_cluster_goes_over_ipv6_everywhere(tmp_path) -> None:
    site = _site(tmp_path, "ipv6_stack: true\nipv4_stack: false")
    by = _by_req(site)
    afs = {af for flows in by.values() for af, *_ in flows}
    assert afs == {"ipv6"}
    assert by["etcd.client"] == {("ipv6", "2001:2::2", "2001:2::1", "tcp")}


def test_ipv6_only_cluster_checks_no_ipv4_underlay_and_vxlan_by_the_ipv6_pool(tmp_path) -> None:
    """Review of issue 15: in an IPv6-only cluster Calico's IPv4 WireGuard (51820) and IP-in-IP
    have no IPv4 underlay, and VXLAN follows the IPv6 pool's mode (calico_vxlan_mode_ipv6,
    default Never), not calico_vxlan_mode: checking them over IPv6 would fail a correct
    firewall. explain says why each is left out."""
    from scanner.catalog.loader import load_catalog
    from scanner.plan.planner import explain
    from scanner.plan.selection import Selection

    only6 = "ipv6_stack: true\nipv4_stack: false\ncalico_wireguard_enabled: true\n"
    by = _by_req(_site(tmp_path, only6 + "calico_ipip_mode: Always"))
    assert "calico.wireguard" not in by and "calico.ipip" not in by and "calico.vxlan" not in by
    assert {af for af, *_ in by["calico.wireguard6"]} == {"ipv6"}
    site = _site(tmp_path, only6)
    recs = {(e["req"], e["af"]): e for e in explain(load_catalog(), site, Selection())}
    wg = recs[("calico.wireguard", "ipv4")]
    assert not wg["included"] and "carries IPv4 over an IPv4 underlay" in wg["why"]
    vx = recs[("calico.vxlan", "ipv6")]
    assert not vx["included"] and "calico_vxlan_mode_ipv6=Never" in vx["why"]
    by = _by_req(_site(tmp_path, only6 + "calico_vxlan_mode_ipv6: Always"))
    assert {af for af, *_ in by["calico.vxlan"]} == {"ipv6"}
    # dual stack without VXLAN for IPv6: the IPv4 leg says why not over IPv6 too
    site = _site(tmp_path, "enable_dual_stack_networks: true")
    recs = {(e["req"], e["af"]): e for e in explain(load_catalog(), site, Selection())}
    assert "not over IPv6: VXLAN for IPv6 is off" in recs[("calico.vxlan", "ipv4")]["why"]
    assert ("calico.vxlan", "ipv6") not in recs


def test_explain_says_why_a_leg_is_ipv4_or_ipv6(tmp_path) -> None:
    from scanner.catalog.loader import load_catalog
    from scanner.plan.planner import count_plan, explain, plan
    from scanner.plan.selection import Selection

    site = _site(
        tmp_path,
        "enable_dual_stack_networks: true\ncalico_wireguard_enabled: true\n"
        "calico_vxlan_mode_ipv6: CrossSubnet",
    )
    cat = load_catalog()
    recs = {(e["req"], e["af"]): e for e in explain(cat, site, Selection())}
    vx6 = recs[("calico.vxlan", "ipv6")]
    assert vx6["included"] and "calico_vxlan_mode_ipv6=CrossSubnet" in vx6["why"]
    assert "no IPv6 address for node3 (set ip6 / access_ip6)" in vx6["why"]  # said, not silent
    assert "enable_dual_stack_networks=true" in recs[("k8s.apiserver", "ipv4")]["why"]
    assert "over IPv6: WireGuard for IPv6" in recs[("calico.wireguard6", "ipv6")]["why"]
    assert "over IPv4: the cluster's main family" in recs[("k8s.apiserver", "ipv4")]["why"]
    # the counts agree with the flows, per family
    assert count_plan(cat, site, Selection()) == sum(1 for _ in plan(cat, site, Selection()))
    assert sum(e["flows"] for e in recs.values()) == count_plan(cat, site, Selection())


# ---- the lab over IPv6: ground truth from nftables faults -----------------------------------------

TCP_UDP_FAULTS = {7001: None, 7002: "reject", 7003: "drop", 7004: "reject-admin"}


def _respond(lab, host: str, secret: str):
    from scanner.responder.server import wait_ready

    p = lab.popen(
        host,
        [sys.executable, "-m", "scanner", "respond", "-p", "T:7001-7004,U:7001-7004",
         "--bind", "::", "--secret", secret, "--ttl", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.PIPE,
    )  # fmt: skip
    ready = wait_ready(p.stdout.readline)
    assert ready["addr"] == "::"
    return p


def test_lab_ground_truth_over_ipv6(make_lab) -> None:
    """Faults on IPv6 only: over IPv6 each protocol shows open, closed, dropped and
    admin-prohibited exactly as the ground truth says; over IPv4 the same ports all pass."""
    from scanner.lab.faults import Fault
    from scanner.lab.truth import expected

    lab = make_lab(hosts=3)
    n1, n2, n3 = lab.hosts
    faults = [
        Fault("node2", "in", proto, ((port, port),), action, family="ipv6")
        for proto in ("tcp", "udp")
        for port, action in TCP_UDP_FAULTS.items()
        if action
    ] + [
        Fault("node2", "in", "icmp", None, "reject-admin", family="ipv6"),
        Fault("node3", "in", "icmp", None, "drop", "node1", family="ipv6"),
    ]
    lab.apply_faults(faults)
    secret = "v6-ground-truth"
    procs = [_respond(lab, h.name, secret) for h in (n2, n3)]
    try:
        cp = lab.run(
            "node1",
            [*SCAN, n2.addr6, n2.addr, n3.addr6, "-p", "T:7001-7004,U:7001-7004", "--icmp",
             "--secret", secret, "--timeout", "0.5"],
            capture_output=True,
            timeout=120,
        )  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    assert cp.returncode == 0, cp.stderr
    lines = [orjson.loads(x) for x in cp.stdout.splitlines()]
    results = lines[1:-1]
    assert len(results) == 3 * 9
    seen = set()
    for r in results:
        src = n1.addr6 if r["af"] == "ipv6" else n1.addr
        flow = Flow(r["dst"], r["port"], r["proto"], None, src)
        want = expected(flow, faults, lab)
        assert (r["state"], r["reason"]) == (want.state, want.reason), (r, want)
        seen.add((r["af"], r["proto"], r["state"], r["reason"]))
    # every kind of answer was seen over IPv6, for each protocol
    assert {
        ("ipv6", "tcp", "open", "responder"),
        ("ipv6", "tcp", "closed", "conn-refused"),
        ("ipv6", "tcp", "filtered", "no-response"),
        ("ipv6", "tcp", "filtered", "admin-prohibited"),
        ("ipv6", "udp", "open", "responder"),
        ("ipv6", "udp", "closed", "port-unreach"),
        ("ipv6", "udp", "open|filtered", "no-response"),
        ("ipv6", "udp", "filtered", "admin-prohibited"),
        ("ipv6", "icmp", "filtered", "no-response"),  # node3 drops echo from node1
        ("ipv6", "icmp", "filtered", "admin-prohibited"),
        ("ipv4", "tcp", "open", "responder"),
        ("ipv4", "udp", "open", "responder"),
        ("ipv4", "icmp", "open", "echo-reply"),
    } <= seen
    # over IPv4 nothing failed: the faults are IPv6 only
    assert all(r["state"] == "open" for r in results if r["af"] == "ipv4")


# ---- a dual-stack mesh with a fault on IPv6 only ------------------------------------------------

LAB_CATALOG_ENTRY = """
[[requirement]]
id = "{id}"
component = "lab"
proto = "{proto}"
ports = "{ports}"
description = "lab {proto}, over both families when VXLAN for IPv6 is on"
dst_role = "node"
src_roles = ["node"]
condition = {{ feature = "vxlan" }}
"""


def test_dual_stack_mesh_and_report_name_an_ipv6_only_fault(make_lab, tmp_path) -> None:
    import yaml

    from scanner.catalog.loader import load_catalog
    from scanner.lab.lab import inventory_doc

    lab = make_lab(hosts=3)
    n1, n2, n3 = lab.hosts
    doc = inventory_doc(
        lab,
        dual_stack_vars={"enable_dual_stack_networks": True, "calico_vxlan_mode_ipv6": "Always"},
    )
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump(doc, sort_keys=False))
    cat = tmp_path / "lab.toml"
    cat.write_text(
        "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
        + LAB_CATALOG_ENTRY.format(id="lab.udp", proto="udp", ports="7100")
        + LAB_CATALOG_ENTRY.format(id="lab.tcp", proto="tcp", ports="7101")
    )
    from scanner.lab.faults import Fault

    lab.apply_faults(
        [
            Fault("node2", "in", "udp", ((7100, 7100),), "drop", "node1", family="ipv6"),
            Fault("node3", "in", "tcp", ((7101, 7101),), "reject-admin", family="ipv6"),
        ]
    )
    out = tmp_path / "mesh.ndjson"
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "mesh", "-i", str(inv), "--catalog", str(cat),
         "--exec", lab.exec_template(), "--agent-cmd", f"{sys.executable} -m scanner agent",
         "--loop", "asyncio", "--timeout", "0.5", "-o", str(out), "--no-progress"],
        capture_output=True, timeout=180,
    )  # fmt: skip
    assert cp.returncode == 1, cp.stderr  # a failure, on IPv6 only
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    _validate(recs)
    results = [r for r in recs if r["type"] == "result"]
    # every requirement went over both families: 3 hosts x 2 directions x 2 reqs x 2 families
    assert len(results) == 24 == recs[-1]["results"]
    assert {(r["af"], ":" in r["dst"], ":" in (r["src"] or ":")) for r in results} == {
        ("ipv4", False, False),
        ("ipv6", True, True),
    }
    bad = {(r["af"], r["req"], r["src_host"], r["host"]) for r in results if r["verdict"] != "pass"}
    assert bad == {
        ("ipv6", "lab.udp", "node1", "node2"),
        ("ipv6", "lab.tcp", "node1", "node3"),
        ("ipv6", "lab.tcp", "node2", "node3"),
    }
    pairs = {(p["req"], p["af"], p["a"], p["b"]): p for p in recs if p["type"] == "pair"}
    assert len(pairs) == 12
    assert pairs[("lab.udp", "ipv6", "node1", "node2")]["verdict"] == "one-way"
    assert "node1 -> node2 over IPv6:" in pairs[("lab.udp", "ipv6", "node1", "node2")]["reason"]
    assert pairs[("lab.udp", "ipv4", "node1", "node2")]["verdict"] == "pass"
    tcp6 = pairs[("lab.tcp", "ipv6", "node1", "node3")]
    assert tcp6["verdict"] == "one-way" and "admin-prohibited" in tcp6["reason"]

    rep = subprocess.run(
        [sys.executable, "-m", "scanner", "report", str(out)], capture_output=True, text=True
    )
    assert rep.returncode == 1, rep.stderr
    fails = [line for line in rep.stdout.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 2 and all(" over IPv6" in line for line in fails), rep.stdout
    assert any(line.startswith("FAIL lab.udp over IPv6") for line in fails)
    # the mesh's own summary (stderr) says the same, with the IPv6 directions counted apart
    live = cp.stderr.decode()
    assert "FAIL lab.udp over IPv6  udp/7100  1 of 6 directions fail" in live, live
    assert "FAIL lab.tcp over IPv6  tcp/7101  2 of 6 directions fail" in live, live
    assert "FAIL lab.udp  " not in live and "WARNING" not in live, live
    # the exports name the family: ip6 rules in the fix, network.type in ECS, the HTML's key
    fix = subprocess.run([sys.executable, "-m", "scanner", "report", str(out), "--fix",
                          "nftables"], capture_output=True, text=True)  # fmt: skip
    rules = [x for x in fix.stdout.splitlines() if "accept comment" in x]
    assert len(rules) == 2 and all("ip6 saddr" in x for x in rules), fix.stdout
    assert any(f"ip6 saddr {{ {n1.addr6} }} udp dport {{ 7100 }}" in x for x in rules)
    ecs = subprocess.run([sys.executable, "-m", "scanner", "report", str(out), "--format", "ecs"],
                         capture_output=True, text=True)  # fmt: skip
    by_type = {}
    for e in map(orjson.loads, ecs.stdout.splitlines()):
        by_type.setdefault(e["network"]["type"], set()).add(e["event"]["outcome"])
    assert by_type == {"ipv4": {"success"}, "ipv6": {"success", "failure"}}
    html = subprocess.run([sys.executable, "-m", "scanner", "report", str(out), "--format",
                           "html"], capture_output=True, text=True)  # fmt: skip
    assert '"key":"lab.tcp over IPv6"' in html.stdout and '"key":"lab.tcp"' in html.stdout


def test_pair_join_keeps_the_families_apart() -> None:
    from scanner.mesh.pairs import PairJoin

    j = PairJoin(["a", "b"])
    for af, (sa, sb) in (
        ("ipv4", ("198.18.0.1", "198.18.0.2")),
        ("ipv6", ("2001:2::1", "2001:2::2")),
    ):
        for src, dst, s, d in (("a", "b", sa, sb), ("b", "a", sb, sa)):
            bad = af == "ipv6" and src == "a"
            j.add({"src_host": src, "host": dst, "src": s, "dst": d, "req": "calico.vxlan",
                   "proto": "udp", "port": 4789, "state": "open|filtered" if bad else "open",
                   "reason": "no-response" if bad else "responder",
                   "verdict": "fail" if bad else "pass"})  # fmt: skip
    got = {p["af"]: (p["verdict"], p.get("reason")) for p in j.pairs()}
    assert got == {
        "ipv4": ("pass", None),
        "ipv6": ("one-way", "a -> b over IPv6: udp/4789 open|filtered (no-response)"),
    }


# ---- the witness over IPv6 ------------------------------------------------------------------------


def test_parse_probe6_reads_tagged_echo_and_udp() -> None:
    from scanner.responder.witness import bpf_program6, parse_probe6

    tag = tags.make_tag(b"k", b"\x07" * 8)
    src, dst = (socket.inet_pton(socket.AF_INET6, a) for a in ("2001:2::1", "2001:2::2"))

    def ip6(nh: int, body: bytes) -> bytes:
        return struct.pack("!IHBB", 6 << 28, len(body), nh, 64) + src + dst + body

    echo = ip6(58, icmp6.echo_request(1, 2, tag))
    udp = ip6(17, struct.pack("!HHHH", 40000, 4789, 8 + 20, 0) + b"vx" + tag)
    assert parse_probe6(echo, b"k") == {
        "type": "witness", "proto": "icmp", "src": "2001:2::1", "dst": "2001:2::2",
        "port": None, "nonce": "07" * 8,
    }  # fmt: skip
    assert parse_probe6(udp, b"k")["port"] == 4789  # type: ignore[index]
    assert parse_probe6(echo, b"other secret") is None
    assert parse_probe6(ip6(6, b"\0" * 40), b"k") is None  # TCP is never witnessed
    prog = bpf_program6([4789])
    assert prog[-1] == (0x06, 0, 0, 0x40000) and prog[-2] == (0x06, 0, 0, 0)


def test_witness_sees_icmpv6_echo_in_the_lab(make_lab) -> None:
    lab = make_lab(hosts=2)
    n1, n2 = lab.hosts
    lab.apply_faults([])  # nothing blocks: the kernel answers, the witness sees it arrive
    p = lab.popen(
        "node2",
        [sys.executable, "-m", "scanner", "respond", "-p", "7200", "--bind", "::", "--secret",
         "k", "--ttl", "30", "--witness"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = orjson.loads(p.stdout.readline())  # type: ignore[union-attr]
        assert ready["witness"] is True and ready["addr"] == "::"
        cp = lab.run(
            "node1",
            [*SCAN, n2.addr6, n2.addr, "--icmp", "-p", "7200", "--secret", "k"],
            capture_output=True,
            timeout=60,
        )
        assert cp.returncode == 0, cp.stderr
        got = {
            (r["af"], r["proto"], r["state"], r["reason"])
            for r in map(orjson.loads, cp.stdout.splitlines()[1:-1])
        }
        assert got == {
            (af, proto, "open", reason)
            for af in ("ipv4", "ipv6")
            for proto, reason in (("icmp", "echo-reply"), ("tcp", "responder"))
        }
    finally:
        p.send_signal(2)
        out, _ = p.communicate(timeout=20)
    wit = [
        orjson.loads(x) for x in out.splitlines() if b'"witness"' in x and b'"type":"witness"' in x
    ]
    assert {(w["proto"], w["src"], w["dst"]) for w in wit} == {
        ("icmp", n1.addr6, n2.addr6),
        ("icmp", n1.addr, n2.addr),
    }


def test_lab_truth_summary_names_the_family(tmp_path) -> None:
    """`lab up` prints what must fail: an IPv6-only fault and an IPv4-only one with the same
    state are two lines, the IPv6 one saying so; a fault on a family the plan does not use
    says why it matches nothing. Pure: a Lab object, no namespaces."""
    import io

    import yaml

    from scanner.lab.faults import Fault
    from scanner.lab.lab import DUAL_STACK_VARS, inventory_doc, truth_summary
    from scanner.lab.netns import Lab, LabHost

    hosts = [LabHost(f"node{i}", f"x-node{i}", f"198.18.9.{i}", f"2001:2:0:9::{i}")
             for i in (1, 2, 3)]  # fmt: skip
    lab = Lab("x", hosts, "198.18.9.0/24")
    inv = tmp_path / "inventory.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab, dual_stack_vars=DUAL_STACK_VARS)))
    faults = [
        Fault("node2", "in", "udp", ((4789, 4789),), "reject-admin", "node1", family="ipv6"),
        Fault("node2", "in", "udp", ((4789, 4789),), "reject-admin", "node1", family="ipv4"),
        Fault("node3", "in", "tcp", ((10250, 10250),), "drop", family="ipv6"),
    ]
    out = io.StringIO()
    unmatched = truth_summary(lab, inv, faults, out, False, "responder")
    text = out.getvalue()
    assert "  fail node1 -> node2 udp/4789: filtered (admin-prohibited)\n" in text
    assert "  fail node1 -> node2 udp/4789 over IPv6: filtered (admin-prohibited)\n" in text
    # the kubelet goes over the cluster's main family (IPv4): the IPv6 fault touches nothing
    assert [(f.proto, hint) for f, hint in unmatched] == [
        ("tcp", " (the plan has no tcp flows over IPv6: `portmesh plan --explain` says which "
         "requirements go over which family)")
    ]  # fmt: skip


def test_plan_tables_of_a_dual_stack_inventory_are_aligned(tmp_path) -> None:
    """The flow table's address column fits the IPv6 addresses; the explain table has an AF
    column, so the two calico.vxlan rows (IPv4, IPv6) tell themselves apart."""
    from tests.test_cli_plan import _columns_aligned

    p = tmp_path / "hosts.yml"
    p.write_text(DUAL.replace('"2001:2::1"', '"2001:2:0:1b2:ffff:ffff:ffff:1"')
                 + "    enable_dual_stack_networks: true\n    calico_vxlan_mode_ipv6: Always\n")  # fmt: skip
    t = subprocess.run([sys.executable, "-m", "scanner", "plan", "-i", str(p), "--format", "table",
                        "--nodeport-sample", "1"], capture_output=True, text=True)  # fmt: skip
    assert t.returncode == 0, t.stderr
    body = t.stdout.split("\n", 1)[1]  # after the "# plan: ..." line
    assert "2001:2:0:1b2:ffff:ffff:ffff:1" in body
    _columns_aligned(body, 7)
    e = subprocess.run([sys.executable, "-m", "scanner", "plan", "-i", str(p), "--explain",
                        "--format", "table"], capture_output=True, text=True)  # fmt: skip
    _columns_aligned(e.stdout, 6)
    vx = [ln.split()[:3] for ln in e.stdout.splitlines() if ln.startswith("calico.vxlan ")]
    assert sorted(vx) == [["calico.vxlan", "hosts", "ipv4"], ["calico.vxlan", "hosts", "ipv6"]]
