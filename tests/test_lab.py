"""The network-namespace lab: real namespaces, real links, real sockets (root only)."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys

import pytest

from scanner.errors import InputError, PrivilegeError
from scanner.lab import lab as labmod
from scanner.lab.addressing import root_ifname, subnet_for, subnet_index
from scanner.lab.netns import Lab, LabHost

# ---- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pm", "demo", "t1a2b3", "a" * 32, "x.y_z-1"])
def test_subnet_is_a_24_inside_the_lab_block(name: str) -> None:
    net = subnet_for(subnet_index(name))
    assert net.prefixlen == 24
    assert net.subnet_of(ipaddress.ip_network("198.18.0.0/15"))
    assert subnet_for(subnet_index(name)) == net  # deterministic


def test_subnet_index_spreads_names() -> None:
    assert len({subnet_index(f"lab{i}") for i in range(50)}) > 40


@pytest.mark.parametrize(
    ("name", "expect"),
    [("pm", "pm-root"), ("abcdefghij", "abcdefghij-root"), ("abcdefghijk", None)],
)
def test_root_ifname_fits_ifnamsiz(name: str, expect: str | None) -> None:
    got = root_ifname(name)
    assert len(got) <= 15
    if expect:
        assert got == expect
    else:
        assert got.startswith("pmr") and got == root_ifname(name)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"name": "bad name"}, "bad lab name"),
        ({"name": "-x"}, "bad lab name"),
        ({"name": "x" * 33}, "bad lab name"),
        ({"hosts": 0}, "bad host count"),
        ({"names": ["a", "a"]}, "duplicate"),
        ({"names": ["sw"]}, "reserved"),
        ({"names": ["ok", "no/slash"]}, "bad host name"),
    ],
)
def test_bad_arguments_raise_input_error(kw: dict, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        Lab.up(**kw)


def test_not_root_raises_privilege_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 1000)
    with pytest.raises(PrivilegeError, match="root"):
        Lab.up(2, "never")


def test_exec_template_names_the_namespace() -> None:
    lab = Lab("pm", [LabHost("node1", "pm-node1", "198.18.0.1")], "198.18.0.0/24")
    assert lab.exec_template() == "ip netns exec pm-{name}"
    assert lab.exec_template().format(name="node1") == "ip netns exec pm-node1"


# ---- real labs -------------------------------------------------------------------------------

lab_only = pytest.mark.lab


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def _netns() -> list[str]:
    return labmod.list_netns()


def _assert_gone(lab: Lab) -> None:
    present = _netns()
    for ns in lab.namespaces():
        assert ns not in present
    assert f"portmesh-lab:{lab.name}" not in _root_links()
    if lab.root_if:
        assert f" {lab.root_if}@" not in _root_links()
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert lab.subnet not in routes
    assert not lab.state_dir().exists()


@lab_only
def test_up_builds_hosts_that_reach_each_other_and_down_leaves_nothing(lab_name: str) -> None:
    name = lab_name
    lab = Lab.up(3, name)
    try:
        assert [h.name for h in lab.hosts] == ["node1", "node2", "node3"]
        assert [h.ns for h in lab.hosts] == [f"{name}-node1", f"{name}-node2", f"{name}-node3"]
        net = ipaddress.ip_network(lab.subnet)
        assert [h.addr for h in lab.hosts] == [str(net.network_address + i) for i in (1, 2, 3)]
        assert lab.host_addr == str(net.network_address + 254)
        present = _netns()
        assert all(ns in present for ns in lab.namespaces())
        # the root namespace got exactly one link and one route for the lab
        assert f" {lab.root_if}@" in _root_links()
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        assert [r for r in routes.splitlines() if lab.subnet in r][0].startswith(lab.subnet)

        # node1 -> node2 over the bridge: a real listener, a real connect
        srv = lab.popen(
            "node2",
            [sys.executable, "-c", _ECHO_SERVER],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            got = lab.run(
                "node1",
                [sys.executable, "-c", _CONNECT.format(addr=lab.host("node2").addr)],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert got.stdout.strip() == "hello", got.stderr
            # the root namespace reaches the lab in-process through the host link
            with socket.create_connection((lab.host("node2").addr, 5000), timeout=3) as s:
                assert s.recv(5) == b"hello"
        finally:
            srv.kill()
            srv.wait()
        # loopback is up in the hosts, and IPv6 link-local generation is off on eth0
        show = lab.run("node3", ["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
        assert "127.0.0.1/8" in show
        assert "fe80::" not in show.split("eth0", 1)[1]
    finally:
        lab.down()
    _assert_gone(lab)
    lab.down()  # idempotent
    _assert_gone(lab)


_ECHO_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5000)); s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hello"); c.close()
"""

_CONNECT = """
import socket
with socket.create_connection(("{addr}", 5000), timeout=3) as s:
    print(s.recv(5).decode())
"""


@lab_only
def test_named_hosts_and_no_host_link(make_lab) -> None:
    lab = make_lab(names=["master1", "worker1"], host_link=False)
    assert lab.host("worker1").ns == f"{lab.name}-worker1"
    assert lab.root_if is None and lab.host_addr is None
    assert (
        lab.subnet
        not in subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    )
    with pytest.raises(InputError, match="no host"):
        lab.host("node1")


@lab_only
def test_down_ends_processes_left_in_the_lab(lab_name: str) -> None:
    lab = Lab.up(1, lab_name)
    p = lab.popen("node1", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lab.down()
        assert p.wait(timeout=5) != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    _assert_gone(lab)


@lab_only
def test_same_name_twice_is_refused(lab) -> None:
    with pytest.raises(labmod.LabError, match="already exists"):
        Lab.up(1, lab.name)
    # the refused attempt touched nothing of the running lab
    assert lab.host("node1").ns in _netns()


@lab_only
def test_cleanup_removes_a_crashed_lab_without_its_state_file(lab_name: str) -> None:
    name = lab_name
    lab = Lab.up(2, name)
    (lab.state_dir() / "lab.json").unlink()  # as if the run had crashed and lost its record
    Lab.cleanup(name)
    _assert_gone(lab)


@lab_only
def test_cleanup_leaves_other_labs_alone(make_lab, lab_name: str) -> None:
    other = make_lab(hosts=1)
    name = lab_name
    lab = Lab.up(1, name)
    Lab.cleanup(name)
    _assert_gone(lab)
    assert other.host("node1").ns in _netns()
    assert Lab.load(other.name).subnet == other.subnet


@lab_only
def test_down_of_a_half_built_lab_raises_nothing(lab_name: str) -> None:
    name = lab_name
    never = Lab(name, [LabHost("node1", f"{name}-node1", "198.18.0.1")], "198.18.0.0/24")
    never.down()  # nothing exists at all
    subprocess.run(["ip", "netns", "add", f"{name}-sw"], check=True)  # only the switch exists
    half = Lab(name, [LabHost("node1", f"{name}-node1", "198.18.0.1")], "198.18.0.0/24")
    half.down()
    assert f"{name}-sw" not in _netns()


@lab_only
def test_parallel_labs_get_different_subnets(make_lab) -> None:
    a = make_lab(hosts=1)
    b = make_lab(hosts=1)
    assert a.subnet != b.subnet


@lab_only
def test_nft_loads_rules_in_one_host_only(lab) -> None:
    lab.nft(
        "node1",
        "table inet portmesh {\n chain input {\n type filter hook input priority 0;\n }\n}\n",
    )
    one = lab.run("node1", ["nft", "list", "tables"], capture_output=True, text=True).stdout
    two = lab.run("node2", ["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "portmesh" in one and "portmesh" not in two
    with pytest.raises(labmod.LabError, match="nft"):
        lab.nft("node1", "this is not nft\n")


# ---- issue 20: README's IP-in-IP fault in `lab up` ----------------------------------------

README_FAULTS = """faults:
  - {host: node1, direction: in, proto: tcp, ports: "2380", action: drop}
  - {host: node2, direction: in, proto: ipip, action: drop}
"""


def _lab_up(name: str, tmp_path, *extra: str):
    import subprocess
    import sys

    faults = tmp_path / "faults.yml"
    faults.write_text(README_FAULTS)
    try:
        return subprocess.run(
            [sys.executable, "-m", "scanner", "lab", "up", "--name", name, "--hosts", "3",
             "--no-responders", "--faults", str(faults), *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        subprocess.run([sys.executable, "-m", "scanner", "lab", "down", "--name", name],
                       capture_output=True, timeout=60)  # fmt: skip


def test_lab_up_warns_about_a_fault_that_matches_no_planned_flow(lab_name: str, tmp_path) -> None:
    cp = _lab_up(lab_name, tmp_path)
    assert cp.returncode == 0, cp.stderr
    warn = [ln for ln in cp.stderr.splitlines() if "matches no planned flow" in ln]
    assert len(warn) == 1, cp.stderr
    assert "node2 in ipip" in warn[0] and "--with ipip" in warn[0]
    assert "fail node2 -> node1 tcp/2380" in cp.stdout  # the etcd fault did match


def test_lab_up_takes_the_selection_options(lab_name: str, tmp_path) -> None:
    cp = _lab_up(lab_name, tmp_path, "--with", "ipip", "--nodeport-sample", "4")
    assert cp.returncode == 0, cp.stderr
    assert "matches no planned flow" not in cp.stderr
    assert "fail node1 -> node2 ipip" in cp.stdout, cp.stdout
    assert "selection: --with ipip --nodeport-sample 4" in cp.stdout
    # 3 hosts, sampled NodePorts: far fewer than the full range's ~16,600 flows
    total = int(cp.stdout.split("ground truth (bare): ")[1].split()[0])
    assert total < 1000, cp.stdout
    bad = subprocess_run_bad_with(lab_name)
    assert bad.returncode == 2 and "--with" in bad.stderr and "Traceback" not in bad.stderr


def subprocess_run_bad_with(name: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "scanner", "lab", "up", "--name", name,
                           "--with", "nosuchfeature"], capture_output=True, text=True, timeout=60)  # fmt: skip
