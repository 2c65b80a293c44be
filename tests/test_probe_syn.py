"""The raw SYN probe: the packet it builds (decoded by scapy), its stateless matching, and the
engine's choice of TCP method. Lab and loopback classification of connect and syn side by side
is in tests/test_engine.py; this file covers what is particular to syn."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from scanner.probes import syn

needs_raw = pytest.mark.skipif(
    os.geteuid() != 0, reason="the raw SYN probe needs CAP_NET_RAW (root here)"
)


@pytest.mark.parametrize(
    ("src", "dst", "sport", "dport", "seq"),
    [
        ("198.18.0.1", "198.18.0.2", 61000, 22, 0),
        ("127.0.0.1", "127.0.0.1", 65535, 65535, 0xFFFFFFFF),
        ("10.0.0.1", "192.0.2.7", 62000, 6443, 123456789),
    ],
)
def test_build_syn_decodes_with_scapy(src: str, dst: str, sport: int, dport: int, seq: int) -> None:
    from scapy.layers.inet import IP, TCP

    hdr = syn.build_syn(socket.inet_aton(src), socket.inet_aton(dst), sport, dport, seq)
    assert len(hdr) == 24
    pkt = IP(bytes(IP(src=src, dst=dst, proto=6) / hdr))  # the kernel adds this header
    tcp = pkt[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (sport, dport, seq, 0)
    assert str(tcp.flags) == "S"
    assert ("MSS", syn.MSS) in tcp.options
    # scapy recomputes the checksum when it is deleted; it must equal ours
    want = tcp.chksum
    del tcp.chksum
    assert IP(bytes(pkt))[TCP].chksum == want


def test_cookie_depends_on_every_field() -> None:
    base = syn.cookie("198.18.0.2", 22, 61000)
    assert base == syn.cookie("198.18.0.2", 22, 61000)
    others = {
        syn.cookie("198.18.0.3", 22, 61000),
        syn.cookie("198.18.0.2", 23, 61000),
        syn.cookie("198.18.0.2", 22, 61001),
    }
    assert base not in others and len(others) == 3
    assert 0 <= base <= 0xFFFFFFFF


def test_bpf_program_shape() -> None:
    prog = syn.bpf_port_range(61000, 62000)
    assert len(prog) % 8 == 0 and len(prog) // 8 == 10


@needs_raw
def test_auto_method_picks_syn_as_root_and_connect_with_a_secret(tmp_path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    try:
        for extra, method, reason in (
            ([], "syn", "syn-ack"),
            (["--method", "connect"], "connect", "syn-ack"),
            (["--secret", "s"], "connect", "syn-ack"),
        ):
            cp = subprocess.run(
                [sys.executable, "-m", "scanner", "scan", "127.0.0.1", "-p", str(port), *extra],
                capture_output=True, timeout=30,
            )  # fmt: skip
            assert cp.returncode == 0, cp.stderr
            recs = [json.loads(x) for x in cp.stdout.splitlines()]
            assert recs[-1]["tcp_method"] == method
            assert (recs[1]["state"], recs[1]["reason"]) == ("open", reason)
    finally:
        srv.close()


def test_syn_with_a_secret_is_refused() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "scan", "127.0.0.1", "-p", "1", "--method", "syn",
         "--secret", "s"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert cp.returncode == 2
    assert len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_cap_net_raw_auto_is_connect_and_syn_is_reported() -> None:
    base = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
    argv = [*base, sys.executable, "-m", "scanner", "scan", "127.0.0.1", "-p", "1"]
    cp = subprocess.run(argv, capture_output=True, timeout=30)
    recs = [json.loads(x) for x in cp.stdout.splitlines()]
    assert recs[-1]["tcp_method"] == "connect"
    cp = subprocess.run([*argv, "--method", "syn"], capture_output=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    recs = [json.loads(x) for x in cp.stdout.splitlines()]
    assert (recs[1]["state"], recs[1]["reason"]) == ("error", "needs-cap-net-raw")
    assert recs[-1]["skipped"] == {"needs-cap-net-raw": 1}


@needs_raw
def test_ipv6_destinations_fall_back_to_connect() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    srv = socket.socket(socket.AF_INET6)
    try:
        srv.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        cp = subprocess.run(
            [sys.executable, "-m", "scanner", "scan", "::1", "-p", str(port), "--method", "syn"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        recs = [json.loads(x) for x in cp.stdout.splitlines()]
        assert (recs[1]["state"], recs[1]["reason"]) == ("open", "syn-ack")
    finally:
        srv.close()
