"""UDP probe: classification tables, loopback sockets, and the namespace lab (real kernel ICMP)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time

import pytest

from scanner.core import tags
from scanner.core.flows import Flow
from scanner.probes import classify, udp
from scanner.probes.base import Outcome, ProbeOptions

LOOPS = ["asyncio", "uvloop"]
SECRET = b"udp-test-secret"


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


async def probe_all(opts: ProbeOptions, flows: list[Flow], timeout: float = 1.0) -> list[Outcome]:
    p = udp.make_prober(opts)
    await p.start(asyncio.get_running_loop())
    try:
        return list(await asyncio.gather(*(p.probe(f, timeout) for f in flows)))
    finally:
        p.close()


# ---- pure tables ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "typ", "code", "state", "reason"),
    [
        (classify.SO_EE_ORIGIN_ICMP, 3, 3, "closed", "port-unreach"),
        (classify.SO_EE_ORIGIN_ICMP, 3, 13, "filtered", "admin-prohibited"),
        (classify.SO_EE_ORIGIN_ICMP, 3, 9, "filtered", "admin-prohibited"),
        (classify.SO_EE_ORIGIN_ICMP, 3, 10, "filtered", "admin-prohibited"),
        (classify.SO_EE_ORIGIN_ICMP, 3, 1, "filtered", "host-unreach"),
        (classify.SO_EE_ORIGIN_ICMP, 3, 0, "filtered", "net-unreach"),
        (classify.SO_EE_ORIGIN_ICMP, 3, 2, "filtered", "proto-unreach"),
        (classify.SO_EE_ORIGIN_ICMP, 11, 0, "filtered", "time-exceeded"),
        (classify.SO_EE_ORIGIN_ICMP6, 1, 4, "closed", "port-unreach"),
        (classify.SO_EE_ORIGIN_ICMP6, 1, 1, "filtered", "admin-prohibited"),
        (classify.SO_EE_ORIGIN_ICMP6, 1, 3, "filtered", "host-unreach"),
        (classify.SO_EE_ORIGIN_LOCAL, 0, 0, "error", "emsgsize"),
    ],
)
def test_classify_icmp(origin: int, typ: int, code: int, state: str, reason: str) -> None:
    out = classify.classify_icmp(origin, typ, code, errno.EMSGSIZE, 1.5)
    assert (out.state, out.reason, out.rtt_ms) == (state, reason, 1.5)


@pytest.mark.parametrize(
    ("err", "state", "reason", "silent"),
    [
        (errno.ECONNREFUSED, "closed", "port-unreach", False),
        (errno.EHOSTUNREACH, "filtered", "host-unreach", False),
        (errno.ENETUNREACH, "filtered", "net-unreach", False),
        (errno.EPERM, "filtered", "local-prohibited", False),  # our own output chain
        (errno.EACCES, "filtered", "admin-prohibited", False),
        (errno.ENOBUFS, "error", "enobufs", True),
        (errno.EMFILE, "error", "emfile", True),
        (errno.EADDRNOTAVAIL, "error", "eaddrnotavail", False),
    ],
)
def test_errno_outcome(err: int, state: str, reason: str, silent: bool) -> None:
    out = classify.errno_outcome(OSError(err, "x"))
    assert (out.state, out.reason, out.silent) == (state, reason, silent)


def test_prober_shape() -> None:
    p = udp.make_prober(ProbeOptions())
    assert p.proto == "udp" and p.needs_raw is False
    assert udp.UDP_PER_HOST_PPS > 0 and udp.UDP_PER_HOST_BURST >= 1


# ---- loopback ------------------------------------------------------------------------------


class Echo:
    """A UDP listener on 127.0.0.1 port 0 in a thread-free form: answered from the test's loop."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.secret = secret
        self.got: list[bytes] = []

    def attach(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        data, addr = self.sock.recvfrom(65535)
        self.got.append(data)
        if self.secret is None:
            self.sock.sendto(data, addr)
        else:
            nonce = tags.find_tag(data, self.secret)
            if nonce is not None:
                self.sock.sendto(tags.reply_for(self.secret, nonce), addr)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def freed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_open_closed(loop_kind: str) -> None:
    async def main():
        echo = Echo()
        echo.attach()
        try:
            flows = [Flow("127.0.0.1", echo.port, "udp"), Flow("127.0.0.1", freed_port(), "udp")]
            return await probe_all(ProbeOptions(), flows), echo.got
        finally:
            echo.close()

    (opened, closed), got = run(main(), loop_kind)
    assert (opened.state, opened.reason, opened.silent) == ("open", "udp-response", False)
    assert opened.rtt_ms is not None and opened.rtt_ms >= 0
    assert (closed.state, closed.reason) == ("closed", "port-unreach")
    assert len(got) == 1 and tags.find_tag(got[0], b"") is not None


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_responder_tag(loop_kind: str) -> None:
    async def main():
        good, other = Echo(SECRET), Echo()
        good.attach()
        other.attach()
        try:
            flows = [Flow("127.0.0.1", good.port, "udp"), Flow("127.0.0.1", other.port, "udp")]
            return await probe_all(ProbeOptions(secret=SECRET), flows)
        finally:
            good.close()
            other.close()

    ours, theirs = run(main(), loop_kind)
    assert (ours.state, ours.reason) == ("open", "responder")
    # a plain echo returns our probe tag, not a responder reply: another service answered
    assert (theirs.state, theirs.reason) == ("open", "udp-response")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_silence_is_open_filtered(loop_kind: str) -> None:
    async def main():
        # a bound socket that never answers: no ICMP, no reply
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        try:
            return await probe_all(
                ProbeOptions(), [Flow("127.0.0.1", s.getsockname()[1], "udp")], 0.2
            )
        finally:
            s.close()

    (out,) = run(main(), loop_kind)
    assert (out.state, out.reason, out.silent) == ("open|filtered", "no-response", True)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_many_concurrent_closed(loop_kind: str) -> None:
    # loopback is exempt from the per-destination ICMP rate limit: every one is answered
    flows = [Flow("127.0.0.1", freed_port(), "udp") for _ in range(40)]
    outs = run(probe_all(ProbeOptions(), flows), loop_kind)
    assert [o.state for o in outs] == ["closed"] * 40


@pytest.mark.parametrize("port", [4789, 8472, 51820, 7946, 5353])
def test_loopback_payload_kinds_reach_listener(port: int) -> None:
    """Each payload kind leaves the socket intact; a listener sees our tag in it."""
    opts = ProbeOptions(secret=SECRET, udp_payloads={})

    async def main():
        echo = Echo()
        echo.attach()
        try:
            p = udp.make_prober(opts)
            await p.start(asyncio.get_running_loop())
            # probe the echo port but with the payload kind of ``port``
            p.opts = ProbeOptions(
                secret=SECRET,
                udp_payloads={echo.port: udp.payloads.kind_for_port(port)},
            )
            out = await p.probe(Flow("127.0.0.1", echo.port, "udp"), 1.0)
            return out, echo.got
        finally:
            echo.close()

    out, got = run(main(), "asyncio")
    assert out.state == "open"
    assert tags.find_tag(got[0], SECRET) is not None


def test_no_port_is_error() -> None:
    (out,) = run(probe_all(ProbeOptions(), [Flow("127.0.0.1", None, "udp")]), "asyncio")
    assert (out.state, out.reason) == ("error", "no-port")


def test_cancel_releases_socket() -> None:
    async def main():
        p = udp.make_prober(ProbeOptions())
        await p.start(asyncio.get_running_loop())
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        t = asyncio.ensure_future(p.probe(Flow("127.0.0.1", s.getsockname()[1], "udp"), 30))
        await asyncio.sleep(0.05)
        before = _fd_count()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        s.close()
        return before, _fd_count()

    before, after = run(main(), "asyncio")
    assert after <= before - 2  # the probe's socket and the test's listener are gone


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- lab: real namespaces, real nftables -----------------------------------------------------

ECHO_SRC = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
"""


def start_echo(lab, host: str, port: int) -> subprocess.Popen:
    p = lab.popen(host, [sys.executable, "-c", ECHO_SRC, str(port)], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


def nft_input(rule: str) -> str:
    return f"""
table inet pmtest {{
  chain input {{
    type filter hook input priority 0; policy accept;
    {rule}
  }}
}}
"""


@pytest.mark.lab
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_lab_udp_verdicts(make_lab, loop_kind: str) -> None:
    lab = make_lab(hosts=2)
    a, b = lab.hosts[0], lab.hosts[1]
    echo = start_echo(lab, a.name, 9000)
    try:
        lab.nft(
            b.name,
            nft_input(
                "udp dport 9101 drop\n"
                "    udp dport 9102 reject with icmp type admin-prohibited\n"
                "    udp dport 9103 reject with icmp type host-unreachable"
            ),
        )
        flows = [
            Flow(a.addr, 9000, "udp"),
            Flow(a.addr, 9001, "udp"),
            Flow(b.addr, 9101, "udp"),
            Flow(b.addr, 9102, "udp"),
            Flow(b.addr, 9103, "udp"),
        ]
        outs = run(probe_all(ProbeOptions(), flows, timeout=0.8), loop_kind)
    finally:
        echo.kill()
        echo.wait()
    got = [(o.state, o.reason) for o in outs]
    assert got == [
        ("open", "udp-response"),
        ("closed", "port-unreach"),
        ("open|filtered", "no-response"),
        ("filtered", "admin-prohibited"),
        ("filtered", "host-unreach"),
    ]
    assert outs[2].silent and not outs[3].silent


@pytest.mark.lab
def test_lab_responder_confirms(make_lab) -> None:
    lab = make_lab(hosts=1)
    h = lab.hosts[0]
    from scanner.responder.server import wait_ready

    proc = lab.popen(
        h.name,
        [
            sys.executable,
            "-m",
            "scanner",
            "respond",
            "-p",
            "U:4789,U:51820,U:7946,U:9000",
            "--secret",
            SECRET.decode(),
            "--ttl",
            "30",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        wait_ready(proc.stdout.readline)
        flows = [Flow(h.addr, p, "udp") for p in (4789, 51820, 7946, 9000)]
        outs = run(probe_all(ProbeOptions(secret=SECRET), flows), "asyncio")
    finally:
        proc.terminate()
        proc.wait(5)
    assert [(o.state, o.reason) for o in outs] == [("open", "responder")] * 4


def _vx_stats(lab, host: str) -> dict:
    cp = lab.run(host, ["ip", "-s", "-j", "link", "show", "vx0"], capture_output=True, text=True)
    return json.loads(cp.stdout)[0]["stats64"]["rx"]


@pytest.mark.lab
def test_lab_kernel_vxlan_counts_probe(make_lab) -> None:
    lab = make_lab(hosts=1)
    h = lab.hosts[0]
    vni = 4242
    for cmd in (
        [
            "ip",
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            str(vni),
            "dstport",
            "8472",
            "local",
            h.addr,
            "dev",
            "eth0",
        ],
        ["ip", "link", "set", "vx0", "up"],
    ):
        lab.run(h.name, cmd, check=True)
    before = _vx_stats(lab, h.name)
    # the wrong VNI is not delivered to vx0 at all: the counter must not move
    outs = run(
        probe_all(ProbeOptions(vxlan_vni=vni + 1), [Flow(h.addr, 8472, "udp")], 0.3), "asyncio"
    )
    assert _vx_stats(lab, h.name)["packets"] == before["packets"]
    outs = run(probe_all(ProbeOptions(vxlan_vni=vni), [Flow(h.addr, 8472, "udp")], 0.3), "asyncio")
    after = _vx_stats(lab, h.name)
    assert after["packets"] == before["packets"] + 1
    assert after["errors"] == 0 and after["dropped"] == 0
    # a kernel VXLAN socket owns the port: no port unreachable, the probe is silently consumed
    assert outs[0].state == "open|filtered"


@pytest.mark.lab
def test_lab_bad_vxlan_flags_are_rx_errors(make_lab) -> None:
    """The counter the previous test reads does move for a malformed frame (flags 0x0c)."""
    lab = make_lab(hosts=1)
    h = lab.hosts[0]
    lab.run(
        h.name,
        [
            "ip",
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "7",
            "dstport",
            "8472",
            "local",
            h.addr,
            "dev",
            "eth0",
        ],
        check=True,
    )
    lab.run(h.name, ["ip", "link", "set", "vx0", "up"], check=True)
    good = udp.payloads.udp_template("vxlan", 7).render(bytes(20))
    bad = b"\x0c" + good[1:]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(bad, (h.addr, 8472))
    s.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and _vx_stats(lab, h.name)["errors"] == 0:
        time.sleep(0.05)
    st = _vx_stats(lab, h.name)
    assert st["errors"] >= 1 and st["packets"] == 0


@pytest.mark.lab
def test_lab_tcpdump_decodes_vxlan(make_lab) -> None:
    lab = make_lab(hosts=1)
    h = lab.hosts[0]
    td = lab.popen(
        h.name,
        ["tcpdump", "-i", "eth0", "-n", "-l", "-c", "1", "udp", "dst", "port", "4789"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert td.stderr is not None
        _wait_line(td.stderr, b"listening on")
        run(probe_all(ProbeOptions(vxlan_vni=4096), [Flow(h.addr, 4789, "udp")], 0.3), "asyncio")
        out, _ = td.communicate(timeout=10)
    finally:
        if td.poll() is None:
            td.kill()
            td.wait()
    text = out.decode()
    assert "VXLAN, flags [I] (0x08), vni 4096" in text
    assert f"> {h.addr}: ICMP echo request" in text


def _wait_line(stream, needle: bytes, timeout: float = 10.0) -> None:
    # raw reads: a buffered readline() would hide a second line already read from select()
    fd, seen = stream.fileno(), b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 4096)
            seen += chunk
            if needle in seen:
                return
            if not chunk:
                break
    raise AssertionError(f"never saw {needle!r} (got {seen!r})")


UNPRIV = r"""
import asyncio, json, socket, sys
from scanner.core.flows import Flow
from scanner.probes import udp
from scanner.probes.base import ProbeOptions

async def main():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = udp.make_prober(ProbeOptions())
    await p.start(asyncio.get_running_loop())
    out = await p.probe(Flow("127.0.0.1", port, "udp"), 1.0)
    print(json.dumps([out.state, out.reason]))

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_no_capabilities_needed() -> None:
    """IP_RECVERR's error queue gives the exact ICMP code to a process with no capabilities."""
    argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", UNPRIV]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == ["closed", "port-unreach"]
