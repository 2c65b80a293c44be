"""ICMP echo probe: loopback, lab verdicts with nftables, and the unprivileged datagram path."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys

import pytest

from scanner.core import privileges
from scanner.core.flows import Flow
from scanner.probes import icmp
from scanner.probes.base import Outcome, ProbeOptions

LOOPS = ["asyncio", "uvloop"]


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


async def ping_all(
    addrs: list[str], timeout: float = 1.0, mode: str | None = None
) -> tuple[str, list[Outcome]]:
    p = icmp.IcmpProber(ProbeOptions(), mode=mode)
    await p.start(asyncio.get_running_loop())
    try:
        outs = await asyncio.gather(*(p.probe(Flow(a, None, "icmp"), timeout) for a in addrs))
        return p.mode, list(outs)
    finally:
        p.close()


needs_raw = pytest.mark.skipif(not privileges.can_raw(), reason="needs CAP_NET_RAW")


def test_prober_shape() -> None:
    p = icmp.make_prober(ProbeOptions())
    assert p.proto == "icmp" and p.needs_raw is False


def test_no_socket_reports_needs_cap() -> None:
    mode, outs = run(ping_all(["127.0.0.1"], mode="none"), "asyncio")
    assert mode == "none"
    assert [(o.state, o.reason) for o in outs] == [("error", "needs-cap-net-raw")]


@needs_raw
def test_ipv6_flow_is_an_error_not_a_crash() -> None:
    _, outs = run(ping_all(["::1"]), "asyncio")
    assert (outs[0].state, outs[0].reason) == ("error", "ipv6-unsupported")


@needs_raw
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_many_hosts_one_socket(loop_kind: str) -> None:
    addrs = [f"127.0.0.{i}" for i in range(1, 101)]
    mode, outs = run(ping_all(addrs), loop_kind)
    assert mode == "raw"
    assert {(o.state, o.reason) for o in outs} == {("open", "echo-reply")}
    assert all(o.rtt_ms is not None for o in outs)


@needs_raw
def test_same_destination_concurrently() -> None:
    _, outs = run(ping_all(["127.0.0.1"] * 50), "asyncio")
    assert [o.state for o in outs] == ["open"] * 50


@needs_raw
def test_two_probers_do_not_steal_replies() -> None:
    async def main():
        loop = asyncio.get_running_loop()
        a, b = icmp.make_prober(ProbeOptions()), icmp.make_prober(ProbeOptions())
        await a.start(loop)
        await b.start(loop)
        try:
            assert a.ident != b.ident or pytest.skip("identifier collision (1 in 65536)")
            return await asyncio.gather(
                *(p.probe(Flow("127.0.0.1", None, "icmp"), 1.0) for p in (a, b) for _ in range(5))
            )
        finally:
            a.close()
            b.close()

    outs = run(main(), "asyncio")
    assert [o.state for o in outs] == ["open"] * 10


def nft_input(rule: str) -> str:
    return f"""
table inet pmtest {{
  chain input {{
    type filter hook input priority 0; policy accept;
    {rule}
  }}
}}
"""


# ---- lab -------------------------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_lab_icmp_verdicts(make_lab, loop_kind: str) -> None:
    lab = make_lab(hosts=3)
    a, b, c = lab.hosts
    lab.nft(b.name, nft_input("icmp type echo-request drop"))
    lab.nft(c.name, nft_input("icmp type echo-request reject with icmp type admin-prohibited"))
    _, outs = run(ping_all([a.addr, b.addr, c.addr], timeout=0.8), loop_kind)
    assert [(o.state, o.reason, o.silent) for o in outs] == [
        ("open", "echo-reply", False),
        ("filtered", "no-response", True),
        ("filtered", "admin-prohibited", False),
    ]


@pytest.mark.lab
def test_lab_absent_host_is_host_unreach(make_lab) -> None:
    lab = make_lab(hosts=1)
    absent = lab.hosts[0].addr.rsplit(".", 1)[0] + ".200"
    # the kernel gives up neighbour resolution after ~3 s and reports host unreachable
    _, outs = run(ping_all([absent], timeout=5.0), "asyncio")
    assert (outs[0].state, outs[0].reason) == ("filtered", "host-unreach")


UNPRIV = r"""
import asyncio, json, sys
from scanner.core.flows import Flow
from scanner.probes import icmp
from scanner.probes.base import ProbeOptions
from scanner.core.privileges import can_raw

async def main():
    p = icmp.make_prober(ProbeOptions())
    await p.start(asyncio.get_running_loop())
    mode = p.mode
    outs = await asyncio.gather(*(p.probe(Flow(a, None, "icmp"), 1.0) for a in sys.argv[1:]))
    p.close()
    print(json.dumps({"raw": can_raw(), "mode": mode, "outs": [[o.state, o.reason] for o in outs]}))

asyncio.run(main())
"""


def _unprivileged(lab, host: str, addrs: list[str]) -> dict:
    argv = [
        "setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw",
        sys.executable, "-c", UNPRIV, *addrs,
    ]  # fmt: skip
    cp = lab.run(host, argv, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_lab_unprivileged_dgram_socket_pings(make_lab) -> None:
    lab = make_lab(hosts=3)
    a, b, c = lab.hosts
    # allow the ICMP datagram socket inside node1's namespace only (a per-namespace sysctl)
    lab.run(a.name, ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"], check=True)
    lab.nft(b.name, nft_input("icmp type echo-request drop"))
    lab.nft(c.name, nft_input("icmp type echo-request reject with icmp type admin-prohibited"))
    got = _unprivileged(lab, a.name, [b.addr, c.addr, lab.hosts[1].addr, "127.0.0.1"])
    assert got["raw"] is False and got["mode"] == "dgram"
    assert got["outs"] == [
        ["filtered", "no-response"],
        ["filtered", "admin-prohibited"],
        ["filtered", "no-response"],
        ["open", "echo-reply"],
    ]


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_lab_unprivileged_without_ping_group_reports_needs_cap(make_lab) -> None:
    lab = make_lab(hosts=2)
    a, b = lab.hosts
    lab.run(a.name, ["sysctl", "-qw", "net.ipv4.ping_group_range=1 0"], check=True)
    got = _unprivileged(lab, a.name, [b.addr])
    assert got == {"raw": False, "mode": "none", "outs": [["error", "needs-cap-net-raw"]]}


@pytest.mark.lab
def test_lab_unprivileged_dgram_open(make_lab) -> None:
    lab = make_lab(hosts=2)
    a, b = lab.hosts
    lab.run(a.name, ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"], check=True)
    got = _unprivileged(lab, a.name, [b.addr] * 3)
    assert got["mode"] == "dgram"
    assert got["outs"] == [["open", "echo-reply"]] * 3
