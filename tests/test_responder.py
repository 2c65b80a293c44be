"""The responder (real sockets on loopback and in lab hosts), the witness, and `portmesh lab`."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanner.core import tags
from scanner.responder.server import ranges_text
from scanner.responder.witness import bpf_program, parse_probe

SECRET = b"test-secret"
PY = [sys.executable, "-m", "scanner"]

# ---- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "text"),
    [
        ([], ""),
        ([22], "22"),
        ([2380, 2379, 2379], "2379-2380"),
        ([22, 2379, 2380, 2381, 6443], "22,2379-2381,6443"),
        (range(30000, 32768), "30000-32767"),
        ([1, 3, 5], "1,3,5"),
    ],
)
def test_ranges_text(ports, text: str) -> None:
    assert ranges_text(ports) == text


@pytest.mark.parametrize("udp_ports", [[], [4789], [4789, 8472, 51820], list(range(5000, 5300))])
def test_bpf_program_jumps_stay_inside_and_end_in_returns(udp_ports: list[int]) -> None:
    prog = bpf_program(udp_ports)
    assert len(prog) <= 4096
    for i, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    assert prog[-1][0] == 0x06 and prog[-2] == (0x06, 0, 0, 0)


def _ipv4(proto: int, payload: bytes, src: str = "198.18.7.1", dst: str = "198.18.7.2") -> bytes:
    return (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0)
        + socket.inet_aton(src)
        + socket.inet_aton(dst)
        + payload
    )


def test_parse_probe_finds_tags_and_ignores_the_rest() -> None:
    tag = tags.make_tag(SECRET, b"\x01" * 8)
    echo = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + tag
    rec = parse_probe(_ipv4(1, echo), SECRET)
    assert rec == {
        "type": "witness",
        "proto": "icmp",
        "src": "198.18.7.1",
        "dst": "198.18.7.2",
        "port": None,
        "nonce": "01" * 8,
    }
    udp = struct.pack("!HHHH", 40000, 4789, 8 + 30, 0) + b"x" * 10 + tag
    assert parse_probe(_ipv4(17, udp), SECRET)["port"] == 4789
    inner = _ipv4(1, echo, "10.0.0.1", "10.0.0.2")
    assert parse_probe(_ipv4(4, inner), SECRET)["proto"] == "ipip"
    assert parse_probe(_ipv4(1, echo), b"other secret") is None
    assert parse_probe(_ipv4(1, echo[:-1]), SECRET) is None
    assert parse_probe(b"\x45" + b"\0" * 10, SECRET) is None
    assert parse_probe(_ipv4(6, b"\0" * 20 + tag), SECRET) is None


# ---- a responder process on loopback ----------------------------------------------------------


def free_ports(n: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """n ports free for both TCP and UDP on 127.0.0.1 right now."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in out:
            out.append(port)
    return out


class Proc:
    def __init__(self, args: list[str], stdin: int | None = subprocess.DEVNULL) -> None:
        self.p = subprocess.Popen(
            [*PY, "respond", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line, self.p.stderr.read().decode() if self.p.stderr else "no output"
        self.ready = json.loads(line)
        assert self.ready["type"] == "ready"

    def finish(self, timeout: float = 20) -> tuple[int, list[dict]]:
        if self.p.stdin is not None and self.p.stdin.closed:
            self.p.stdin = None  # communicate() would flush it
        out, _ = self.p.communicate(timeout=timeout)
        return self.p.returncode, [json.loads(x) for x in out.splitlines() if x.strip()]

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def responder() -> Iterator[tuple[Proc, list[int], list[int]]]:
    tcp = free_ports(3)
    udp = free_ports(2)
    spec = ",".join(map(str, tcp)) + ",U:" + ",".join(map(str, udp))
    p = Proc(["-p", spec, "--bind", "127.0.0.1", "--secret", SECRET.decode(), "--ttl", "60"])
    try:
        yield p, tcp, udp
    finally:
        p.kill()


def _udp(port: int, payload: bytes, timeout: float = 0.3) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.send(payload)
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def _listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltnu", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def test_ready_record_lists_what_was_bound(responder) -> None:
    p, tcp, udp = responder
    r = p.ready
    assert r["bound"] == {"tcp": ranges_text(tcp), "udp": ranges_text(udp)}
    assert r["failed"] == [] and r["addr"] == "127.0.0.1" and r["pid"] == p.p.pid
    assert r["ttl"] == 60 and "secret" not in r


def test_tcp_accept_sends_the_token_for_that_port(responder) -> None:
    p, tcp, _ = responder
    for port in tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            got = b""
            while chunk := s.recv(64):
                got += chunk
        assert got == tags.tcp_token(SECRET, port)
        assert got != tags.tcp_token(b"other", port)


def test_udp_replies_only_to_valid_tags_never_longer_than_the_probe(responder) -> None:
    p, _, udp = responder
    port = udp[0]
    rng = random.Random(5)
    sent_valid = 0
    for prefix_len in (0, 1, 40, 1400):
        nonce = rng.randbytes(8)
        probe = rng.randbytes(prefix_len) + tags.make_tag(SECRET, nonce)
        reply = _udp(port, probe, timeout=3)
        sent_valid += 1
        assert reply is not None and len(reply) <= len(probe)
        assert tags.check_reply(reply, SECRET) == nonce
    ignored = [
        b"",  # empty datagram
        b"hello",
        tags.make_tag(SECRET, b"\0" * 8)[:-1],  # truncated tag
        tags.make_tag(b"wrong secret", b"\0" * 8),  # another scan's tag
        tags.MAGIC * 10,  # magic without a valid mac
        *(rng.randbytes(rng.randrange(1, 600)) for _ in range(20)),  # garbage
    ]
    for probe in ignored:
        assert _udp(port, probe) is None, probe
    # oversized garbage is ignored too, and the responder still answers afterwards
    assert _udp(port, os.urandom(9000)) is None
    assert _udp(udp[1], b"x" + tags.make_tag(SECRET, b"\1" * 8), timeout=3) is not None
    p.p.send_signal(signal.SIGTERM)
    rc, recs = p.finish()
    assert rc == 0
    stats = recs[-1]["stats"]
    assert recs[-1]["type"] == "exit" and recs[-1]["reason"] == "sigterm"
    assert stats["udp_replied"] == sent_valid + 1
    assert stats["udp_ignored"] == len(ignored) + 1


def test_sigterm_ends_it_and_nothing_listens_afterwards(responder) -> None:
    p, tcp, udp = responder
    assert all(_listening(port) for port in tcp + udp)
    p.p.send_signal(signal.SIGTERM)
    rc, recs = p.finish()
    assert rc == 0 and recs[-1]["reason"] == "sigterm"
    assert not any(_listening(port) for port in tcp + udp)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", tcp[0]), timeout=3)


def test_sigint_ends_it_too(responder) -> None:
    p, _, _ = responder
    p.p.send_signal(signal.SIGINT)
    rc, recs = p.finish()
    assert rc == 0 and recs[-1]["reason"] == "sigint"


def test_ttl_ends_it() -> None:
    (port,) = free_ports(1)
    p = Proc(["-p", str(port), "--bind", "127.0.0.1", "--secret", "s", "--ttl", "0.5"])
    try:
        rc, recs = p.finish()
    finally:
        p.kill()
    assert rc == 0 and recs[-1] == {**recs[-1], "type": "exit", "reason": "ttl"}
    assert not _listening(port)


def test_closed_stdin_does_not_stop_a_standalone_responder_but_ends_a_child() -> None:
    (port,) = free_ports(1)
    args = ["-p", str(port), "--bind", "127.0.0.1", "--secret", "s", "--ttl", "60"]
    alone = Proc(args, stdin=subprocess.PIPE)
    try:
        assert alone.p.stdin is not None
        alone.p.stdin.close()
        # still serving after its stdin closed
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            assert s.recv(64) == tags.tcp_token(b"s", port)
        assert alone.p.poll() is None
    finally:
        alone.kill()
    child = Proc([*args, "--parent-channel"], stdin=subprocess.PIPE)
    try:
        assert child.p.stdin is not None
        child.p.stdin.write(b"anything\n")
        child.p.stdin.flush()
        child.p.stdin.close()
        rc, recs = child.finish()
        assert rc == 0 and recs[-1]["reason"] == "stdin-closed"
    finally:
        child.kill()


def test_a_port_in_use_is_reported_with_its_owner() -> None:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    (free,) = free_ports(1)
    try:
        p = Proc(["-p", f"{busy},{free}", "--bind", "127.0.0.1", "--secret", "s", "--ttl", "60"])
        try:
            assert p.ready["bound"]["tcp"] == str(free)
            (f,) = p.ready["failed"]
            assert f["proto"] == "tcp" and f["port"] == busy and f["error"] == "address in use"
            assert f["pid"] == os.getpid()
            assert f["process"]  # the comm of this test process
        finally:
            p.kill()
    finally:
        holder.close()


def test_without_a_secret_a_fresh_one_is_shown() -> None:
    (port,) = free_ports(1)
    p = Proc(["-p", str(port), "--bind", "127.0.0.1", "--ttl", "60"])
    try:
        sec = p.ready["secret"].encode()
        assert len(sec) == 32
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            assert s.recv(64) == tags.tcp_token(sec, port)
    finally:
        p.kill()


def test_secret_file(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    f = tmp_path / "secret"
    f.write_text("from-a-file\nsecond line ignored\n")
    p = Proc(["-p", str(port), "--bind", "127.0.0.1", "--secret-file", str(f), "--ttl", "60"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            assert s.recv(64) == tags.tcp_token(b"from-a-file", port)
    finally:
        p.kill()


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        ([], "no ports"),
        (["-p", "22", "--as", "node1"], "not both"),
        (["-p", "99999"], "out of range"),
        (["-p", "22", "--ttl", "0"], "--ttl"),
        (["-p", "22", "--ttl", "-5"], "--ttl"),
        (["-p", "22", "--bind", "localhost-ish"], "--bind"),
        (["-p", "22", "--secret", "a", "--secret-file", "b"], "not both"),
        (["-p", "22", "--secret-file", "/nonexistent/secret"], "cannot read"),
        (["--as", "node1"], "no ports"),
    ],
)
def test_bad_options_one_line_exit_2(args: list[str], msg: str) -> None:
    cp = subprocess.run([*PY, "respond", *args], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2
    assert cp.stderr.count("\n") == 1 and msg in cp.stderr, cp.stderr
    assert cp.stdout == ""


def test_inventory_ports_for_a_host(tmp_path: Path) -> None:
    from scanner.commands.respond import ports_for_host
    from scanner.lab.lab import inventory_doc
    from scanner.lab.netns import Lab, LabHost
    from scanner.plan.selection import SelectionOptions

    lab = Lab(
        "x",
        [LabHost(f"node{i}", f"x-node{i}", f"198.18.9.{i}") for i in (1, 2, 3)],
        "198.18.9.0/24",
    )
    import yaml

    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab)))
    opts = SelectionOptions(inventories=(str(inv),))
    cp_tcp, cp_udp = ports_for_host(opts, "node1")
    w_tcp, w_udp = ports_for_host(opts, "node2")
    for port in (6443, 2379, 2380, 10250, 30000, 32767):
        assert port in cp_tcp
    assert 10250 in w_tcp and 6443 not in w_tcp and 2379 not in w_tcp
    assert 4789 in cp_udp and 4789 in w_udp  # calico VXLAN by default
    from scanner.errors import InputError

    with pytest.raises(InputError, match="no host named 'node9'"):
        ports_for_host(opts, "node9")


# ---- in the lab: across namespaces, the witness, and `portmesh lab` ---------------------------


@pytest.mark.lab
def test_responder_in_a_lab_host_answers_other_hosts(lab) -> None:
    p = lab.popen(
        "node2",
        [*PY, "respond", "-p", "2380,U:4789", "--secret", "k", "--ttl", "30", "--witness"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        ready = json.loads(p.stdout.readline())
        assert ready["bound"] == {"tcp": "2380", "udp": "4789"} and ready["witness"] is True
        dst = lab.host("node2").addr
        probe = textwrap.dedent(
            f"""
            import socket, struct
            from scanner.core import tags
            s = socket.create_connection(({dst!r}, 2380), timeout=3)
            print(s.recv(64) == tags.tcp_token(b"k", 2380))
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
            u.connect(({dst!r}, 4789)); u.send(b"vx" + tags.make_tag(b"k", bytes(8)))
            print(tags.check_reply(u.recv(100), b"k") == bytes(8))
            h = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + tags.make_tag(b"k", b"\\x07" * 8)
            c = sum(struct.unpack("!%dH" % (len(h) // 2), h)); c = (c >> 16) + (c & 0xFFFF); c += c >> 16
            h = h[:2] + struct.pack("!H", ~c & 0xFFFF) + h[4:]
            r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            r.sendto(h, ({dst!r}, 0)); r.settimeout(3); r.recv(200)
            """
        )
        cp = lab.run("node1", [sys.executable, "-c", probe], capture_output=True, text=True)
        assert cp.stdout.split() == ["True", "True"], cp.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    recs = [json.loads(x) for x in out.splitlines()]
    wit = [r for r in recs if r["type"] == "witness"]
    assert {(w["proto"], w["src"], w["nonce"]) for w in wit} == {
        ("icmp", lab.host("node1").addr, "07" * 8)
    }
    assert recs[-1]["type"] == "exit" and recs[-1]["stats"]["witnessed"] == 1


def _lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, "lab", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.lab
def test_lab_up_status_down(lab_name: str, tmp_path: Path) -> None:
    from scanner.lab.netns import list_netns, netns_pids, run_dir

    faults = tmp_path / "f.yml"
    faults.write_text(
        "faults:\n"
        "  - {host: node3, direction: in, proto: tcp, ports: '30000-30009', action: reject}\n"
        "  - {host: node2, direction: out, proto: udp, ports: 4789, action: drop, to: node1}\n"
    )
    cp = _lab(
        "up", "--hosts", "3", "--name", lab_name, "--faults", str(faults), "--ttl", "60",
        "--truth-file",
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    state = run_dir() / lab_name
    assert f"inventory: {state / 'inventory.yml'}" in out
    assert f"exec template: ip netns exec {lab_name}-{{name}}" in out
    assert "fail node1 -> node3 tcp/30000-30009: closed (conn-refused)" in out
    assert "fail node2 -> node1 udp/4789: filtered (local-prohibited)" in out
    fails = [ln for ln in out.splitlines() if ln.strip().startswith("fail ")]
    assert len(fails) == 3  # node1->node3, node2->node3 (tcp), node2->node1 (udp)
    truth = [json.loads(x) for x in (state / "truth.ndjson").read_text().splitlines()]
    assert sum(t["verdict"] == "fail" for t in truth) == 2 * 10 + 1
    import yaml

    inv = yaml.safe_load((state / "inventory.yml").read_text())
    assert list(inv["all"]["children"]["kube_control_plane"]["hosts"]) == ["node1"]
    assert list(inv["all"]["children"]["kube_node"]["hosts"]) == ["node2", "node3"]
    # a responder runs in every host
    for n in ("node1", "node2", "node3"):
        assert len(netns_pids(f"{lab_name}-{n}")) == 1
    st = _lab("status", "--name", lab_name)
    assert st.returncode == 0 and f"{lab_name}-node2 up processes" in st.stdout
    again = _lab("up", "--hosts", "1", "--name", lab_name)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert again.stderr.count("\n") == 1
    down = _lab("down", "--name", lab_name)
    assert down.returncode == 0 and "removed" in down.stdout
    assert not any(ns.startswith(f"{lab_name}-") for ns in list_netns())
    assert not state.exists()
    assert (
        lab_name not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    )


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["up", "--hosts", "0"], "--hosts"),
        (["up", "--name", "bad name"], "bad lab name"),
        (["up", "--faults", "/nonexistent.yml"], "cannot read fault file"),
        (["down", "--name", "../x"], "bad lab name"),
    ],
)
def test_lab_bad_options_exit_2(args: list[str], msg: str) -> None:
    cp = _lab(*args)
    assert cp.returncode == 2 and msg in cp.stderr and cp.stderr.count("\n") == 1, cp.stderr


def test_lab_without_root_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import scanner.lab.lab as labmod
    from scanner.cli import main

    monkeypatch.setattr(labmod.os, "geteuid", lambda: 1000)
    for argv in (
        ["lab", "up", "--hosts", "2", "--name", "never"],
        ["lab", "down", "--name", "never"],
    ):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "root" in err
