"""The mesh's ssh path for real: OpenSSH's sshd inside two lab hosts, a throwaway key pair.

Each lab host runs Debian's /usr/sbin/sshd on its own address with a fresh host key and an
authorized client key made for this test; the coordinator reaches the agents through ``ssh``
exactly as it would reach real nodes (BatchMode, no known_hosts file touched).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from test_mesh import lab_catalog, write_inventory  # tests/ is on sys.path (rootdir conftest)

from scanner.engine.output import NdjsonOutput
from scanner.mesh.coordinator import MeshConfig, run_mesh
from scanner.plan.selection import SelectionOptions

pytestmark = pytest.mark.lab

SSHD = "/usr/sbin/sshd"
SSH_OPTS = (
    "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
    "-o LogLevel=ERROR -o ConnectTimeout=10"
)
SSHD_CONFIG = """\
ListenAddress {addr}
Port 22
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {dir}/sshd-{name}.pid
"""


@pytest.fixture
def ssh_lab(make_lab, tmp_path: Path):
    if (
        not os.access(SSHD, os.X_OK)
        or shutil.which("ssh") is None
        or not shutil.which("ssh-keygen")
    ):
        pytest.skip("needs OpenSSH (openssh-server and openssh-client)")
    lab = make_lab(hosts=2)
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for key in ("host_key", "client_key", "other_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    procs = []
    for h in lab.hosts:
        cfg = d / f"sshd-{h.name}.conf"
        cfg.write_text(SSHD_CONFIG.format(addr=h.addr, dir=d, name=h.name))
        procs.append(
            lab.popen(h.name, [SSHD, "-D", "-e", "-f", str(cfg)], stderr=subprocess.DEVNULL)
        )
    deadline = time.monotonic() + 10
    for h in lab.hosts:
        while ":22 " not in lab.run(h.name, ["ss", "-Htln"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, f"sshd did not start in {h.name}"
            time.sleep(0.05)
    try:
        yield lab, d
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def _mesh(
    lab, tmp: Path, template: str, agent_cmd: str = f"{sys.executable} -m scanner agent"
) -> tuple[int, list[dict], str]:
    inv = write_inventory(lab, tmp / "inv.yml")
    cat = lab_catalog(tmp / "lab.toml", ["tcp"])
    catalog, site, selection = SelectionOptions(
        inventories=(str(inv),), catalog_files=(str(cat),)
    ).resolve()
    out = tmp / f"out-{time.monotonic_ns()}.ndjson"
    err = io.StringIO()
    code = run_mesh(
        MeshConfig(
            catalog=catalog,
            site=site,
            selection=selection,
            exec_template=template,
            agent_cmd=agent_cmd,
            output=NdjsonOutput(str(out), stdout=False),
            summary_to=err,
            hello_timeout=30,
            loop="asyncio",
        )
    )
    return code, [orjson.loads(x) for x in out.read_bytes().splitlines()], err.getvalue()


def test_mesh_over_ssh(ssh_lab, tmp_path: Path) -> None:
    lab, d = ssh_lab
    code, recs, err = _mesh(lab, tmp_path, f"ssh -i {d / 'client_key'} {SSH_OPTS} {{address}}")
    summary = recs[-1]
    assert code == 0, err
    assert summary["planned"] == summary["results"] == 4  # 2 hosts x 1 peer x 2 ports
    assert summary["hosts"]["unreachable"] == []
    results = [r for r in recs if r["type"] == "result"]
    assert all((r["state"], r["reason"], r["verdict"]) == ("open", "responder", "pass")
               for r in results)  # fmt: skip
    pairs = [p for p in recs if p["type"] == "pair"]
    assert [(p["a"], p["b"], p["verdict"]) for p in pairs] == [("node1", "node2", "pass")]
    assert recs[0]["mesh"]["exec"].startswith("ssh -i ")


def test_ssh_refused_key_is_an_unreachable_host(ssh_lab, tmp_path: Path) -> None:
    lab, d = ssh_lab
    code, recs, err = _mesh(lab, tmp_path, f"ssh -i {d / 'other_key'} {SSH_OPTS} {{address}}")
    hosts = {r["name"]: r for r in recs if r["type"] == "host"}
    assert set(hosts) == {"node1", "node2"}
    assert all("Permission denied" in h["reason"] for h in hosts.values()), hosts
    summary = recs[-1]
    assert summary["planned"] == summary["results"] == 4
    assert code == 1
    # one line for the one failure both hosts share (with the host count), one hint; no
    # per-host block, no per-requirement block of the same error
    lines = err.splitlines()
    unreach = [ln for ln in lines if "unreachable:" in ln]
    assert len(unreach) == 1 and "unreachable: 2 hosts (node[1-2]): " in unreach[0], err
    assert "Permission denied" in unreach[0]
    hints = [ln for ln in lines if ln.strip().startswith("hint:")]
    assert len(hints) == 1 and "--exec" in hints[0] and "BatchMode" in hints[0], err
    assert sum("Permission denied" in ln for ln in lines) == 1, err
    assert len(lines) <= 4, err


def test_ssh_without_portmesh_on_the_host_says_what_to_do(ssh_lab, tmp_path: Path) -> None:
    """The remote shell cannot find the agent: the reason names --agent-cmd and --bundle."""
    lab, d = ssh_lab
    template = f"ssh -i {d / 'client_key'} {SSH_OPTS} {{address}}"
    code, recs, err = _mesh(lab, tmp_path, template, agent_cmd="portmesh-not-installed agent")
    hosts = {r["name"]: r for r in recs if r["type"] == "host"}
    assert set(hosts) == {"node1", "node2"}
    for h in hosts.values():
        assert "not found" in h["reason"], h
        assert "--agent-cmd" in h["reason"] and "--bundle" in h["reason"], h
    assert code == 1
