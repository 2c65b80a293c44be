"""Raw SYN over IPv6 (probes/syn6.py) and who sent an ICMP(v6) error (probes/classify.attribute).

Pure: the SYN template, the BPF program's shape, attribute(). Loopback (root): the kernel fills
the checksum over the IPv6 pseudo-header (scapy checks it), and ``scan --method syn`` on ::1
agrees with ``nmap -6 -sS`` port by port. Lab (root): over IPv6, TCP by raw SYN and by connect
and UDP, against nftables faults whose ground truth is known: open, closed, dropped, rejected
with admin-prohibited at the destination (the far end's ICMPv6 error: ``admin-prohibited``) and
at the source's output chain (this host's own: ``local-prohibited``), with nmap
-6 -sS from the same host as the oracle for the remote answers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import orjson
import pytest

from scanner.probes import classify, syn, syn6
from scanner.probes.base import Outcome, ProbeOptions

SCAN = [sys.executable, "-m", "scanner", "scan", "--no-progress"]
root = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")
needs_nmap = pytest.mark.skipif(shutil.which("nmap") is None, reason="needs nmap (the oracle)")


# ---- pure -------------------------------------------------------------------------------------


def test_syn6_template_fields() -> None:
    from scapy.layers.inet import TCP

    t = TCP(syn6.syn6_packet(61001, 443, 0xDEADBEEF))
    assert (t.sport, t.dport, t.seq, t.ack, t.flags, t.dataofs) == (61001, 443, 0xDEADBEEF, 0, "S", 6)
    assert t.chksum == 0  # the kernel fills it (IPV6_CHECKSUM)
    assert dict(t.options)["MSS"] == syn6.MSS6 == 1440


def test_bpf_programs_for_both_families() -> None:
    from scanner.probes.syn import bpf_port_range

    v4, v6 = bpf_port_range(61000, 65535), bpf_port_range(61000, 65535, ipv6=True)
    assert len(v4) == 10 * 8 and len(v6) == 9 * 8  # IPv6: no IP header length to load
    assert v4[8:] != v6  # absolute loads, not indexed ones


@pytest.mark.parametrize(
    ("offender", "dst", "local", "want"),
    [
        (None, "2001:2::2", False, ("filtered", "admin-prohibited", None)),
        ("2001:2::2", "2001:2::2", False, ("filtered", "admin-prohibited", None)),
        # another spelling of the destination is still the destination
        ("2001:2::2", "2001:2:0:0::2", False, ("filtered", "admin-prohibited", None)),
        # a router on the way
        ("2001:2::fe", "2001:2::2", False, ("filtered", "admin-prohibited", "2001:2::fe")),
        # this host's own output chain: local, whatever the code says
        ("2001:2::1", "2001:2::2", True, ("filtered", "local-prohibited", "2001:2::1")),
        ("198.18.0.1", "198.18.0.2", True, ("filtered", "local-prohibited", "198.18.0.1")),
    ],
)
def test_attribute_says_who_sent_the_error(
    offender: str | None, dst: str, local: bool, want: tuple
) -> None:
    out = classify.attribute(Outcome("filtered", "admin-prohibited", 1.0), offender, dst, local)
    assert (out.state, out.reason, (out.extra or {}).get("icmp_from")) == want
    assert out.rtt_ms == 1.0


@pytest.mark.parametrize("reason", ["host-unreach", "net-unreach"])
def test_this_hosts_own_delivery_failure_is_not_a_reject(reason: str) -> None:
    """This host's stack says host-unreach when ARP/NDP failed (a full neighbour table): no
    firewall refused it, and the neighbour guard must see the reason to retry or say unknown
    (a CI run found flows failed as local-prohibited with gc_thresh3 lowered)."""
    out = classify.attribute(Outcome("filtered", reason, 1.0), "198.18.0.1", "198.18.0.5", True)
    assert (out.state, out.reason, (out.extra or {}).get("icmp_from")) == (
        "filtered", reason, "198.18.0.1"
    )


@pytest.mark.parametrize("dst", ["198.18.0.2", "2001:2::2"])
def test_a_routers_port_unreachable_is_filtered_not_closed(dst: str) -> None:
    """nmap's rule: a port-unreachable from a host other than the target is a filter on the
    way (iptables REJECT's default), not the port; a closed UDP port would pass a bare check."""
    router = "198.18.0.254" if "." in dst else "2001:2::fe"
    out = classify.attribute(Outcome("closed", "port-unreach", 1.0), router, dst, False)
    want = ("filtered", "port-unreach", router)
    assert (out.state, out.reason, (out.extra or {}).get("icmp_from")) == want
    same = classify.attribute(Outcome("closed", "port-unreach", 1.0), dst, dst, False)
    assert (same.state, same.extra) == ("closed", None)


def test_local_address() -> None:
    from scanner.probes.base import local_address

    assert local_address("127.0.0.1") and local_address("::1")
    assert not local_address("192.0.2.1")  # TEST-NET-1: never ours (no packet is sent)


# ---- loopback (root) ----------------------------------------------------------------------------


@pytest.fixture
def v6_listener() -> Iterator[tuple[int, int]]:
    """(open, closed) TCP ports on ::1."""
    srv = socket.create_server(("::1", 0), family=socket.AF_INET6, backlog=64)
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::1", 0))
    closed = s.getsockname()[1]
    s.close()
    yield srv.getsockname()[1], closed
    srv.close()


@root
def test_kernel_fills_the_checksum_over_the_ipv6_pseudo_header(v6_listener) -> None:
    """What syn6 sends, read back by a second raw socket: scapy recomputes the checksum over
    the IPv6 pseudo-header and gets the one the kernel wrote."""
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6

    _, closed = v6_listener
    rx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    tx.setsockopt(socket.IPPROTO_IPV6, syn6.IPV6_CHECKSUM, syn6.CSUM_OFFSET)
    try:
        tx.sendto(syn6.syn6_packet(61234, closed, 12345), ("::1", 0))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            data, _ = rx.recvfrom(256)
            t = TCP(data)
            if (t.sport, t.dport, t.flags) == (61234, closed, "S"):
                break
        else:
            pytest.fail("our SYN was not seen")
    finally:
        rx.close()
        tx.close()
    fresh = TCP(data)
    del fresh.chksum  # scapy computes it over the IPv6 pseudo-header when building
    want = TCP(bytes(IPv6(src="::1", dst="::1") / fresh)[40:]).chksum
    assert t.chksum == want != 0


@root
def test_the_ipv6_filter_passes_only_answers_to_our_ports(v6_listener) -> None:
    """The BPF program on a raw IPv6 socket: the RST to our source port passes, our own SYN
    (to the far port, seen on loopback) does not."""
    from scanner.probes.syn import _attach_filter, bpf_port_range

    _, closed = v6_listener
    rx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    rx.settimeout(1)
    _attach_filter(rx, bpf_port_range(61000, 61999, ipv6=True))  # raises if the kernel refuses
    tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    tx.setsockopt(socket.IPPROTO_IPV6, syn6.IPV6_CHECKSUM, syn6.CSUM_OFFSET)
    seen = []
    try:
        tx.sendto(syn6.syn6_packet(61234, closed, 777), ("::1", 0))
        try:
            while True:
                data, _ = rx.recvfrom(256)
                seen.append((int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big"), data[13]))
        except TimeoutError:
            pass
    finally:
        rx.close()
        tx.close()
    assert seen == [(closed, 61234, 0x14)]  # RST+ACK only


def _nmap6(target: str, ports: str, argv_prefix: list[str] | None = None, run=None) -> dict:
    """port -> (state, reason) from nmap -6 -sS (XML)."""
    argv = [*(argv_prefix or []), "nmap", "-6", "-sS", "-n", "-Pn", "--reason", "-T4",
            "--max-retries", "1", "--max-rtt-timeout", "400ms", "-p", ports, "-oX", "-", target]  # fmt: skip
    cp = subprocess.run(argv, capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    out = {}
    for port in ET.fromstring(cp.stdout).iter("port"):
        st = port.find("state")
        assert st is not None
        out[int(port.get("portid", 0))] = (st.get("state"), st.get("reason"))
    return out


@root
@needs_nmap
def test_syn6_agrees_with_nmap_on_loopback(v6_listener) -> None:
    op, cl = v6_listener
    cp = subprocess.run(
        [*SCAN, "::1", "-p", f"{op},{cl}", "--method", "syn", "--retries", "1"],
        capture_output=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    lines = [orjson.loads(x) for x in cp.stdout.splitlines()]
    got = {r["port"]: (r["state"], r["reason"]) for r in lines[1:-1]}
    assert got == {op: ("open", "syn-ack"), cl: ("closed", "reset")}
    assert got == _nmap6("::1", f"{op},{cl}")
    assert all(r["tcp_method"] == "syn" for r in lines[1:-1])
    assert lines[-1]["tcp_methods"] == {"ipv6": "syn"} and lines[-1]["tcp_method"] == "syn"


# ---- the lab: ground truth from nftables faults -------------------------------------------------

# TCP: 7101 open, 7102 reject (RST), 7103 drop, 7104 reject-admin at node2, 7105 reject-admin in
# node1's output chain. UDP: 7102 reject (port unreachable), 7104 at node2, 7105 in node1's output.
LISTEN = """
import socket, sys, time
ss = [socket.create_server(("::", p), family=socket.AF_INET6, dualstack_ipv6=True)
      for p in (7101, 7102, 7103, 7104, 7105)]
print("ready", flush=True)
time.sleep(120)
"""

WANT_TCP = {
    7101: ("open", "syn-ack"),
    7103: ("filtered", "no-response"),
    7104: ("filtered", "admin-prohibited"),  # the far end's ICMPv6 type 1 code 1
    7105: ("filtered", "local-prohibited"),  # our own output chain's reject
}
WANT_UDP = {
    7102: ("closed", "port-unreach"),
    7104: ("filtered", "admin-prohibited"),
    7105: ("filtered", "local-prohibited"),  # refused before it left: the send fails (EPERM)
}


@pytest.fixture(scope="module")
def reject_lab(module_lab):
    from scanner.lab.faults import Fault

    lab = module_lab(hosts=2)
    for h in lab.hosts:  # every reject answers every probe (no ICMPv6 error rate limit)
        lab.run(h.name, ["sh", "-c", "echo 0 > /proc/sys/net/ipv6/icmp/ratelimit"], check=True)
    lab.apply_faults(
        [
            Fault("node2", "in", proto, ((port, port),), action, family="ipv6")
            for proto, port, action in (
                ("tcp", 7102, "reject"),
                ("tcp", 7103, "drop"),
                ("tcp", 7104, "reject-admin"),
                ("udp", 7102, "reject"),
                ("udp", 7104, "reject-admin"),
            )
        ]
        + [
            Fault("node1", "out", proto, ((7105, 7105),), "reject-admin", family="ipv6")
            for proto in ("tcp", "udp")
        ]
    )
    p = lab.popen("node2", [sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    yield lab
    p.kill()
    p.wait()


@pytest.mark.lab
@pytest.mark.parametrize("method", ["syn", "connect"])
def test_ipv6_local_and_remote_rejects_are_told_apart(reject_lab, method: str) -> None:
    lab = reject_lab
    n1, n2 = lab.hosts
    cp = lab.run(
        "node1",
        [*SCAN, n2.addr6, "-p", "T:7101-7105,U:7102,7104,7105", "--method", method,
         "--timeout", "0.4", "--retries", "1"],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    lines = [orjson.loads(x) for x in cp.stdout.splitlines()]
    res = lines[1:-1]
    tcp = {r["port"]: (r["state"], r["reason"]) for r in res if r["proto"] == "tcp"}
    udp = {r["port"]: (r["state"], r["reason"]) for r in res if r["proto"] == "udp"}
    closed = ("closed", "reset" if method == "syn" else "conn-refused")
    assert tcp == {**WANT_TCP, 7102: closed}
    assert udp == WANT_UDP
    by = {(r["proto"], r["port"]): r for r in res}
    # the local reject: a raw SYN's send fails (EPERM), a connect() gets the ICMPv6 error
    # this host sent itself, which names its sender; the remote one is the destination itself
    # (no icmp_from)
    assert by[("tcp", 7105)].get("icmp_from") == (None if method == "syn" else n1.addr6)
    assert "icmp_from" not in by[("tcp", 7104)] and "icmp_from" not in by[("udp", 7104)]
    assert all(r["tcp_method"] == method for r in res if r["proto"] == "tcp")
    assert lines[-1]["tcp_methods"] == {"ipv6": method}
    if method == "syn" and shutil.which("nmap"):
        # the oracle, from the same host: every answer from the far end, state and reason
        nm = _nmap6(n2.addr6, "7101-7104", lab.netns_argv("node1"))
        assert nm == {p: tcp[p] for p in (7101, 7102, 7103, 7104)}


@pytest.mark.parametrize(
    ("code", "offender", "want"),
    [
        # the destination itself refuses: the state as it is, no icmp_from
        (13, "198.18.7.2", ("filtered", "admin-prohibited", None)),
        # a router on the way: its name said (nmap: "admin-prohibited from <router>")
        (13, "198.18.7.254", ("filtered", "admin-prohibited", "198.18.7.254")),
        # a router's port-unreachable is a filter, never the port closed
        (3, "198.18.7.254", ("filtered", "port-unreach", "198.18.7.254")),
    ],
)
def test_ipv4_syn_says_which_router_sent_the_icmp_error(code: int, offender: str, want) -> None:
    """IPv4 raw SYN names the sender of an ICMP error as connect and IPv6 SYN do."""

    async def go():
        loop = asyncio.get_running_loop()
        p = syn.SynProber(ProbeOptions())
        dst, dport, sport = "198.18.7.2", 2380, 40001
        fut = loop.create_future()
        p._pending[(dst, dport, sport)] = (fut, 0.0, syn.cookie(dst, dport, sport))
        tcp = struct.pack("!HHI", sport, dport, syn.cookie(dst, dport, sport)) + bytes(12)
        quoted = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
            socket.inet_aton("198.18.7.1"), socket.inet_aton(dst),
        ) + tcp  # fmt: skip
        icmp = struct.pack("!BBHI", 3, code, 0, 0) + quoted
        outer = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, socket.IPPROTO_ICMP, 0,
            socket.inet_aton(offender), socket.inet_aton("198.18.7.1"),
        )  # fmt: skip
        p._on_icmp(outer + icmp, 20, 0.0)
        return await asyncio.wait_for(fut, 1)

    o = asyncio.run(go())
    assert (o.state, o.reason, (o.extra or {}).get("icmp_from")) == want
