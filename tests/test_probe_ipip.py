"""IP-in-IP probe: loopback, the namespace lab (no tunnel, nftables drop, a decapsulating peer),
and the unprivileged path."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from scanner.core import privileges
from scanner.core.flows import Flow
from scanner.probes import icmp, ipip
from scanner.probes.base import Outcome, ProbeOptions

LOOPS = ["asyncio", "uvloop"]
needs_raw = pytest.mark.skipif(not privileges.can_raw(), reason="needs CAP_NET_RAW")


def run(coro, loop_kind: str):
    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def probe_all(addrs: list[str], timeout: float = 1.0) -> list[Outcome]:
    p = ipip.make_prober(ProbeOptions())
    await p.start(asyncio.get_running_loop())
    try:
        return list(await asyncio.gather(*(p.probe(Flow(a, None, "ipip"), timeout) for a in addrs)))
    finally:
        p.close()


@pytest.mark.parametrize(
    ("typ", "code", "state", "reason"),
    [
        (3, 2, "closed", "proto-unreach"),
        (3, 3, "closed", "port-unreach"),
        (3, 13, "filtered", "admin-prohibited"),
        (3, 1, "filtered", "host-unreach"),
        (11, 0, "filtered", "time-exceeded"),
    ],
)
def test_classify_error(typ: int, code: int, state: str, reason: str) -> None:
    out = ipip.classify_error(typ, code)
    assert (out.state, out.reason) == (state, reason)


def test_prober_shape() -> None:
    p = ipip.make_prober(ProbeOptions())
    assert p.proto == "ipip" and p.needs_raw is True


@needs_raw
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_no_tunnel_is_proto_unreach(loop_kind: str) -> None:
    # also proves the prober holds no protocol-4 raw socket: one would swallow the packet and
    # the kernel would stay silent
    outs = run(probe_all(["127.0.0.1", "127.0.0.2", "127.0.0.1"]), loop_kind)
    assert [(o.state, o.reason) for o in outs] == [("closed", "proto-unreach")] * 3


@needs_raw
def test_ipip_and_icmp_share_the_receiver() -> None:
    async def main():
        loop = asyncio.get_running_loop()
        a, b = ipip.make_prober(ProbeOptions()), icmp.make_prober(ProbeOptions())
        await a.start(loop)
        await b.start(loop)
        try:
            assert a.rx is not None and a.rx is b.rx
            return await asyncio.gather(
                a.probe(Flow("127.0.0.1", None, "ipip"), 1.0),
                b.probe(Flow("127.0.0.1", None, "icmp"), 1.0),
            )
        finally:
            a.close()
            b.close()

    x, y = run(main(), "asyncio")
    assert (x.state, x.reason) == ("closed", "proto-unreach")
    assert (y.state, y.reason) == ("open", "echo-reply")


def test_ipv6_is_an_error() -> None:
    outs = run(probe_all(["::1"]), "asyncio")
    assert outs[0].state == "error"


# ---- lab -------------------------------------------------------------------------------------

# A userspace IP-in-IP endpoint: receive protocol 4, hand the inner packet to the local stack.
# (A kernel ipip device would load the ipip module for the whole machine, and then every host
# answers "port unreachable" through tunnel4 instead of "protocol unreachable".)
DECAP = r"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
w = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
print("ready", flush=True)
while True:
    pkt = r.recv(65535)
    inner = pkt[(pkt[0] & 15) * 4:]
    w.sendto(inner, (socket.inet_ntoa(inner[16:20]), 0))
"""


@pytest.mark.lab
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_lab_ipip_verdicts(make_lab, loop_kind: str) -> None:
    lab = make_lab(hosts=3)
    a, b, c = lab.hosts
    lab.nft(b.name, "table ip t {\n chain i {\n type filter hook input priority 0;\n"
                    " ip protocol 4 drop\n }\n}\n")  # fmt: skip
    decap = lab.popen(c.name, [sys.executable, "-c", DECAP], stdout=subprocess.PIPE)
    try:
        assert decap.stdout is not None and decap.stdout.readline().strip() == b"ready"
        outs = run(probe_all([a.addr, b.addr, c.addr], timeout=0.8), loop_kind)
    finally:
        decap.kill()
        decap.wait()
    assert [(o.state, o.reason, o.silent) for o in outs] == [
        ("closed", "proto-unreach", False),
        ("open|filtered", "no-response", True),
        ("open", "echo-reply", False),
    ]


@pytest.mark.lab
def test_lab_ipip_reject(make_lab) -> None:
    lab = make_lab(hosts=1)
    h = lab.hosts[0]
    lab.nft(h.name, "table ip t {\n chain i {\n type filter hook input priority 0;\n"
                    " ip protocol 4 reject with icmp type admin-prohibited\n }\n}\n")  # fmt: skip
    (out,) = run(probe_all([h.addr]), "asyncio")
    assert (out.state, out.reason) == ("filtered", "admin-prohibited")


UNPRIV = r"""
import asyncio, json, sys
from scanner.core.flows import Flow
from scanner.probes import ipip
from scanner.probes.base import ProbeOptions

async def main():
    p = ipip.make_prober(ProbeOptions())
    await p.start(asyncio.get_running_loop())
    out = await p.probe(Flow(sys.argv[1], None, "ipip"), 0.5)
    p.close()
    print(json.dumps([out.state, out.reason]))

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@needs_raw
def test_without_cap_net_raw_reports_needs_cap() -> None:
    argv = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw",
            sys.executable, "-c", UNPRIV, "127.0.0.1"]  # fmt: skip
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == ["error", "needs-cap-net-raw"]
