"""The first packet to a new neighbour: a short --timeout never fakes `filtered` (a `fail`).

The first packets to an on-link destination wait while the kernel resolves its neighbour entry
(ARP / NDP); a lost ARP request is asked again only after ``retrans_time`` (1 s). With
``--timeout 0.3 --retries 0`` the attempt expired before the SYN left the host, and an open
port came back ``filtered/no-response``. The lab makes that loss exact: the destination drops
the first ARP request it sees (an nftables ``arp`` quota of one request).
"""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

DROP_FIRST_ARP_REQUEST = """
table arp pmfirst {
    chain input {
        type filter hook input priority 0; policy accept;
        arp operation request quota until 40 bytes counter drop
    }
}
"""


@pytest.fixture(scope="module")
def two_hosts(module_lab):
    lab = module_lab(hosts=2)
    # an open port (22), a closed one (1): both answer, neither may be filtered
    srv = lab.popen(
        "node1",
        [sys.executable, "-c", "import socket,time; s=socket.create_server(('0.0.0.0', 22)); "
         "print(1, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert srv.stdout is not None and srv.stdout.readline()
    yield lab
    srv.kill()
    srv.wait()


@pytest.mark.lab
@pytest.mark.parametrize("method", ["syn", "connect"])
def test_lost_first_arp_request_is_not_filtered(two_hosts, method: str) -> None:
    lab = two_hosts
    lab.run("node1", ["nft", "delete", "table", "arp", "pmfirst"], capture_output=True)
    lab.nft("node1", DROP_FIRST_ARP_REQUEST)
    for host in ("node1", "node2"):
        lab.run(host, ["ip", "neigh", "flush", "all"], check=True)
    dst = lab.host("node1").addr
    cp = lab.run(
        "node2",
        [sys.executable, "-m", "scanner", "scan", dst, "-p", "22,1", "--timeout", "0.3",
         "--retries", "0", "--method", method],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    recs = [orjson.loads(line) for line in cp.stdout.splitlines()]
    got = {r["port"]: r["state"] for r in recs if r["type"] == "result"}
    assert got == {22: "open", 1: "closed"}, cp.stdout
    # the lost request really happened: exactly one was dropped
    rules = lab.run("node1", ["nft", "list", "table", "arp", "pmfirst"], capture_output=True,
                    text=True).stdout  # fmt: skip
    assert "counter packets 1 " in rules, rules
    summary = recs[-1]
    assert summary["neighbour"]["unresolved_retried"] >= 1


def test_parse_neigh_reads_state_and_age() -> None:
    import socket
    import struct

    from scanner.engine import neigh

    dst = struct.pack("=HH", 8, 1) + socket.inet_aton("198.18.0.2")
    ci = struct.pack("=HH", 20, 3) + struct.pack("=IIII", 5, 6, int(2.5 * neigh._CLK_TCK), 1)
    body = struct.pack("=BBHiHBB", socket.AF_INET, 0, 0, 3, 0x02, 0, 1) + dst + ci
    msg = struct.pack("=IHHII", 16 + len(body), 28, 2, 1, 0) + body
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0\0\0\0"
    got, finished = neigh.parse_neigh(msg + done)
    assert finished and got == {"198.18.0.2": (0x02, 2.5)}
    assert neigh.parse_neigh(msg) == (got, False)  # more to read


def test_neigh_dump_sees_this_namespace() -> None:
    from scanner.engine import neigh

    assert isinstance(neigh.neigh_dump(4), dict)  # rtnetlink answers unprivileged too
