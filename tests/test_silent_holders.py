"""Ports held by a socket that ignores our probe (issue 21 walk, item 1).

A UDP port held by a kernel socket (a VXLAN device, as Calico leaves it) or by another process
on the wildcard: our responder cannot bind it and the holder does not answer our datagram, so
silence there is ``unknown`` with the holder in the reason - never a firewall's ``fail``. A reply
still passes, an ICMP port-unreachable still fails; TCP is unchanged (a listener answers SYN).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from scanner.mesh.launch import silent_holders, silent_ports
from scanner.mesh.probing import silent_verdict
from scanner.responder.holders import RESPONDER_COMM

BIN = str(Path(sys.executable).parent)


class Link:
    def __init__(self, addr: str, failed: list[dict], gone: str | None = None) -> None:
        self.host = type("H", (), {"address": addr})()
        self.ready_rec, self.failed = {"type": "ready", "failed": failed}, gone


def test_udp_holders_that_ignore_our_datagram_are_silent_with_who() -> None:
    use = "address in use"
    failed = [
        {"proto": "udp", "port": 4789, "error": use, "local": ["0.0.0.0"], "kernel": True},
        {"proto": "udp", "port": 51820, "error": use, "local": ["::"], "kernel": True},
        {"proto": "udp", "port": 8472, "error": use, "local": ["198.18.9.1"], "kernel": True},
        {
            "proto": "udp",
            "port": 53,
            "error": use,
            "local": ["0.0.0.0"],
            "pid": 7,
            "process": "dnsmasq",
        },  # fmt: skip
        {"proto": "udp", "port": 5353, "error": use, "local": ["0.0.0.0"]},  # owner not found
        # a portmesh responder answers our tagged datagram: its silence is the firewall's
        {
            "proto": "udp",
            "port": 4790,
            "error": use,
            "local": ["0.0.0.0"],
            "pid": 8,
            "process": RESPONDER_COMM,
        },  # fmt: skip
        # on loopback only: handled as held (unbound_ports), not here
        {"proto": "udp", "port": 6000, "error": use, "local": ["127.0.0.1"], "kernel": True},
        # TCP: a listener answers a SYN itself - never silent
        {"proto": "tcp", "port": 10250, "error": use, "local": ["0.0.0.0"], "kernel": True},
        {"proto": "udp", "port": 30001, "error": "too many open files"},
    ]
    assert silent_holders(Link("198.18.9.1", failed)) == {
        4789: "kernel",
        51820: "kernel",
        8472: "kernel",
        53: "dnsmasq[7]",
        5353: "unknown-socket",
    }
    assert silent_holders(Link("198.18.9.1", failed, gone="x")) == {}
    # the holding responder answered TCP with another secret's token: it ignores our datagrams
    other = Link("198.18.9.1", failed)
    other.ready_rec["holder_secret"] = "other"
    assert silent_holders(other)[4790] == "responder-secret-mismatch"
    assert silent_verdict("open|filtered", "responder-secret-mismatch")[1].startswith(
        "responder-secret-mismatch: "
    )
    assert silent_ports([Link("198.18.9.2", failed[:1]), Link("198.18.9.3", [])]) == {
        "198.18.9.2": {"4789": "kernel"}
    }
    verdict, why = silent_verdict("open|filtered", "kernel")
    assert verdict == "unknown" and why.startswith("held-by-kernel: ")
    assert silent_verdict("open|filtered", "dnsmasq[7]")[1].startswith("held-by-dnsmasq[7]: ")
    for state in ("open", "closed", "filtered", "error"):  # a reply passes, an ICMP error fails
        assert silent_verdict(state, "kernel") is None


@pytest.mark.lab
def test_a_kernel_vxlan_socket_is_recorded_as_a_kernel_holder(make_lab) -> None:
    """The responder's failure record says a kernel socket (no process) holds the port."""
    lab = make_lab(hosts=1)
    ns = lab.hosts[0].ns
    subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", "42",
         "dstport", "4789", "dev", "eth0"], check=True)  # fmt: skip
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "vx0", "up"], check=True)
    p = subprocess.run(
        ["ip", "netns", "exec", ns, f"{BIN}/portmesh", "respond", "-p", "U:4789,U:4790",
         "--secret", "k", "--ttl", "0.5"], capture_output=True, timeout=30)  # fmt: skip
    ready = orjson.loads(p.stdout.splitlines()[0])
    (f,) = ready["failed"]
    assert (f["proto"], f["port"], f.get("kernel"), f.get("pid")) == ("udp", 4789, True, None)
    assert ready["bound"]["udp"] == "4790"


@pytest.mark.lab
def test_mesh_over_calico_vxlan_devices_says_unknown_not_fail(
    lab_name: str, tmp_path: Path
) -> None:
    """The walk's setup: a bare lab (no responders) whose hosts carry a VXLAN device on
    udp/4789, node1 a TCP listener on 10250, node2 a reject of udp/4789. Silence from the
    VXLAN sockets is unknown (held-by-kernel); node2's port-unreachable still fails; the
    listener's SYN-ACK passes."""
    from scanner.lab.netns import run_dir

    faults = tmp_path / "faults.yml"
    faults.write_text(
        "faults:\n  - {host: node2, direction: in, proto: udp, ports: 4789, action: reject}\n"
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    up = subprocess.run(
        ["portmesh", "lab", "up", "--hosts", "3", "--name", lab_name, "--no-responders",
         "--faults", str(faults)], capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    listener = None
    try:
        for n in ("node1", "node2", "node3"):
            ns = f"{lab_name}-{n}"
            for cmd in (["ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport",
                         "4789", "dev", "eth0"], ["ip", "link", "set", "vx0", "up"]):  # fmt: skip
                subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, timeout=30)
        listener = subprocess.Popen(
            ["ip", "netns", "exec", f"{lab_name}-node1", sys.executable, "-c",
             "import socket,sys,time\ns=socket.socket()\ns.bind(('0.0.0.0',10250))\n"
             "s.listen(64)\nprint('up',flush=True)\ntime.sleep(120)"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert listener.stdout is not None and listener.stdout.readline() == "up\n"
        d = run_dir() / lab_name
        p = subprocess.run(
            ["portmesh", "mesh", "-i", str(d / "inventory.yml"), "--exec",
             f"ip netns exec {lab_name}-{{name}}", "--secret-file", str(d / "secret"),
             "--nodeport-sample", "16"],
            capture_output=True, env=env, timeout=300,
        )  # fmt: skip
        lines = [orjson.loads(x) for x in p.stdout.splitlines()]
        results = [r for r in lines if r["type"] == "result"]
        summary = lines[-1]
        assert summary["type"] == "summary" and summary["planned"] == len(results) > 100
        vx = [r for r in results if (r["proto"], r["port"]) == ("udp", 4789)]
        assert len(vx) == 6, vx
        for r in vx:
            if r["host"] == "node2":  # the reject: port-unreachable, a firewall's answer
                assert (r["state"], r["verdict"]) == ("closed", "fail"), r
                assert "verdict_reason" not in r, r
            else:
                assert (r["state"], r["verdict"]) == ("open|filtered", "unknown"), r
                assert r["verdict_reason"].startswith("held-by-kernel: "), r
        kubelet = [
            r for r in results if (r["proto"], r["port"], r["host"]) == ("tcp", 10250, "node1")
        ]
        assert kubelet and all((r["state"], r["verdict"]) == ("open", "pass") for r in kubelet)
        bad = [r for r in results if r["verdict"] == "fail"]
        where = {(r["host"], r["proto"], r["port"]) for r in bad}
        assert where == {("node2", "udp", 4789)}, bad[:5]
        assert p.returncode == 1  # the reject is a real failure
        assert b"drops udp/4789" not in p.stderr, p.stderr.decode()[-2000:]
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["portmesh", "lab", "down", "--name", lab_name], env=env, timeout=120)
