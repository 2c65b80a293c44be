"""`portmesh report`: reader, aggregate, grouped text, ECS, fix scripts, CLI, memory."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.errors import InputError
from scanner.report import ReportConfig, aggregate, run_report
from scanner.report.aggregate import (
    MAX_RANGES,
    Aggregate,
    PortSet,
    compress_names,
    derive_verdict,
    port_label,
)
from scanner.report.ecs import ECS_FIELDS, REQUIRED, flatten, to_ecs
from scanner.report.fix import parse_nft_table, render_fix
from scanner.report.reader import ReadStats, iter_lines
from scanner.report.text import render_text

DATA = Path(__file__).parent / "data" / "report"
MESH4 = DATA / "mesh4.ndjson"
MIXED = DATA / "mixed.ndjson"
UPDATE = os.environ.get("PORTMESH_UPDATE_GOLDEN") == "1"


def report(*inputs: Path | str, **kw) -> tuple[int, str, str]:
    out, err = io.BytesIO(), io.StringIO()
    code = run_report(ReportConfig(inputs=[str(p) for p in inputs], **kw), out, err)
    return code, out.getvalue().decode(), err.getvalue()


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scanner", "report", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )


# ---- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "expect"),
    [
        ([], []),
        ([5], [(5, 5)]),
        ([3, 1, 2], [(1, 3)]),
        ([1, 3, 5, 2, 4], [(1, 5)]),
        ([10, 12, 11, 20, 30, 29], [(10, 12), (20, 20), (29, 30)]),
        ([65535, 0], [(0, 0), (65535, 65535)]),
        (list(range(30000, 32768)), [(30000, 32767)]),
        ([7, 7, 7], [(7, 7)]),
    ],
)
def test_portset_ranges(ports: list[int], expect: list[tuple[int, int]]) -> None:
    ps = PortSet(ports)
    assert list(ps.ranges()) == expect
    assert ps.count == len(set(ports))


@given(st.lists(st.integers(0, 65535), max_size=400))
@settings(max_examples=150, deadline=None)
def test_portset_is_exact_in_both_representations(ports: list[int]) -> None:
    ps = PortSet(ports)
    expanded = [p for a, b in ps.ranges() for p in range(a, b + 1)]
    assert expanded == sorted(set(ports))
    assert ps.count == len(set(ports))
    assert all(p in ps for p in ports)


def test_portset_switches_to_a_bounded_bitmap() -> None:
    ps = PortSet(range(0, 4 * MAX_RANGES, 2))  # 2*MAX_RANGES disjoint single ports
    assert ps._bits is not None and len(ps._bits) == 8192 and not ps._lo
    assert list(ps.ranges())[:2] == [(0, 0), (2, 2)]
    ps.add(1)
    assert list(ps.ranges())[0] == (0, 2)


@pytest.mark.parametrize(
    ("names", "expect"),
    [
        (["node1", "node2", "node3", "node5"], "node[1-3,5]"),
        (["node1"], "node1"),
        (["master", "node2", "node1"], "master, node[1-2]"),
        (["w01", "w02"], "w01, w02"),  # zero-padded: listed, not compressed (w[1-2] would lie)
        (["a10", "a9", "b1"], "a[9-10], b1"),
    ],
)
def test_compress_names(names: list[str], expect: str) -> None:
    assert compress_names(names) == expect


def test_compress_names_cuts_long_lists() -> None:
    assert compress_names([f"h{i}x" for i in range(20)], limit=3).endswith("(+17 more)")


@pytest.mark.parametrize(
    ("rec", "verdict"),
    [
        ({"state": "open"}, "pass"),
        ({"state": "closed"}, "pass"),
        ({"state": "filtered"}, "fail"),
        ({"state": "open|filtered"}, "unknown"),
        ({"state": "error"}, "unknown"),
        ({"state": "weird"}, "unknown"),
        ({"state": "closed", "verdict": "fail"}, "fail"),  # check --expect listening
        ({"state": "open|filtered", "verdict": "fail"}, "fail"),  # mesh: responder saw nothing
        ({"state": "filtered", "verdict": "bogus"}, "fail"),  # unknown verdict word: derive
    ],
)
def test_derive_verdict(rec: dict, verdict: str) -> None:
    assert derive_verdict(rec) == verdict


@pytest.mark.parametrize(
    ("proto", "ports", "expect"),
    [
        ("icmp", [], "icmp"),
        ("tcp", [10250], "tcp/10250"),
        ("udp", [4789, 8472], "udp/4789,8472"),
        ("tcp", range(30100, 30200), "tcp/30100-30199"),
    ],
)
def test_port_label(proto: str, ports, expect: str) -> None:
    assert port_label(proto, PortSet(ports)) == expect


# ---- reader -----------------------------------------------------------------------------


def _lines(*items: bytes) -> list[bytes]:
    return list(items)


def test_reader_counts_damage_with_line_numbers_and_tolerates_a_truncated_tail() -> None:
    good = orjson.dumps(
        {"type": "result", "dst": "127.0.0.1", "proto": "tcp", "port": 1, "state": "open"}
    )
    stream = [good + b"\n", b"garbage\n", b"\n", b"[]\n", good + b"\n", b'{"type":"res']
    stats = ReadStats()
    recs = list(iter_lines("x", stream, stats))
    assert len(recs) == 2 and stats.records == 2
    assert stats.malformed == 2
    assert [(n, why) for _, n, why in stats.bad] == [(2, "not JSON"), (4, "not a JSON object")]
    assert stats.truncated == "x:6"


def test_reader_a_broken_line_with_newline_at_the_end_is_malformed_not_truncated() -> None:
    stats = ReadStats()
    assert list(iter_lines("x", [b'{"type":"res\n'], stats)) == []
    assert stats.malformed == 1 and stats.truncated is None


@given(st.lists(st.binary(max_size=60), max_size=30))
@settings(max_examples=200, deadline=None)
def test_reader_never_raises_on_garbage(chunks: list[bytes]) -> None:
    stats = ReadStats()
    lines = [c.replace(b"\n", b"") + b"\n" for c in chunks]
    recs = list(iter_lines("g", lines, stats))
    Aggregate().feed(recs)  # whatever passed the reader must aggregate without error
    assert stats.lines == len(lines)
    assert stats.records + stats.malformed + stats.ignored <= len(lines)


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["result", "pair", "host", "start", "summary"]),
                "dst": st.one_of(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1)),
                "proto": st.sampled_from(["tcp", "udp", "icmp", "ipip"]),
                "state": st.sampled_from(["open", "closed", "filtered", "error", "x"]),
                "port": st.one_of(st.none(), st.integers(-5, 70000)),
                "a": st.text(max_size=3),
                "b": st.text(max_size=3),
                "name": st.text(max_size=3),
                "verdict": st.sampled_from(["pass", "fail", "unknown", "one-way", None]),
                "a_to_b": st.sampled_from(["pass", "fail", None, 3]),
                "ports": st.one_of(
                    st.none(), st.text(max_size=12), st.lists(st.integers(-(2**63), 2**63 - 1))
                ),
            }
        ),
        max_size=20,
    )
)
@settings(max_examples=150, deadline=None)
def test_every_view_survives_odd_but_parseable_records(recs: list[dict]) -> None:
    lines = [orjson.dumps(r) + b"\n" for r in recs]
    stats = ReadStats()
    agg = Aggregate().feed(iter_lines("h", lines, stats))
    list(render_text(agg, stats))
    render_fix(agg, "nftables")
    render_fix(agg, "iptables")
    render_fix(agg, "firewalld")
    from scanner.report.html import render_html

    render_html(agg, stats)


# ---- text report ------------------------------------------------------------------------


def test_text_golden_mesh4() -> None:
    code, text, _ = report(MESH4)
    golden = DATA / "mesh4.txt"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()
    assert code == 1


def test_text_names_exactly_the_injected_faults() -> None:
    _, text, _ = report(MESH4)
    fail_headers = sorted(ln.split()[1] for ln in text.splitlines() if ln.startswith("FAIL "))
    assert fail_headers == ["calico.vxlan", "k8s.kubelet", "k8s.nodeport"]
    findings = [
        ln.strip() for ln in text.splitlines() if ln.startswith("  ") and "->" in ln or "from" in ln
    ]
    assert "node3 drops tcp/10250 from every peer" in text
    assert "one-way: node2 -> node4 udp/4789 dropped, node4 -> node2 fine" in text
    assert "node3: tcp/30100-30199 rejected from node[1-2] (2 of 3 sources" in text
    # one line per fault, not one per failing direction or per port
    fault_lines = [ln for ln in text.splitlines() if ln.startswith("  ") and ln[2:3] != " "]
    fault_lines = [ln for ln in fault_lines if not ln.strip().startswith(("a =", "b =", "c ="))]
    assert len(fault_lines) == 3, fault_lines
    assert "UNKNOWN" not in text
    assert "pass: 3 requirements: calico.bgp, node.exporter, node.ssh" in text
    assert findings  # sanity


def test_text_matrix_marks_the_failing_directions() -> None:
    _, text, _ = report(MESH4)
    rows = {ln.split()[1]: ln.split()[2] for ln in text.splitlines() if ln[:4].strip().isdigit()}
    # columns node1..node4; a = calico.vxlan, b = k8s.kubelet, 2 = kubelet + nodeport
    assert rows == {"node1": "-.2.", "node2": ".-2a", "node3": "..-.", "node4": "..b-"}


def test_mixed_runs_are_grouped_by_scan_id_and_damage_is_reported() -> None:
    code, text, _ = report(MIXED)
    assert code == 1
    assert "2 runs" in text.splitlines()[0]
    runs = [ln for ln in text.splitlines() if ln.startswith("run ")]
    assert [r.split()[1].rstrip(":") for r in runs] == ["5ca1ab1e0000b001", "5ca1ab1e0000b002"]
    assert "3 malformed line(s) skipped" in text
    assert "mixed.ndjson:4: not JSON" in text and "mixed.ndjson:12: result without 'dst'" in text
    assert "truncated last line ignored (" in text and "mixed.ndjson:15)" in text
    # plain scan: requirement key proto/port, filtered -> fail, closed -> pass, open|filtered -> unknown
    assert "FAIL tcp/80  1 of 1 directions fail" in text
    assert "UNKNOWN udp/53" in text
    assert "pass: 2 requirements: tcp/22, tcp/443" in text
    assert "node1 -> node2: tcp/2379 dropped" in text
    assert "unknown: node1 -> node3 icmp (error: needs-cap-net-raw)" in text
    assert "no summary record" in text  # the check run was cut short


def _mesh(hosts: int, faults: dict[tuple[str, str], str], req: str = "k8s.kubelet") -> list[bytes]:
    names = [f"node{i}" for i in range(1, hosts + 1)]
    out = []
    for s in names:
        for d in names:
            if s == d:
                continue
            state = faults.get((s, d), "open")
            out.append(
                orjson.dumps(
                    {
                        "type": "result",
                        "scan_id": "x",
                        "src": f"198.18.1.{names.index(s) + 1}",
                        "src_host": s,
                        "dst": f"198.18.1.{names.index(d) + 1}",
                        "host": d,
                        "proto": "tcp",
                        "port": 10250,
                        "state": state,
                        "reason": "no-response" if state == "filtered" else "syn-ack",
                        "req": req,
                    }
                )
                + b"\n"
            )
    return out


def _text(lines: list[bytes]) -> str:
    agg = Aggregate().feed(iter_lines("t", lines, ReadStats()))
    return "\n".join(render_text(agg))


@pytest.mark.parametrize(
    ("faults", "expect"),
    [
        (
            {("node1", "node2"): "filtered", ("node2", "node1"): "filtered"},
            "node1 <-> node2: tcp/10250 dropped both ways",
        ),
        (
            {("node5", f"node{i}"): "filtered" for i in range(1, 9) if i != 5},
            "node5 cannot reach tcp/10250 on any peer (7 destinations",
        ),
        (
            {("node1", "node5"): "filtered", ("node2", "node5"): "filtered"},
            "node5: tcp/10250 dropped from node[1-2] (2 of 7 sources",
        ),
        (
            {("node3", "node6"): "filtered"},
            "one-way: node3 -> node6 tcp/10250 dropped, node6 -> node3 fine",
        ),
    ],
)
def test_grouping_shapes(faults: dict, expect: str) -> None:
    text = _text(_mesh(8, faults))
    assert expect in text, text
    finding_lines = [
        ln for ln in text.splitlines() if ln.startswith("  ") and not ln.startswith("   ")
    ]
    finding_lines = [ln for ln in finding_lines if " = " not in ln and "warning:" not in ln]
    assert len(finding_lines) == 1, finding_lines


def test_300_hosts_one_bad_host_is_one_line_and_the_matrix_is_capped() -> None:
    faults = {(f"node{i}", "node7"): "filtered" for i in range(1, 301) if i != 7}
    # plus scattered single faults involving many hosts, to exceed the matrix cap
    faults.update({(f"node{i}", f"node{i + 100}"): "filtered" for i in range(101, 161)})
    text = _text(_mesh(300, faults))
    assert "node7 drops tcp/10250 from every peer (299 sources: node[1-6,8-300]" in text
    assert "more findings (see --format html)" in text
    assert "more hosts involved in failures not shown" in text
    assert max(len(ln) for ln in text.splitlines()) < 400
    assert len(text.splitlines()) < 80


def test_pair_records_alone_still_give_the_one_way_finding() -> None:
    pair = {"type": "pair", "scan_id": "p", "a": "node1", "b": "node2", "proto": "udp",
            "port": 4789, "req": "calico.vxlan", "a_to_b": "fail", "b_to_a": "pass",
            "verdict": "one-way"}  # fmt: skip
    agg = Aggregate().feed(iter_lines("p", [orjson.dumps(pair) + b"\n"], ReadStats()))
    text = "\n".join(render_text(agg))
    assert "one-way: node1 -> node2 udp/4789" in text
    assert agg.failures == 1


def test_unreachable_hosts_are_listed() -> None:
    host = {"type": "host", "scan_id": "u", "name": "node9", "state": "unreachable",
            "reason": "exec failed: ssh exit 255"}  # fmt: skip
    lines = [orjson.dumps(host) + b"\n", *_mesh(2, {})]
    text = _text(lines)
    assert "unreachable: node9 (exec failed: ssh exit 255)" in text


def test_no_failure_exits_0(tmp_path: Path) -> None:
    p = tmp_path / "ok.ndjson"
    p.write_bytes(b"".join(_mesh(3, {})))
    code, text, _ = report(p)
    assert code == 0
    assert "FAIL" not in text and "pass: 1 requirement: k8s.kubelet" in text


# ---- ECS --------------------------------------------------------------------------------


def _doc_table() -> dict[str, str]:
    """The mapping table of docs/report.md: ECS field -> source description."""
    doc = Path(__file__).parent.parent / "docs" / "report.md"
    rows = {}
    in_table = False
    for ln in doc.read_text().splitlines():
        if ln.startswith("| ECS field"):
            in_table = True
            continue
        if in_table:
            if not ln.startswith("|"):
                break
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if set(cells[0]) <= {"-", " "}:
                continue
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_ecs_mapping_is_documented() -> None:
    assert _doc_table().keys() == ECS_FIELDS.keys()


def test_ecs_output_matches_the_documented_mapping() -> None:
    code, out, _ = report(MESH4, MIXED, fmt="ecs")
    assert code == 0  # an export exits 0 once written, failures or not (issue 20)
    events = [orjson.loads(ln) for ln in out.splitlines()]
    assert len(events) == 1500 + 7  # every valid result record, nothing else
    documented = _doc_table()
    outcomes = set()
    for ev in events:
        flat = flatten(ev)
        assert set(flat) <= documented.keys(), set(flat) - documented.keys()
        for f in REQUIRED:
            assert f in flat, f
        for f, v in flat.items():
            assert isinstance(v, ECS_FIELDS[f][0]), (f, v)
        assert ev["event"]["kind"] == "event"
        assert ev["event"]["category"] == ["network"] and ev["event"]["type"] == ["connection"]
        assert all(isinstance(v, str) for v in ev["labels"].values())
        outcomes.add(ev["event"]["outcome"])
    assert outcomes == {"success", "failure", "unknown"}


def test_ecs_field_values_for_one_record() -> None:
    rec = {"type": "result", "scan_id": "s1", "ts": "2026-11-26T10:00:00.001Z",
           "src": "198.18.0.2", "dst": "198.18.0.4", "host": "node4", "proto": "udp",
           "port": 4789, "state": "open|filtered", "reason": "no-response", "rtt_ms": 1.25,
           "attempts": 2, "src_host": "node2", "req": "calico.vxlan", "verdict": "fail"}  # fmt: skip
    ev = to_ecs(rec)
    assert ev["@timestamp"] == "2026-11-26T10:00:00.001Z"
    assert ev["source"] == {"ip": "198.18.0.2", "address": "node2"}
    assert ev["destination"] == {"address": "node4", "ip": "198.18.0.4", "port": 4789}
    assert ev["network"] == {"transport": "udp", "iana_number": "17", "type": "ipv4"}
    assert ev["event"]["outcome"] == "failure" and ev["event"]["reason"] == "no-response"
    assert ev["event"]["duration"] == 1_250_000
    assert ev["rule"]["id"] == ev["rule"]["name"] == "calico.vxlan"
    assert ev["labels"] == {"scan_id": "s1", "state": "open|filtered", "verdict": "fail",
                            "proto": "udp", "attempts": "2"}  # fmt: skip
    assert ev["agent"]["name"] == "node2"


@pytest.mark.parametrize(
    ("proto", "dst", "transport", "iana"),
    [("icmp", "198.18.0.1", "icmp", "1"), ("icmp", "::1", "ipv6-icmp", "58"),
     ("ipip", "198.18.0.1", "ipv4", "4"), ("tcp", "::1", "tcp", "6")],
)  # fmt: skip
def test_ecs_transport(proto: str, dst: str, transport: str, iana: str) -> None:
    ev = to_ecs({"type": "result", "dst": dst, "proto": proto, "port": None, "state": "open"})
    assert ev["network"]["transport"] == transport and ev["network"]["iana_number"] == iana
    assert "port" not in ev["destination"] and "source" not in ev
    assert ev["rule"]["id"] == proto and ev["rule"]["ruleset"] == "portmesh-scan"


# ---- fix scripts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "nftables",
            [
                "run nft insert rule inet filter input 'ip saddr { 198.18.0.1, 198.18.0.2, 198.18.0.4 } tcp dport { 10250 } accept comment \"portmesh k8s.kubelet\"'",
                "run nft insert rule inet filter input 'ip saddr { 198.18.0.1, 198.18.0.2 } tcp dport { 30100-30199 } accept comment \"portmesh k8s.nodeport\"'",
                "run nft insert rule inet filter input 'ip saddr { 198.18.0.2 } udp dport { 4789 } accept comment \"portmesh calico.vxlan\"'",
            ],
        ),
        (
            "iptables",
            [
                "run iptables -I INPUT -p tcp -s 198.18.0.1,198.18.0.2,198.18.0.4 --dport 10250 -m comment --comment 'portmesh k8s.kubelet' -j ACCEPT",
                "run iptables -I INPUT -p tcp -s 198.18.0.1,198.18.0.2 -m multiport --dports 30100:30199 -m comment --comment 'portmesh k8s.nodeport' -j ACCEPT",
                "run iptables -I INPUT -p udp -s 198.18.0.2 --dport 4789 -m comment --comment 'portmesh calico.vxlan' -j ACCEPT",
            ],
        ),
        (
            "firewalld",
            [
                f'run firewall-cmd --permanent ${{ZONE:+--zone="$ZONE"}} --add-rich-rule=\'rule family="ipv4" source address="198.18.0.{i}" port port="10250" protocol="tcp" accept\''
                for i in (1, 2, 4)
            ]
            + [
                f'run firewall-cmd --permanent ${{ZONE:+--zone="$ZONE"}} --add-rich-rule=\'rule family="ipv4" source address="198.18.0.{i}" port port="30100-30199" protocol="tcp" accept\''
                for i in (1, 2)
            ]
            + [
                'run firewall-cmd --permanent ${ZONE:+--zone="$ZONE"} --add-rich-rule=\'rule family="ipv4" source address="198.18.0.2" port port="4789" protocol="udp" accept\'',
                "run firewall-cmd --reload",
                "run firewall-cmd --reload",
            ],
        ),
    ],
)
def test_fix_opens_exactly_the_failing_flows(kind: str, expected: list[str]) -> None:
    code, script, _ = report(MESH4, fix=kind)
    assert code == 0  # an export
    cmds = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("run ")]
    assert sorted(cmds) == sorted(expected)
    # grouped per destination host: node3 (kubelet, nodeport) then node4 (vxlan)
    sections = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("# node")]
    assert sections == ["# node3 (198.18.0.3)", "# node4 (198.18.0.4)"]


@pytest.mark.parametrize("kind", ["nftables", "iptables", "firewalld"])
def test_fix_script_is_valid_shell_and_dry_runs(kind: str, tmp_path: Path) -> None:
    _, script, _ = report(MESH4, fix=kind)
    path = tmp_path / "fix.sh"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1"}
    cp = subprocess.run(["sh", str(path), "node4"], capture_output=True, text=True, env=env)
    assert cp.returncode == 0, cp.stderr
    printed = [ln for ln in cp.stdout.splitlines() if ln.startswith("+ ")]
    assert printed and all("4789" in ln or "reload" in ln for ln in printed)
    listed = subprocess.run(["sh", str(path), "--list"], capture_output=True, text=True)
    assert listed.stdout.split() == ["node3", "node4"]
    bad = subprocess.run(["sh", str(path), "node1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_fix_skips_closed_ports_and_unsourced_flows_are_open_to_any(tmp_path: Path) -> None:
    recs = [
        {"type": "start", "scan_id": "c", "argv": ["portmesh", "check", "--expect", "listening"]},
        {"type": "result", "scan_id": "c", "dst": "198.18.0.9", "host": "db1", "proto": "tcp",
         "port": 5432, "state": "closed", "reason": "conn-refused", "verdict": "fail",
         "src": "198.18.0.1", "src_host": "app1", "req": "pg"},
        {"type": "result", "scan_id": "c", "dst": "198.18.0.9", "host": "db1", "proto": "tcp",
         "port": 22, "state": "filtered", "reason": "no-response"},
        {"type": "result", "scan_id": "c", "dst": "198.18.0.9", "host": "db1", "proto": "icmp",
         "port": None, "state": "filtered", "reason": "no-response"},
    ]  # fmt: skip
    p = tmp_path / "c.ndjson"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    _, script, _ = report(p, fix="nftables")
    assert "# not opened: pg: tcp/5432 from app1 answered closed: nothing listens" in script
    assert "5432 }" not in script
    assert "'meta nfproto ipv4 tcp dport { 22 } accept comment \"portmesh tcp/22\"'" in script
    assert "'meta nfproto ipv4 icmp type echo-request accept comment \"portmesh icmp\"'" in script
    assert "icmpv6 type echo-request" in script


def test_fix_opens_a_closed_fail_when_the_run_did_not_check_for_listeners(tmp_path: Path) -> None:
    """mesh with responders: 'closed' where our responder should answer is a firewall's reject."""
    rec = {"type": "result", "scan_id": "m", "src": "198.18.0.1", "src_host": "node1",
           "dst": "198.18.0.2", "host": "node2", "proto": "tcp", "port": 179, "state": "closed",
           "reason": "conn-refused", "req": "calico.bgp", "verdict": "fail"}  # fmt: skip
    p = tmp_path / "m.ndjson"
    p.write_bytes(orjson.dumps(rec) + b"\n")
    code, script, _ = report(p, fix="nftables")
    assert code == 0
    assert "'ip saddr { 198.18.0.1 } tcp dport { 179 } accept" in script
    _, text, _ = report(p)
    assert (
        "one-way" not in text and "node1 -> node2: tcp/179 rejected (closed: conn-refused)" in text
    )


def test_fix_uses_the_addresses_the_failing_flows_left_from(tmp_path: Path) -> None:
    """Review of issue 19, item 3: a multi-homed node1 reaches node2 from .1 (passes) and node3
    from .101 (fails): the rule for node3 opens .101, the address the failing packets carried,
    not the first address seen for node1."""
    base = {"type": "result", "scan_id": "m", "src_host": "node1", "proto": "tcp", "port": 2380,
            "req": "etcd.peer"}  # fmt: skip
    recs = [
        {**base, "src": "198.18.0.1", "dst": "198.18.0.2", "host": "node2", "state": "open",
         "reason": "responder", "verdict": "pass"},
        {**base, "src": "198.18.0.101", "dst": "198.18.0.3", "host": "node3",
         "state": "filtered", "reason": "no-response", "verdict": "fail"},
        {**base, "src": "198.18.0.1", "dst": "198.18.0.4", "host": "node4",
         "state": "filtered", "reason": "no-response", "verdict": "fail"},
    ]  # fmt: skip
    p = tmp_path / "m.ndjson"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    for kind, want in (("nftables", "ip saddr { 198.18.0.101 } tcp dport { 2380 }"),
                       ("iptables", "-s 198.18.0.101 --dport 2380")):  # fmt: skip
        code, script, _ = report(p, fix=kind)
        assert code == 0  # an export: written is success
        node3 = script[script.index("# node3") : script.index("# node4")]
        assert want in node3, node3
        assert (
            "198.18.0.1 " not in node3 and "198.18.0.1," not in node3 and "198.18.0.1}" not in node3
        )
        node4 = script[script.index("# node4") :]
        assert want.replace("0.101", "0.1") in node4


def test_fix_leaves_a_send_the_source_itself_refused_to_the_source(tmp_path: Path) -> None:
    """Review of issue 15: node1's own output chain refuses udp/51821 over IPv6 (EPERM:
    local-prohibited) to node2 and node3; node3 also drops it from node2 over IPv6. An input
    rule on node2 would change nothing for node1's flow: node1's section says where to look
    (per family), node3's opens only node2's address."""
    base = {"type": "result", "scan_id": "m", "proto": "udp", "port": 51821,
            "req": "calico.wireguard6", "af": "ipv6", "verdict": "fail"}  # fmt: skip
    a = {f"node{i}": f"2001:2::{i}" for i in (1, 2, 3)}
    local = {"state": "filtered", "reason": "local-prohibited"}
    recs = [
        {**base, **local, "src_host": "node1", "src": a["node1"], "host": h, "dst": a[h]}
        for h in ("node2", "node3")
    ] + [
        {**base, "src_host": "node2", "src": a["node2"], "host": "node3", "dst": a["node3"],
         "state": "open|filtered", "reason": "no-response"},
    ]  # fmt: skip
    p = tmp_path / "m.ndjson"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    code, script, _ = report(p, fix="iptables")
    assert code == 0
    rules = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("run ")]
    assert rules == [
        "run ip6tables -I INPUT -p udp -s 2001:2::2 --dport 51821 -m comment --comment "
        "'portmesh calico.wireguard6' -j ACCEPT"
    ]
    node1 = script[script.index("# node1") : script.index("# node3")]
    assert (
        "# not opened: calico.wireguard6 over IPv6: udp/51821 to node[2-3]: refused by the "
        "output rules of this host itself (local-prohibited" in node1
    )
    assert "ip6tables -S OUTPUT" in node1 and "nothing to open" in node1
    assert "# node2" not in script  # nothing reached node2's input side to open
    # the text names where it was refused: node1 itself, not the destination
    one_way = [{**recs[0], "host": "node2", "dst": a["node2"]},
               {**recs[0], "src_host": "node2", "src": a["node2"], "host": "node1",
                "dst": a["node1"], "state": "open", "reason": "responder", "verdict": "pass"}]
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in one_way))
    _, text, _ = report(p)
    assert (
        "one-way: node1 -> node2 udp/51821 refused by node1's own output rules, node2 -> node1 "
        "fine (filtered: local-prohibited)" in text
    ), text


def test_fix_with_nothing_failed_says_so() -> None:
    agg = Aggregate().feed(iter_lines("t", _mesh(2, {}), ReadStats()))
    assert "# nothing failed: nothing to open" in render_fix(agg, "nftables")


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("inet filter", ("inet", "filter")),
        ("filter", ("inet", "filter")),
        ("ip nat_x", ("ip", "nat_x")),
    ],
)
def test_parse_nft_table(spec: str, expect: tuple[str, str]) -> None:
    assert parse_nft_table(spec) == expect


@pytest.mark.parametrize("spec", ["", "bridge filter", "inet a b", "inet fil;ter", "inet $x"])
def test_parse_nft_table_rejects(spec: str) -> None:
    with pytest.raises(InputError, match="--nft-table"):
        parse_nft_table(spec)


def test_fix_uses_the_given_table_and_chain() -> None:
    _, script, _ = report(MESH4, fix="nftables", nft_table="ip fw", nft_chain="in_hosts")
    assert "run nft insert rule ip fw in_hosts 'ip saddr { 198.18.0.2 } udp dport" in script


# ---- CLI: input sources and exit codes --------------------------------------------------


def test_cli_reads_stdin() -> None:
    cp = cli(stdin=MESH4.read_bytes())
    assert cp.returncode == 1, cp.stderr
    assert b"node3 drops tcp/10250 from every peer" in cp.stdout


def test_cli_dash_and_several_files() -> None:
    cp = cli("-", str(MIXED), stdin=MESH4.read_bytes())
    assert cp.returncode == 1
    assert cp.stdout.decode().splitlines()[0].startswith("portmesh report: 3 runs")


def test_cli_clean_input_exits_0(tmp_path: Path) -> None:
    p = tmp_path / "ok.ndjson"
    p.write_bytes(b"".join(_mesh(3, {})))
    assert cli(str(p)).returncode == 0


@pytest.mark.parametrize(
    ("args", "stdin", "msg"),
    [
        (["/nonexistent/x.ndjson"], b"", b"cannot read /nonexistent/x.ndjson"),
        (["--format", "pdf", "x"], b"", b"--format"),
        (["--fix", "pf", "x"], b"", b"--fix"),
        (["--nft-table", "bridge x", "-"], b"", b"--nft-table"),
        (
            ["-"],
            b"garbage\nmore garbage\n",
            b"no portmesh records in <stdin> (2 lines, 2 malformed",
        ),
        (["-"], b"", b"no portmesh records"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], stdin: bytes, msg: bytes) -> None:
    cp = cli(*args, stdin=stdin)
    assert cp.returncode == 2, cp
    assert msg in cp.stderr
    assert cp.stderr.count(b"\n") == 1 and b"Traceback" not in cp.stderr


def test_cli_writes_output_file_and_fix_is_executable(tmp_path: Path) -> None:
    out = tmp_path / "fix.sh"
    cp = cli("--fix", "nftables", "-o", str(out), str(MESH4))
    assert cp.returncode == 0 and cp.stdout == b""
    assert out.read_text().startswith("#!/bin/sh") and os.access(out, os.X_OK)
    assert [p.name for p in tmp_path.iterdir()] == ["fix.sh"]  # no temporary left behind


def test_cli_gzip_input(tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "m.ndjson.gz"
    p.write_bytes(gzip.compress(MESH4.read_bytes()))
    cp = cli(str(p))
    assert cp.returncode == 1 and b"node3 drops tcp/10250" in cp.stdout


# ---- memory -----------------------------------------------------------------------------


def _big_input(path: Path, hosts: int, ports: int) -> int:
    """A NodePort sweep: every pair x ``ports`` ports; node5 drops the whole sweep."""
    n = 0
    with path.open("wb") as fh:
        buf = []
        for s in range(1, hosts + 1):
            for d in range(1, hosts + 1):
                if s == d:
                    continue
                bad = d == 5
                for port in range(30000, 30000 + ports):
                    buf.append(
                        orjson.dumps(
                            {
                                "type": "result",
                                "scan_id": "big",
                                "ts": "2026-11-26T10:00:00.000Z",
                                "src": f"198.18.2.{s}",
                                "dst": f"198.18.2.{d}",
                                "host": f"node{d}",
                                "proto": "tcp",
                                "port": port,
                                "state": "filtered" if bad else "open",
                                "reason": "no-response" if bad else "syn-ack",
                                "rtt_ms": None if bad else 0.1,
                                "attempts": 1,
                                "src_host": f"node{s}",
                                "req": "k8s.nodeport",
                                "verdict": "fail" if bad else "pass",
                            },
                            option=orjson.OPT_APPEND_NEWLINE,
                        )  # fmt: skip
                    )
                    n += 1
                if len(buf) > 10000:
                    fh.write(b"".join(buf))
                    buf.clear()
        fh.write(b"".join(buf))
    return n


def test_memory_stays_bounded_on_200k_lines(tmp_path: Path) -> None:
    path = tmp_path / "big.ndjson"
    lines = _big_input(path, hosts=20, ports=527)  # 380 directions x 527 ports
    assert lines >= 200_000
    tracemalloc.start()
    try:
        agg, stats = aggregate([str(path)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.records == lines
    # the file is ~60 MB and a list of its records would take hundreds of MB; the aggregate is
    # 380 cells and a few port ranges
    assert peak < 8 * 1024 * 1024, peak
    text = "\n".join(render_text(agg, stats))
    assert "node5 drops tcp/30000-30526 from every peer (19 sources: node[1-4,6-20]" in text


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_pipe_from_a_writer_process() -> None:
    """`producer | portmesh report`: the report reads a pipe as it is written."""
    producer = subprocess.Popen(["cat", str(MESH4)], stdout=subprocess.PIPE)
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "report", "--format", "ecs"],
        stdin=producer.stdout,
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    producer.stdout.close()  # type: ignore[union-attr]
    producer.wait()
    assert cp.returncode == 0  # an export
    assert len(cp.stdout.splitlines()) == 1500


def test_exports_exit_0_the_text_report_1_on_failures(tmp_path: Path) -> None:
    """Issue 20: html, ecs and --fix are exports: 0 once written; the text report says 1."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scanner", "report", str(MESH4), *args],
                              capture_output=True, timeout=60)  # fmt: skip

    assert cli().returncode == 1
    html_out = tmp_path / "r.html"
    assert cli("--format", "html", "-o", str(html_out)).returncode == 0 and html_out.stat().st_size
    assert cli("--format", "ecs").returncode == 0
    assert cli("--fix", "nftables").returncode == 0
    assert cli("--format", "html", "--bogus").returncode == 2


def test_duplicate_results_of_one_run_are_warned_about(tmp_path: Path) -> None:
    """Issue 20: a truncated copy and the full file of one run: more results than planned."""
    lines = MESH4.read_bytes().splitlines(keepends=True)
    part = tmp_path / "part.ndjson"
    part.write_bytes(b"".join(lines[:200]))
    code, text, _ = report(part, MESH4)
    assert "duplicate" in text, text[:1500]
    warn = next(ln for ln in text.splitlines() if "duplicate" in ln)
    assert "results" in warn and "planned" in warn and "fed twice" in warn, warn
    _, once, _ = report(MESH4)
    assert "duplicate" not in once


def test_html_header_quotes_the_command(tmp_path: Path) -> None:
    """Issue 20: the header shows the command as it must be typed (shlex.join)."""
    start = {"type": "start", "scan_id": "q", "argv": ["portmesh", "mesh", "-i", "inv.yml",
             "--exec", "ip netns exec nu2-{name}"], "planned": 1}  # fmt: skip
    res = {"type": "result", "scan_id": "q", "src": "198.18.0.1", "src_host": "node1",
           "dst": "198.18.0.2", "host": "node2", "proto": "tcp", "port": 22, "state": "open",
           "reason": "syn-ack", "req": "node.ssh", "verdict": "pass"}  # fmt: skip
    p = tmp_path / "q.ndjson"
    p.write_bytes(orjson.dumps(start) + b"\n" + orjson.dumps(res) + b"\n")
    code, page, _ = report(p, fmt="html")
    assert code == 0
    assert "portmesh mesh -i inv.yml --exec 'ip netns exec nu2-{name}'" in page
    assert "run.command" in page and '(run.argv || []).join(" ")' not in page


def _listening_run(tmp_path: Path) -> Path:
    """check --expect listening from three hosts: node4 has nothing on tcp/10250 (closed)."""
    recs = [{"type": "start", "scan_id": "L", "argv": ["portmesh", "check", "-i", "h.yml",
             "--expect", "listening"], "planned": 3}]  # fmt: skip
    for i in (1, 2, 3):
        recs.append({"type": "result", "scan_id": "L", "src": f"198.18.0.{i}",
                     "src_host": f"node{i}", "dst": "198.18.0.4", "host": "node4",
                     "proto": "tcp", "port": 10250, "state": "closed", "reason": "reset",
                     "req": "k8s.kubelet", "verdict": "fail"})  # fmt: skip
    p = tmp_path / "listening.ndjson"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return p


def test_expect_listening_text_says_nothing_listens_without_contradiction(tmp_path: Path) -> None:
    code, text, _ = report(_listening_run(tmp_path))
    assert code == 1
    line = next(ln.strip() for ln in text.splitlines() if "node4" in ln and "10250" in ln)
    assert line == (
        "node4: nothing listening on tcp/10250 (closed, seen from every peer "
        "(3 sources: node[1-3]))"
    ), line
    assert "rejected" not in text and "rejects" not in text


def test_fix_with_nothing_to_open_writes_no_reload(tmp_path: Path) -> None:
    p = _listening_run(tmp_path)
    for kind in ("firewalld", "nftables", "iptables"):
        code, script, _ = report(p, fix=kind)
        assert code == 0
        assert "firewall-cmd --reload" not in script and "nft list chain" not in script, kind
        assert "not opened: k8s.kubelet" in script and "node4: nothing to open" in script
        f = tmp_path / f"fix-{kind}.sh"
        f.write_text(script)
        assert subprocess.run(["sh", "-n", str(f)]).returncode == 0
        cp = subprocess.run(["sh", str(f), "node4"], capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1"})  # fmt: skip
        assert cp.returncode == 0 and "nothing to open" in cp.stdout, cp


def test_natural_host_order_in_the_check_summary_and_the_report(tmp_path: Path) -> None:
    """Issue 20: node2 before node10 everywhere, not string order."""
    from scanner.core.model import natural_key
    from scanner.engine.check import Failures

    names = ["node1", "node10", "node11", "node2"]
    assert sorted(names, key=natural_key) == ["node1", "node2", "node10", "node11"]
    f = Failures()
    for n in names:
        f({"verdict": "fail", "req": "k8s.kubelet", "host": n, "dst": f"198.18.0.{n[4:]}",
           "proto": "tcp", "port": 10250, "state": "filtered", "reason": "no-response"})  # fmt: skip
    order = [ln.split("-> ")[1].split(" ")[0] for ln in f.lines()]
    assert order == ["node1", "node2", "node10", "node11"], f.lines()


def test_ipv6_failures_are_named_alike_in_check_and_report(tmp_path: Path) -> None:
    """Issue 21: check's stderr, report and mesh all say "calico.vxlan over IPv6"; the
    --fix rule's comment is the requirement id alone (its addresses say the family)."""
    from scanner.engine.check import Failures

    rec = {"type": "result", "scan_id": "v6", "verdict": "fail", "req": "calico.vxlan",
           "af": "ipv6", "src_host": "node1", "src": "2001:2::1", "host": "node5",
           "dst": "2001:2::5", "proto": "udp", "port": 4789, "state": "open|filtered",
           "reason": "no-response"}  # fmt: skip
    f = Failures()
    f(rec)
    f({**rec, "af": "ipv4", "src": "198.18.0.1", "dst": "198.18.0.5"})
    lines = f.lines()
    assert len(lines) == 2
    assert any(ln.startswith("FAIL calico.vxlan over IPv6 ") and "node5 (2001:2::5)" in ln
               for ln in lines), lines  # fmt: skip
    assert any(ln.startswith("FAIL calico.vxlan ") and "over IPv6" not in ln for ln in lines)
    p = tmp_path / "v6.ndjson"
    p.write_bytes(orjson.dumps(rec) + b"\n")
    _, text, _ = report(p)
    assert "calico.vxlan over IPv6" in text
    _, script, _ = report(p, fix="nftables")
    assert 'comment "portmesh calico.vxlan"' in script and "over_IPv6" not in script


def test_report_header_counts_failed_pairs(tmp_path: Path) -> None:
    pair = {"type": "pair", "scan_id": "p", "a": "node1", "b": "node2", "proto": "tcp",
            "port": 2380, "req": "etcd.peer", "af": "ipv4"}  # fmt: skip
    recs = [
        {**pair, "a_to_b": "fail", "b_to_a": "fail", "verdict": "fail"},
        {**pair, "b": "node3", "a_to_b": "fail", "b_to_a": "pass", "verdict": "one-way"},
        {**pair, "b": "node4", "a_to_b": "pass", "b_to_a": "pass", "verdict": "pass"},
    ]
    p = tmp_path / "pairs.ndjson"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    _, text, _ = report(p)
    assert text.splitlines()[0].endswith("3 pair records (1 failed, 1 one-way)"), text


def test_ecs_says_when_the_input_tallies_passing_flows(tmp_path: Path) -> None:
    """Issue 21: from an --emit failures run ECS holds only the listed results: one stderr
    line says how many passing flows were counted, not listed; none for a full run."""
    res = {"type": "result", "scan_id": "t", "src_host": "node1", "src": "198.18.0.1",
           "host": "node2", "dst": "198.18.0.2", "proto": "tcp", "port": 2380,
           "req": "etcd.peer", "state": "filtered", "reason": "no-response", "verdict": "fail"}  # fmt: skip
    tally = {"type": "tally", "scan_id": "t", "src_host": "node1", "src": "198.18.0.1",
             "host": "node2", "dst": "198.18.0.2", "req": "kubernetes.nodeport", "proto": "tcp",
             "af": "ipv4", "flows": 2768, "states": {"open": 2768}, "ports": "30000-32767"}  # fmt: skip
    p = tmp_path / "f.ndjson"
    p.write_bytes(orjson.dumps(res) + b"\n" + orjson.dumps(tally) + b"\n")
    code, out, err = report(p, fmt="ecs")
    assert code == 0 and len(out.splitlines()) == 1
    assert err.count("\n") == 1 and "2768 passing flows" in err and "counted, not listed" in err
    q = tmp_path / "all.ndjson"
    q.write_bytes(orjson.dumps(res) + b"\n")
    assert report(q, fmt="ecs")[2] == ""


def test_a_local_refusal_is_never_grouped_with_the_destinations_own_drop(tmp_path: Path) -> None:
    """node1's own output rules refuse udp/4789 to node2; node2 drops it from node3. Two
    findings: one names node1's output rules, one node2's drop; no group blames node2 for both
    (a review found "node2: udp/4789 rejected from node[1,3]")."""
    base = {"type": "result", "scan_id": "m", "proto": "udp", "port": 4789,
            "req": "calico.vxlan", "af": "ipv4", "verdict": "fail", "host": "node2",
            "dst": "198.18.0.2"}  # fmt: skip
    recs = [
        {**base, "src_host": "node1", "src": "198.18.0.1", "state": "filtered",
         "reason": "local-prohibited"},
        {**base, "src_host": "node3", "src": "198.18.0.3", "state": "open|filtered",
         "reason": "no-response"},
    ]  # fmt: skip
    p = tmp_path / "m.ndjson"
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    _, text, _ = report(p)
    lines = [ln for ln in text.splitlines() if "udp/4789" in ln]
    assert not any("node[1,3]" in ln or "node1,3" in ln for ln in lines), text
    assert any("refused by node1's own output rules" in ln for ln in lines), text
    assert any("node3" in ln and "own output" not in ln for ln in lines), text
