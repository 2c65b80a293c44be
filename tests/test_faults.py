"""Fault files, nftables rulesets, the ground truth, and that the kernel agrees with it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.core.flows import Flow
from scanner.errors import InputError
from scanner.lab import conntrack
from scanner.lab.faults import (
    Fault,
    check_hosts,
    fault_doc,
    load_fault_file,
    load_faults,
    parse_fault_doc,
    parse_fault_ports,
    random_faults,
)
from scanner.lab.nft import nft_ruleset
from scanner.lab.truth import Expected, expected, ground_truth, hit

ADDRS = {"node1": "198.18.7.1", "node2": "198.18.7.2", "node3": "198.18.7.3"}

# ---- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (None, None),
        ("2380", ((2380, 2380),)),
        (2380, ((2380, 2380),)),
        ("30000-30100", ((30000, 30100),)),
        ("2379,2380", ((2379, 2379), (2380, 2380))),
        ([2379, "30000-30001"], ((2379, 2379), (30000, 30001))),
        ("1-65535", ((1, 65535),)),
    ],
)
def test_parse_fault_ports(value: object, want: object) -> None:
    assert parse_fault_ports(value, "f: fault #1") == want


@pytest.mark.parametrize("value", ["0", "65536", "abc", "10-5", "1-2-3", "", True, {"a": 1}, 1.5])
def test_parse_fault_ports_rejects(value: object) -> None:
    with pytest.raises(InputError, match=r"f: fault #1: field 'ports'"):
        parse_fault_ports(value, "f: fault #1")


def test_load_a_documented_fault_file(tmp_path: Path) -> None:
    p = tmp_path / "faults.yml"
    p.write_text(
        textwrap.dedent(
            """\
            roles:
              node1: [control_plane, etcd]
            faults:
              - host: node2
                direction: in
                proto: tcp
                ports: "2380"
                action: drop
                from: node3
              - {host: node1, direction: out, proto: udp, ports: 4789, action: reject, to: node2}
              - {host: node3, direction: in, proto: icmp, action: reject-admin}
              - {host: node3, direction: in, proto: ipip, action: drop, comment: no tunnels}
            """
        )
    )
    ff = load_fault_file(str(p))
    assert ff.roles == {"node1": ("control_plane", "etcd")}
    assert list(ff.faults) == load_faults(str(p))
    assert ff.faults == (
        Fault("node2", "in", "tcp", ((2380, 2380),), "drop", "node3"),
        Fault("node1", "out", "udp", ((4789, 4789),), "reject", "node2"),
        Fault("node3", "in", "icmp", None, "reject-admin"),
        Fault("node3", "in", "ipip", None, "drop", None, "no tunnels"),
    )
    # round trip through the document form
    assert parse_fault_doc(fault_doc(ff.faults)).faults == tuple(
        Fault(f.host, f.direction, f.proto, f.ports, f.action, f.peer, f.comment) for f in ff.faults
    )


def test_a_bare_list_and_an_empty_file_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "f.yml"
    p.write_text("- {host: node1, direction: in, proto: tcp, action: drop}\n")
    assert load_faults(str(p)) == [Fault("node1", "in", "tcp", None, "drop")]
    p.write_text("")
    assert load_faults(str(p)) == []


GOOD = {"host": "node2", "direction": "in", "proto": "tcp", "ports": "2380", "action": "drop"}


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"host": None}, "field 'host' is missing"),
        ({"direction": "sideways"}, "field 'direction': 'sideways' is not one of in, out"),
        ({"direction": None}, "field 'direction' is missing"),
        ({"proto": "sctp"}, "field 'proto': 'sctp'"),
        ({"action": "accept"}, "field 'action': 'accept'"),
        ({"ports": "99999"}, "field 'ports'"),
        ({"proto": "icmp"}, "field 'ports': icmp has no ports"),
        ({"proto": "ipip", "ports": None, "action": "reject"}, "reject is not supported for ipip"),
        ({"to": "node1"}, "field 'to' does not apply to direction in"),
        ({"direction": "out", "from": "node1"}, "field 'from' does not apply to direction out"),
        ({"from": "node2"}, "cannot be its own peer"),
        ({"from": 7}, "field 'from': expected a lab host name"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_bad_fault_entries_name_file_entry_and_field(change: dict, msg: str) -> None:
    entry = {**GOOD, **change}
    entry = {k: v for k, v in entry.items() if v is not None or k == "ports"}
    doc = {"faults": [GOOD, entry]}
    with pytest.raises(InputError) as ei:
        parse_fault_doc(doc, "lab.yml")
    text = str(ei.value)
    assert text.startswith("lab.yml: fault #2: ")
    assert msg in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("doc", "msg"),
    [
        ({"faults": "x"}, "'faults' must be a list"),
        ({"fault": []}, "unknown top-level key 'fault'"),
        ({"roles": ["x"]}, "'roles' must map"),
        ({"roles": {"node1": [1]}}, "roles of 'node1'"),
        (["not a mapping"], "fault #1: expected a mapping"),
        (42, "'faults' must be a list"),
    ],
)
def test_bad_fault_documents(doc: object, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        parse_fault_doc(doc, "lab.yml")


def test_bad_yaml_and_missing_file_are_input_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text("faults: [ {host: node1\n")
    with pytest.raises(InputError, match=r"bad.yml line \d+"):
        load_faults(str(p))
    with pytest.raises(InputError, match="cannot read fault file"):
        load_faults(str(tmp_path / "missing.yml"))
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError):
        load_faults(str(p))


def test_check_hosts_names_the_unknown_host() -> None:
    faults = [
        Fault("node1", "in", "tcp", None, "drop"),
        Fault("node2", "out", "tcp", None, "drop", "node9"),
    ]
    with pytest.raises(InputError, match=r"fault #2: field 'to': 'node9' is not a lab host"):
        check_hosts(faults, ["node1", "node2"], "f.yml")
    check_hosts(faults[:1], ["node1"])


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=5),
        max_leaves=12,
    )
)
def test_garbage_documents_raise_input_error_or_parse(doc: object) -> None:
    try:
        parse_fault_doc(doc, "g.yml")
    except InputError as e:
        assert "\n" not in str(e)


# ---- nftables text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "rule"),
    [
        (
            Fault("node2", "in", "tcp", ((2380, 2380),), "drop", "node3"),
            "ct state new ip saddr 198.18.7.3 tcp dport { 2380 } drop",
        ),
        (
            Fault("node2", "in", "tcp", ((30000, 30100),), "reject"),
            "ct state new tcp dport { 30000-30100 } reject with tcp reset",
        ),
        (
            Fault("node1", "out", "udp", ((4789, 4789), (8472, 8472)), "reject", "node2"),
            "ct state new ip daddr 198.18.7.2 udp dport { 4789, 8472 } reject with icmpx type port-unreachable",
        ),
        (
            Fault("node1", "in", "udp", None, "reject-admin"),
            "ct state new meta l4proto udp reject with icmpx type admin-prohibited",
        ),
        (
            Fault("node1", "in", "icmp", None, "reject"),
            "ct state new icmp type echo-request reject with icmpx type port-unreachable",
        ),
        (Fault("node1", "out", "ipip", None, "drop"), "ip protocol 4 drop"),
    ],
)
def test_nft_rules(fault: Fault, rule: str) -> None:
    text = nft_ruleset([fault], ADDRS)
    chain = "input" if fault.direction == "in" else "output"
    body = text.split(f"chain {chain} {{", 1)[1].split("}\n", 1)[0]
    assert rule + ' comment "portmesh fault 1"' in body
    other = text.split(f"chain {'output' if chain == 'input' else 'input'} {{", 1)[1]
    assert "ct state" not in other.split("}\n", 1)[0]
    assert text.startswith("table inet portmesh {}\ndelete table inet portmesh\n")


def test_nft_ruleset_keeps_file_order() -> None:
    a = Fault("node1", "in", "tcp", ((1, 1),), "drop")
    b = Fault("node1", "in", "tcp", ((1, 1),), "reject")
    text = nft_ruleset([a, b], ADDRS)
    assert text.index("drop") < text.index("reject with tcp reset")


# ---- ground truth ---------------------------------------------------------------------------

F12 = Flow("198.18.7.2", 2380, "tcp", src="198.18.7.1")  # node1 -> node2 tcp/2380
U12 = Flow("198.18.7.2", 4789, "udp", src="198.18.7.1")
I12 = Flow("198.18.7.2", None, "icmp", src="198.18.7.1")
P12 = Flow("198.18.7.2", None, "ipip", src="198.18.7.1")


def fault(**kw: object) -> Fault:
    base = {"host": "node2", "direction": "in", "proto": "tcp", "ports": None, "action": "drop"}
    base.update(kw)
    return Fault(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flow", "faults", "want"),
    [
        # nothing injected: responders answer
        (F12, [], ("open", "pass", "responder")),
        (U12, [], ("open", "pass", "responder")),
        (I12, [], ("open", "pass", "echo-reply")),
        (P12, [], ("closed", "pass", "proto-unreach")),
        # inbound at the destination
        (F12, [fault()], ("filtered", "fail", "no-response")),
        (F12, [fault(action="reject")], ("closed", "fail", "conn-refused")),
        (F12, [fault(action="reject-admin")], ("filtered", "fail", "admin-prohibited")),
        (U12, [fault(proto="udp")], ("open|filtered", "fail", "no-response")),
        (U12, [fault(proto="udp", action="reject")], ("closed", "fail", "port-unreach")),
        (
            U12,
            [fault(proto="udp", action="reject-admin")],
            ("filtered", "fail", "admin-prohibited"),
        ),
        (I12, [fault(proto="icmp")], ("filtered", "fail", "no-response")),
        (I12, [fault(proto="icmp", action="reject")], ("filtered", "fail", "port-unreach")),
        (P12, [fault(proto="ipip")], ("open|filtered", "fail", "no-response")),
        (
            P12,
            [fault(proto="ipip", action="reject-admin")],
            ("filtered", "fail", "admin-prohibited"),
        ),
        # outbound at the source
        (F12, [fault(host="node1", direction="out")], ("filtered", "fail", "no-response")),
        (
            F12,
            [fault(host="node1", direction="out", action="reject")],
            ("closed", "fail", "conn-refused"),
        ),
        (
            U12,
            [fault(host="node1", direction="out", proto="udp")],
            ("filtered", "fail", "local-prohibited"),
        ),
        (
            I12,
            [fault(host="node1", direction="out", proto="icmp")],
            ("filtered", "fail", "local-prohibited"),
        ),
        # faults that do not apply to this flow
        (F12, [fault(ports=((2379, 2379),))], ("open", "pass", "responder")),
        (F12, [fault(ports=((2300, 2400),))], ("filtered", "fail", "no-response")),
        (F12, [fault(peer="node3")], ("open", "pass", "responder")),
        (F12, [fault(peer="node1")], ("filtered", "fail", "no-response")),
        (F12, [fault(proto="udp")], ("open", "pass", "responder")),
        (F12, [fault(host="node1")], ("open", "pass", "responder")),  # node1 inbound: not this way
        (
            F12,
            [fault(direction="out")],
            ("open", "pass", "responder"),
        ),  # node2 outbound: reply path
        (F12, [fault(host="node1", direction="out", peer="node3")], ("open", "pass", "responder")),
        (I12, [fault(proto="icmp", host="node3")], ("open", "pass", "echo-reply")),
        # the first matching rule wins; the source's output chain comes first
        (F12, [fault(action="reject"), fault()], ("closed", "fail", "conn-refused")),
        (
            F12,
            [fault(), fault(host="node1", direction="out", action="reject-admin")],
            ("filtered", "fail", "admin-prohibited"),
        ),
    ],
)
def test_expected_table(flow: Flow, faults: list[Fault], want: tuple[str, str, str]) -> None:
    got = expected(flow, faults, ADDRS)
    assert (got.state, got.verdict, got.reason) == want
    assert got == want
    state, verdict = got  # unpacks as a pair
    assert (state, verdict) == want[:2]
    assert (got.fault is None) == (verdict == "pass")


@pytest.mark.parametrize(
    ("flow", "faults", "want"),
    [
        (F12, [], ("closed", "pass")),
        (U12, [], ("closed", "pass")),
        (I12, [], ("open", "pass")),
        (F12, [fault(action="reject")], ("closed", "pass")),  # indistinguishable without responder
        (F12, [fault()], ("filtered", "fail")),
        (U12, [fault(proto="udp", action="reject-admin")], ("filtered", "fail")),
        (U12, [fault(proto="udp")], ("open|filtered", "unknown")),
        (P12, [fault(proto="ipip")], ("open|filtered", "fail")),
    ],
)
def test_expected_bare_mode(flow: Flow, faults: list[Fault], want: tuple[str, str]) -> None:
    assert tuple(expected(flow, faults, ADDRS, mode="bare")) == want


def test_expected_uses_flow_names_without_a_lab() -> None:
    fl = Flow("x", 2380, "tcp", host="node2", src="y", src_host="node1")
    assert expected(fl, [fault(peer="node1")]) == ("filtered", "fail")
    # a source that is not a lab host (the root namespace): peer faults never match it
    root = Flow("198.18.7.2", 2380, "tcp", src="198.18.7.254")
    assert expected(root, [fault(peer="node1")], ADDRS) == ("open", "pass")
    assert expected(root, [fault()], ADDRS) == ("filtered", "fail")


def test_ground_truth_is_lazy_and_complete() -> None:
    flows = (Flow("198.18.7.2", p, "tcp", src="198.18.7.1") for p in range(2378, 2382))
    got = list(ground_truth(flows, [fault(ports=((2380, 2380),))], ADDRS))
    assert [e.verdict for _, e in got] == ["pass", "pass", "fail", "pass"]
    assert hit(got[2][0], [fault(ports=((2380, 2380),))], ADDRS) is not None


def test_expected_repr_and_hash() -> None:
    e = expected(F12, [fault()], ADDRS)
    assert "node2 in tcp: drop" in repr(e)
    assert isinstance(e, Expected) and hash(e) == hash(Expected("filtered", "fail", "no-response"))


@pytest.mark.parametrize("seed", range(8))
def test_random_faults_are_reproducible_and_valid(seed: int) -> None:
    hosts = ["node1", "node2", "node3"]
    a = random_faults(hosts, seed, 12)
    assert a == random_faults(hosts, seed, 12)
    assert len(a) == 12
    check_hosts(a, hosts)
    # every generated fault survives the file format
    assert parse_fault_doc(fault_doc(a)).faults == tuple(a)
    assert all(f.peer != f.host for f in a)
    assert not any(f.proto == "ipip" and f.action == "reject" for f in a)


def test_random_faults_differ_by_seed() -> None:
    assert random_faults(["a", "b"], 1, 10) != random_faults(["a", "b"], 2, 10)


# ---- the kernel agrees: plain sockets against real nftables rules in the lab ------------------

SERVER = r"""
import socket, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 2380)); t.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 4789))
def tcp():
    while True:
        c, _ = t.accept(); c.sendall(b"token"); c.close()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
while True:
    d, a = u.recvfrom(2048); u.sendto(d[:8], a)
"""

# A minimal prober with plain sockets: maps what the kernel reports to nmap's state words.
PROBER = r"""
import errno, json, os, select, socket, struct, sys, time
dst, proto, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
def echo(ident):
    h = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"PMv1probe"
    return h[:2] + struct.pack("!H", csum(h)) + h[4:]
def err(e):
    return {errno.ECONNREFUSED: ("closed", "conn-refused" if proto == "tcp" else "port-unreach"),
            errno.EHOSTUNREACH: ("filtered", "admin-prohibited"),
            errno.EPERM: ("filtered", "local-prohibited")}.get(e.errno, ("error", str(e)))
def icmp_wait(r, want_echo):
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if not select.select([r], [], [], left)[0]: break
        d = r.recv(4096); ihl = (d[0] & 15) * 4; t, c = d[ihl], d[ihl + 1]
        if want_echo and t == 0 and struct.unpack("!H", d[ihl + 4:ihl + 6])[0] == os.getpid() & 0xFFFF:
            return ("open", "echo-reply")
        if t == 3 and socket.inet_ntoa(d[ihl + 8 + 16:ihl + 8 + 20]) == dst:
            return {2: ("closed", "proto-unreach"), 3: ("filtered", "port-unreach"),
                    13: ("filtered", "admin-prohibited")}.get(c, ("filtered", "unreach-%d" % c))
    return ("filtered" if want_echo else "open|filtered", "no-response")
try:
    if proto == "tcp":
        s = socket.socket(); s.settimeout(timeout)
        try:
            s.connect((dst, port)); out = ("open", "responder" if s.recv(16) == b"token" else "syn-ack")
        except socket.timeout: out = ("filtered", "no-response")
        except OSError as e: out = err(e)
    elif proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout); s.connect((dst, port))
        try:
            s.send(b"PMv1-probe-bytes"); s.recv(64); out = ("open", "responder")
        except socket.timeout: out = ("open|filtered", "no-response")
        except OSError as e: out = err(e)
    else:
        r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        if proto == "icmp":
            pkt, s = echo(os.getpid() & 0xFFFF), r
        else:
            inner = echo(1)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(inner), 1, 0, 64, 1, 0,
                             socket.inet_aton("10.99.0.1"), socket.inet_aton("10.99.0.2"))
            ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
            pkt, s = ip + inner, socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
        try:
            s.sendto(pkt, (dst, 0)); out = icmp_wait(r, proto == "icmp")
        except OSError as e:
            out = err(e)
except Exception as e:
    out = ("error", repr(e))
print(json.dumps(out))
"""

PORT = {"tcp": 2380, "udp": 4789, "icmp": 0, "ipip": 0}
CASES = [
    (d, p, a)
    for d in ("in", "out")
    for p in ("tcp", "udp", "icmp", "ipip")
    for a in ("none", "drop", "reject", "reject-admin")
    if not (p == "ipip" and a == "reject")
]


@pytest.fixture(scope="module")
def fault_lab(module_lab):
    lab = module_lab(hosts=3)
    for h in lab.hosts:
        # no ICMP error rate limit: 30 cases send protocol/port-unreachables to the same peer
        # within a second, and the default bucket (6, then 1/s) turned one into silence in CI
        lab.run(h.name, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit"], check=True)
    srv = lab.popen("node2", [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    yield lab
    srv.kill()
    srv.wait()


def _probe(lab, src: str, dst: str, proto: str, timeout: float = 1.0) -> tuple[str, str]:
    cp = lab.run(
        src,
        [sys.executable, "-c", PROBER, lab.host(dst).addr, proto, str(PORT[proto]), str(timeout)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert cp.returncode == 0, cp.stderr
    return tuple(json.loads(cp.stdout))


def _apply(lab, faults: list[Fault]) -> None:
    lab.apply_faults(faults)


@pytest.mark.lab
@pytest.mark.parametrize(("direction", "proto", "action"), CASES)
def test_kernel_behaviour_equals_the_ground_truth(
    fault_lab, direction: str, proto: str, action: str
) -> None:
    lab = fault_lab
    ports = ((PORT[proto], PORT[proto]),) if proto in ("tcp", "udp") else None
    host = "node2" if direction == "in" else "node1"
    faults = [] if action == "none" else [Fault(host, direction, proto, ports, action)]
    _apply(lab, faults)
    flow = Flow(lab.host("node2").addr, PORT[proto] or None, proto, src=lab.host("node1").addr)
    want = expected(flow, faults, lab)
    got = _probe(lab, "node1", "node2", proto)
    assert got == (want.state, want.reason), f"{faults} -> kernel {got}, ground truth {want}"
    if action != "none":
        # a flow into node1 (no listener there: mode "bare") is only hit by node1's inbound faults
        back = Flow(lab.host("node1").addr, PORT[proto] or None, proto, src=lab.host("node3").addr)
        want_back = expected(back, faults, lab, mode="bare")
        assert _probe(lab, "node3", "node1", proto) == (want_back.state, want_back.reason)


@pytest.mark.lab
def test_peer_faults_are_one_way(fault_lab) -> None:
    lab = fault_lab
    faults = [Fault("node2", "in", "tcp", ((2380, 2380),), "reject-admin", "node3")]
    _apply(lab, faults)
    assert _probe(lab, "node3", "node2", "tcp") == ("filtered", "admin-prohibited")
    assert _probe(lab, "node1", "node2", "tcp") == ("open", "responder")
    for src in ("node1", "node3"):
        fl = Flow(lab.host("node2").addr, 2380, "tcp", src=lab.host(src).addr)
        assert expected(fl, faults, lab).verdict == ("fail" if src == "node3" else "pass")


# ---- conntrack: a fault applies to a flow whose 5-tuple an earlier flow used ------------------

SAME_PORT_SENDER = r"""
import errno, socket, sys
dst, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(2):  # before the fault, then after it: a new socket on the same 5-tuple
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2.0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport)); s.connect((dst, port))
    try:
        s.send(b"PMv1-probe-bytes"); s.recv(64); print("reply", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)), flush=True)
    s.close()
    sys.stdin.readline()
"""


def test_conntrack_flush_message() -> None:
    msg = conntrack.flush_request(7)
    # nlmsghdr: 20 bytes in all, ctnetlink (1) << 8 | IPCTNL_MSG_CT_DELETE (2), REQUEST | ACK;
    # nfgenmsg: AF_UNSPEC (both families), version 0, no attributes (= every entry)
    assert msg == struct.pack("=IHHII", 20, 0x102, 0x5, 7, 0) + bytes(4)
    ack = struct.pack("=IHHII", 36, 2, 0, 7, 0) + struct.pack("=i", 0) + msg[:16]
    assert conntrack.parse_ack(ack, 7) == 0
    refused = ack[:16] + struct.pack("=i", -95) + ack[20:]
    assert conntrack.parse_ack(refused, 7) == 95
    with pytest.raises(ValueError):
        conntrack.parse_ack(b"", 7)


@pytest.mark.lab
@pytest.mark.parametrize("where", ["out", "in"])
def test_apply_faults_forgets_earlier_flows_conntrack(fault_lab, where: str) -> None:
    # the rules match "ct state new": without a conntrack flush, a flow that passed before the
    # fault (or an earlier flow reusing its ephemeral port) keeps passing after it
    lab = fault_lab
    host = "node1" if where == "out" else "node2"
    # a rule on another port: conntrack runs in a namespace only while a rule there uses it
    _apply(lab, [Fault(host, where, "udp", ((9, 9),), "drop")])
    p = lab.popen(
        "node1",
        [sys.executable, "-c", SAME_PORT_SENDER, lab.host("node2").addr, "4789", "47890"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "reply"  # the flow passes, conntrack has it
        ours = os.readlink("/proc/thread-self/ns/net")
        _apply(lab, [Fault(host, where, "udp", ((4789, 4789),), "reject-admin")])
        assert os.readlink("/proc/thread-self/ns/net") == ours  # the flush came back home
        p.stdin.write("\n")
        p.stdin.flush()
        want = "EPERM" if where == "out" else "EHOSTUNREACH"
        assert p.stdout.readline().strip() == want
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(timeout=10) == 0
    finally:
        p.kill()
        p.wait()
        _apply(lab, [])


# ---- random fault sets: responders + nftables + kernel == ground truth, for every flow ---------

BATCH_PROBER = r"""
import json, os, select, socket, struct, sys, threading, time
from scanner.core import tags
secret, timeout = sys.argv[1].encode(), float(sys.argv[2])
flows = json.loads(sys.stdin.read())
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
def echo(ident):
    h = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + tags.make_tag(secret, os.urandom(8))
    return h[:2] + struct.pack("!H", csum(h)) + h[4:]
ERR = {111: "conn-refused", 113: "admin-prohibited", 1: "local-prohibited"}
def one(i, dst, proto, port):
    try:
        if proto == "tcp":
            s = socket.socket(); s.settimeout(timeout)
            try:
                s.connect((dst, port))
                return ("open", "responder" if s.recv(64) == tags.tcp_token(secret, port) else "syn-ack")
            except socket.timeout: return ("filtered", "no-response")
            except OSError as e:
                st = "closed" if e.errno == 111 else "filtered"
                return (st, ERR.get(e.errno, str(e)))
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout); s.connect((dst, port))
            try:
                s.send(tags.make_tag(secret, os.urandom(8))); d = s.recv(64)
                return ("open", "responder") if tags.check_reply(d, secret) else ("open", "udp-response")
            except socket.timeout: return ("open|filtered", "no-response")
            except OSError as e:
                if e.errno == 111: return ("closed", "port-unreach")
                return ("filtered", ERR.get(e.errno, str(e)))
        r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        ident = (os.getpid() * 64 + i) & 0xFFFF
        if proto == "icmp":
            pkt, s, want = echo(ident), r, 1
        else:
            inner = echo(ident)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(inner), ident, 0, 64, 1, 0,
                             socket.inet_aton("10.99.0.1"), socket.inet_aton("10.99.0.2"))
            ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
            # IPPROTO_RAW, outer header built here: an IPPROTO_IPIP raw socket would also
            # *receive* protocol 4, and while it is open the kernel does not answer other hosts'
            # IP-in-IP probes with protocol-unreachable (the raw socket "consumed" them)
            outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(inner), ident, 0, 64, 4, 0,
                                socket.inet_aton("0.0.0.0"), socket.inet_aton(dst))
            pkt, s, want = outer + ip + inner, socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW), 4
        try:
            s.sendto(pkt, (dst, 0))
        except OSError as e:
            return ("filtered", ERR.get(e.errno, str(e)))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not select.select([r], [], [], left)[0]: break
            d = r.recv(4096); ihl = (d[0] & 15) * 4; t, c = d[ihl], d[ihl + 1]
            if t == 0 and proto == "icmp" and struct.unpack("!H", d[ihl + 4:ihl + 6])[0] == ident:
                return ("open", "echo-reply")
            o = d[ihl + 8:]
            if t == 3 and len(o) >= 28 and socket.inet_ntoa(o[16:20]) == dst and o[9] == want:
                oi = (o[0] & 15) * 4
                mine = struct.unpack("!H", o[oi + 4:oi + 6])[0] == ident if want == 1 else struct.unpack("!H", o[4:6])[0] == ident
                if mine:
                    return {2: ("closed", "proto-unreach"), 3: ("filtered", "port-unreach"),
                            13: ("filtered", "admin-prohibited")}.get(c, ("filtered", "unreach-%d" % c))
        return ("filtered" if proto == "icmp" else "open|filtered", "no-response")
    except Exception as e:
        return ("error", repr(e))
out = [None] * len(flows)
def run(i, f): out[i] = one(i, *f)
ts = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(flows)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""

TRUTH_PORTS = (
    ("tcp", (2380, 2380)),
    ("tcp", (10250, 10250)),
    ("udp", (4789, 4789)),
    ("udp", (8472, 8472)),
)


@pytest.fixture(scope="module")
def truth_lab(module_lab):
    lab = module_lab(hosts=3)
    procs = []
    for h in lab.hosts:
        # per-namespace sysctl: no ICMP error rate limit, so every reject answers every probe
        lab.run(h.name, ["sh", "-c", "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit"], check=True)
        p = lab.popen(
            h.name,
            [sys.executable, "-m", "scanner", "respond", "-p", "2380,10250,U:4789,8472",
             "--secret", "truth", "--ttl", "120"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert p.stdout is not None and json.loads(p.stdout.readline())["type"] == "ready"
        procs.append(p)
    yield lab
    for p in procs:
        p.terminate()
        p.wait()


@pytest.mark.lab
@pytest.mark.parametrize("seed", range(4))
def test_random_faults_kernel_equals_ground_truth(truth_lab, seed: int) -> None:
    lab = truth_lab
    faults = random_faults(lab.hosts, seed, 6, ports=TRUTH_PORTS)
    lab.apply_faults(faults)
    flows = {
        src.name: [
            Flow(dst.addr, port, proto, src=src.addr)
            for dst in lab.hosts
            if dst is not src
            for proto, port in (
                ("tcp", 2380),
                ("tcp", 10250),
                ("udp", 4789),
                ("udp", 8472),
                ("icmp", None),
                ("ipip", None),
            )
        ]
        for src in lab.hosts
    }
    procs = {
        name: lab.popen(
            name,
            [sys.executable, "-c", BATCH_PROBER, "truth", "0.5"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in flows
    }
    wrong = []
    fails = 0
    for name, p in procs.items():
        out, _ = p.communicate(
            json.dumps([[f.dst, f.proto, f.port] for f in flows[name]]), timeout=30
        )
        for fl, got in zip(flows[name], json.loads(out), strict=True):
            want = expected(fl, faults, lab)
            fails += want.verdict == "fail"
            if tuple(got) != (want.state, want.reason):
                wrong.append(
                    f"{name}->{lab.by_addr(fl.dst).name} {fl.proto}/{fl.port}: kernel {got}, truth {want}"
                )
    assert not wrong, "\n".join(wrong + [f.describe() for f in faults])
    assert fails > 0  # the seeds do inject something
