"""The nftables fix script, applied for real in a lab namespace, opens exactly the failing flow.

node2 drops tcp/PORT in its own ``inet filter input`` chain. node1's and node3's connects fail;
only node1's failure is in the report's input, so the fix must let node1 through and keep
node3 out (source restriction). A rerun of node1's probe then passes and the report exits 0.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from scanner.report import ReportConfig, run_report

pytestmark = pytest.mark.lab

PORT = 7443
LISTEN = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""
CONNECT = r"""
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open syn-ack")
except TimeoutError:
    print("filtered no-response")
except ConnectionRefusedError:
    print("closed conn-refused")
except OSError as e:
    print("filtered", e.__class__.__name__)
"""
DROP = f"""
table inet filter {{
  chain input {{
    type filter hook input priority 0; policy accept;
    tcp dport {PORT} drop
  }}
}}
"""


def probe(lab, src, dst, timeout: float = 0.5) -> dict:
    """One real TCP connect from ``src`` to ``dst``, as a check-style result record."""
    cp = lab.run(
        src.name,
        [sys.executable, "-c", CONNECT, dst.addr, str(PORT), str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    state, reason = cp.stdout.split(maxsplit=1)
    return {
        "type": "result",
        "scan_id": "lab-fix",
        "ts": "2026-11-26T12:00:00.000Z",
        "src": src.addr,
        "dst": dst.addr,
        "host": dst.name,
        "proto": "tcp",
        "port": PORT,
        "state": state,
        "reason": reason.strip(),
        "rtt_ms": None,
        "attempts": 1,
        "src_host": src.name,
        "req": "lab.tcp",
        "verdict": "pass" if state in ("open", "closed") else "fail",
    }


def report(tmp_path: Path, records: list[dict], **kw) -> tuple[int, str]:
    path = tmp_path / "results.ndjson"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    out = io.BytesIO()
    code = run_report(ReportConfig(inputs=[str(path)], **kw), out, io.StringIO())
    return code, out.getvalue().decode()


def test_nft_fix_applied_in_the_lab_makes_the_rerun_pass(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=3)
    n1, n2, n3 = lab.hosts
    listener = lab.popen(
        n2.name, [sys.executable, "-c", LISTEN, str(PORT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        assert probe(lab, n1, n2)["state"] == "open"  # the lab works before the fault

        lab.nft(n2.name, DROP)
        first = probe(lab, n1, n2)
        assert first["state"] == "filtered" and first["verdict"] == "fail"
        assert probe(lab, n3, n2)["state"] == "filtered"

        code, script = report(tmp_path, [first], fix="nftables")
        assert code == 0  # an export
        fix = tmp_path / "fix.sh"
        fix.write_text(script)
        assert f"ip saddr {{ {n1.addr} }} tcp dport {{ {PORT} }} accept" in script

        # run node2's section inside node2, exactly as a person would on the host
        cp = lab.run(n2.name, ["sh", str(fix), n2.name], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        ruleset = lab.run(n2.name, ["nft", "list", "chain", "inet", "filter", "input"],
                          capture_output=True, text=True).stdout  # fmt: skip
        assert ruleset.index("accept") < ruleset.index("drop")  # inserted before the drop

        rerun = probe(lab, n1, n2)
        assert rerun["state"] == "open" and rerun["verdict"] == "pass"
        assert probe(lab, n3, n2)["state"] == "filtered"  # not among the failing sources
        code, text = report(tmp_path, [rerun])
        assert code == 0 and "FAIL" not in text

        # auto: the section is picked by the host's own address; a second run adds a second rule
        cp = lab.run(n2.name, ["sh", str(fix), "auto"], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        cp = lab.run(n1.name, ["sh", str(fix), "auto"], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 1 and "no section" in cp.stderr
    finally:
        listener.terminate()
        listener.wait(timeout=10)


def test_nft_fix_refuses_a_missing_chain(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=2)
    n1, n2 = lab.hosts
    rec = {"type": "result", "scan_id": "x", "src": n1.addr, "src_host": n1.name, "dst": n2.addr,
           "host": n2.name, "proto": "tcp", "port": PORT, "state": "filtered",
           "reason": "no-response", "req": "lab.tcp", "verdict": "fail"}  # fmt: skip
    _, script = report(tmp_path, [rec], fix="nftables", nft_table="inet nosuch")
    fix = tmp_path / "fix.sh"
    fix.write_text(script)
    cp = lab.run(n2.name, ["sh", str(fix), n2.name], capture_output=True, text=True, timeout=30)
    assert cp.returncode != 0
    assert "no chain inet nosuch input on this host" in cp.stderr
    # the message names the table to use: a lab's faults are in 'inet portmesh'
    lab.nft(n2.name, "table inet portmesh {\n chain input {\n type filter hook input priority 0;\n }\n}\n")
    cp = lab.run(n2.name, ["sh", str(fix), n2.name], capture_output=True, text=True, timeout=30)
    assert cp.returncode != 0
    assert "(chain input is in: --nft-table 'inet portmesh')" in cp.stderr, cp.stderr


def test_multi_homed_source_warning_and_fix_use_the_real_address(make_lab, tmp_path: Path) -> None:
    """Review of issue 19, items 3 and 5: node2 reaches node1 from a second address (.102) and
    node3 from its inventory address. ``check --from node2`` run on node2 itself warns in words
    that fit (not "another machine"), records .102, and ``report --fix`` opens .102 - the
    address the failing packets carried - in node1's drop; the rerun passes."""
    import yaml

    from scanner.catalog import load_catalog
    from scanner.lab.lab import inventory_doc

    lab = make_lab(hosts=3)
    n1, n2, n3 = lab.hosts
    second = n2.addr.rsplit(".", 1)[0] + ".102"
    lab.run(n2.name, ["ip", "addr", "add", f"{second}/24", "dev", "eth0"], check=True)
    lab.run(n2.name, ["ip", "route", "add", f"{n1.addr}/32", "dev", "eth0", "src", second],
            check=True)  # fmt: skip
    lab.nft(n1.name, DROP)
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab), sort_keys=False))
    cat = tmp_path / "c.toml"  # only lab.tcp: every packaged requirement disabled
    cat.write_text(
        "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
        + f'[[requirement]]\nid = "lab.tcp"\ncomponent = "lab"\nproto = "tcp"\nports = "{PORT}"\n'
        'description = "lab tcp"\ndst_role = "node"\nsrc_roles = ["node"]\nsrc_scope = "cluster"\n'
    )
    argv = [sys.executable, "-m", "scanner", "check", "-i", str(inv), "--catalog", str(cat),
            "--from", n2.name]  # fmt: skip
    cp = lab.run(n2.name, argv, capture_output=True, text=True, timeout=120)
    recs = [orjson.loads(x) for x in cp.stdout.splitlines()]
    res = {r["host"]: r for r in recs if r["type"] == "result"}
    assert (res[n1.name]["src"], res[n1.name]["verdict"]) == (second, "fail"), res
    assert (res[n3.name]["src"], res[n3.name]["verdict"]) == (n2.addr, "pass"), str(res[n3.name])
    (warning,) = [x for x in cp.stderr.splitlines() if "warning" in x]
    assert second in warning and "through another of its addresses" in warning, warning

    results = tmp_path / "check.ndjson"
    results.write_text(cp.stdout)
    code = run_report(ReportConfig(inputs=[str(results)], fix="nftables"),
                      out := io.BytesIO(), io.StringIO())  # fmt: skip
    script = out.getvalue().decode()
    assert code == 0  # an export: written is success (docs/report.md)
    assert f"ip saddr {{ {second} }} tcp dport {{ {PORT} }} accept" in script, script
    fix = tmp_path / "fix.sh"
    fix.write_text(script)
    done = lab.run(n1.name, ["sh", str(fix), n1.name], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    cp = lab.run(n2.name, argv, capture_output=True, text=True, timeout=120)
    recs = [orjson.loads(x) for x in cp.stdout.splitlines()]
    assert {r["verdict"] for r in recs if r["type"] == "result"} == {"pass"}, recs
