"""scanner/schema.json against real output, and golden lines of the one encoder."""

from __future__ import annotations

import copy
import importlib.resources
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from scanner import SCHEMA_VERSION
from scanner.core.flows import Flow
from scanner.core.results import (
    STATES,
    VERDICTS,
    Result,
    encode,
    encode_results,
    iso_ts,
    result_dict,
    start_record,
    summary_record,
)
from scanner.engine.engine import Stats
from scanner.engine.output import NdjsonOutput
from scanner.engine.process import RunSpec, write_summary

LOCAL = "127.0.0.1"
SCAN = [sys.executable, "-m", "scanner", "scan"]
DATA = Path(__file__).parent / "data"


def load_schema() -> dict[str, Any]:
    text = importlib.resources.files("scanner").joinpath("schema.json").read_text("utf-8")
    return json.loads(text)


SCHEMA = load_schema()
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors(rec: dict[str, Any]) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(rec)]


def validate_stream(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n")
    lines = [orjson.loads(line) for line in raw.splitlines()]
    for rec in lines:
        assert errors(rec) == [], rec
    return lines


# ---- the schema itself ---------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)


def test_schema_matches_the_code() -> None:
    defs = SCHEMA["$defs"]
    assert tuple(defs["state"]["enum"]) == STATES
    assert tuple(defs["verdict"]["enum"]) == VERDICTS
    assert defs["start"]["properties"]["version"]["const"] == SCHEMA_VERSION
    # every field result_dict writes for a plain flow is required, and nothing more
    plain = result_dict(Result(Flow(LOCAL, 22), "open", "syn-ack", 0.1, 1, 0.0), "x")
    # ... but "af", added within version 1, so that older files still validate
    assert set(defs["result"]["required"]) == set(plain) - {"af"}
    full = result_dict(
        Result(Flow(LOCAL, 22, "tcp", "h", "127.0.0.2", "a", "r"), "open", "x", None, 1, 0, "pass"),
        "x",
    )
    assert set(full) <= set(defs["result"]["properties"])
    assert set(start_record("x", [], 1)) == set(defs["start"]["required"])
    assert set(summary_record("x", 1, 1, {}, 1.0)) == set(defs["summary"]["required"])


def test_every_summary_field_the_runner_writes_is_documented(tmp_path: Path) -> None:
    out = tmp_path / "s.ndjson"
    stats = Stats(
        results=3,
        states={"open": 1, "filtered": 1, "error": 1},
        attempts=5,
        retries=2,
        late_answers=1,
        answered=1,
        backoffs={"fd-exhausted": 4},
        skipped={"needs-cap-net-raw": 1},
        interrupted=True,
    )
    spec = RunSpec(
        flows=iter(()),
        planned=3,
        engine=None,  # type: ignore[arg-type]
        argv=[],
        output=NdjsonOutput(str(out), stdout=False),
    )
    summary = write_summary(spec, stats, 0.5, 64, 2)
    assert set(summary) <= set(SCHEMA["$defs"]["summary"]["properties"])
    assert {"backoffs", "skipped", "interrupted", "loss_observed"} <= set(summary)
    (line,) = validate_stream(out.read_bytes())
    assert line == summary


def test_schema_ships_with_the_package() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"*.json"' in pyproject  # package-data: scanner/*.json
    assert importlib.resources.files("scanner").joinpath("schema.json").is_file()


# ---- real output ---------------------------------------------------------------------------------


@pytest.fixture
def loopback_ports() -> Any:
    srv = socket.create_server((LOCAL, 0))
    srv.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    s = socket.socket()
    s.bind((LOCAL, 0))
    closed = s.getsockname()[1]
    s.close()
    yield srv.getsockname()[1], closed
    stop.set()
    t.join()
    srv.close()


def test_a_loopback_scan_validates(loopback_ports: tuple[int, int]) -> None:
    opened, closed = loopback_ports
    cp = subprocess.run(
        [*SCAN, LOCAL, "localhost", "-p", f"{opened},{closed},T:1-50"],
        capture_output=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    lines = validate_stream(cp.stdout)
    states = {(r["port"], r["state"]) for r in lines if r["type"] == "result"}
    assert {(opened, "open"), (closed, "closed")} <= states
    assert {r.get("host") for r in lines if r["type"] == "result"} == {None, "localhost"}


def test_an_interrupted_scan_validates() -> None:
    proc = subprocess.Popen(
        [*SCAN, LOCAL, "-p", "1-3000", "--workers", "1", "--rate", "2000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    lines = validate_stream(first + out)
    assert lines[-1]["interrupted"] is True
    assert any(r.get("reason") == "interrupted" for r in lines)


DROP_RESET_ADMIN = """
table ip pmtest {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 5003 drop
        tcp dport 5004 reject with tcp reset
        tcp dport 5005 reject with icmp type admin-prohibited
    }
}
"""


@pytest.mark.lab
def test_a_lab_scan_with_filtered_validates(make_lab: Any) -> None:
    lab = make_lab(hosts=1)
    lab.nft("node1", DROP_RESET_ADMIN)
    addr = lab.host("node1").addr
    cp = subprocess.run(
        [*SCAN, addr, "-p", "5003-5006", "--timeout", "0.3", "--method", "connect"],
        capture_output=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    lines = validate_stream(cp.stdout)
    got = {r["port"]: (r["state"], r["reason"]) for r in lines if r["type"] == "result"}
    assert got == {
        5003: ("filtered", "no-response"),
        5004: ("closed", "conn-refused"),
        5005: ("filtered", "admin-prohibited"),  # the ICMP code, from the error queue
        5006: ("closed", "conn-refused"),
    }
    assert next(r for r in lines if r.get("port") == 5003)["rtt_ms"] is None


def test_the_report_fixture_of_a_mesh_validates() -> None:
    path = DATA / "report" / "mesh4.ndjson"
    if not path.exists():
        pytest.skip("no mesh fixture in tests/data/report")
    lines = validate_stream(path.read_bytes())
    assert {r["type"] for r in lines} >= {"start", "result", "pair", "summary"}


# ---- what the schema rejects ----------------------------------------------------------------------

GOOD: dict[str, dict[str, Any]] = {
    "start": {
        "type": "start",
        "version": 1,
        "scan_id": "0123456789abcdef",
        "ts": "2023-11-14T22:13:20.500Z",
        "argv": ["portmesh", "scan"],
        "planned": 2,
    },
    "result": {
        "type": "result",
        "scan_id": "0123456789abcdef",
        "ts": "2023-11-14T22:13:20.500Z",
        "src": None,
        "dst": "198.18.0.2",
        "host": "node2",
        "proto": "tcp",
        "port": 6443,
        "state": "open",
        "reason": "syn-ack",
        "rtt_ms": 0.12,
        "attempts": 1,
    },
    "icmp": {
        "type": "result",
        "scan_id": "0123456789abcdef",
        "ts": "2023-11-14T22:13:20.500Z",
        "src": "198.18.0.1",
        "dst": "fe80::1%eth0",
        "host": None,
        "proto": "icmp",
        "port": None,
        "state": "filtered",
        "reason": "no-response",
        "rtt_ms": None,
        "attempts": 2,
        "src_host": "node1",
        "req": "calico.icmp",
        "verdict": "fail",
    },
    "summary": {
        "type": "summary",
        "scan_id": "0123456789abcdef",
        "ts": "2023-11-14T22:13:20.500Z",
        "planned": 2,
        "results": 2,
        "states": {"open": 1, "open|filtered": 1},
        "elapsed_s": 0.01,
        "rate_pps": 200.0,
        "workers": 1,
    },
    "host": {
        "type": "host",
        "scan_id": "0123456789abcdef",
        "name": "node9",
        "state": "unreachable",
        "reason": "exec failed: ssh exit 255",
    },
    "tally": {
        "type": "tally",
        "scan_id": "0123456789abcdef",
        "src_host": "node1",
        "src": "198.18.7.1",
        "host": "node2",
        "dst": "198.18.7.2",
        "req": "kubernetes.nodeport",
        "proto": "tcp",
        "af": "ipv4",
        "flows": 2766,
        "states": {"open": 2766},
        "ports": "30000-30004,30008-32767",
    },
    "pair": {
        "type": "pair",
        "scan_id": "0123456789abcdef",
        "a": "node1",
        "b": "node2",
        "proto": "udp",
        "port": 4789,
        "req": "calico.vxlan",
        "a_to_b": "fail",
        "b_to_a": "pass",
        "verdict": "one-way",
    },
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_good_records_validate(kind: str) -> None:
    assert errors(GOOD[kind]) == []


def mutate(kind: str, **change: Any) -> dict[str, Any]:
    rec = copy.deepcopy(GOOD[kind])
    for k, v in change.items():
        if v is DROP:
            del rec[k]
        else:
            rec[k] = v
    return rec


DROP = object()


@pytest.mark.parametrize(
    "rec",
    [
        {"type": "nonsense"},
        {"no": "type"},
        mutate("start", version=2),
        mutate("start", planned=-1),
        mutate("start", argv="portmesh scan"),
        mutate("start", scan_id=DROP),
        mutate("result", state="opened"),
        mutate("result", state=DROP),
        mutate("result", port=0),
        mutate("result", port=65536),
        mutate("result", port=None),  # tcp needs a port
        mutate("result", port="22"),
        mutate("result", proto="sctp"),
        mutate("result", ts="2023-11-14 22:13:20"),
        mutate("result", ts="2023-11-14T22:13:20Z"),
        mutate("result", attempts=-1),
        mutate("result", attempts=1.5),
        mutate("result", rtt_ms=-0.1),
        mutate("result", reason=""),
        mutate("result", dst="node2"),
        mutate("result", dst="999.1.1.1"),
        mutate("result", verdict="maybe"),
        mutate("result", host=""),
        mutate("icmp", port=22),  # icmp has no port
        mutate("summary", planned=DROP),
        mutate("summary", states={"weird": 1}),
        mutate("summary", states={"open": -1}),
        mutate("summary", rate_pps="fast"),
        mutate("summary", interrupted=False),
        mutate("summary", workers=0),
        mutate("summary", loss_observed=1.5),
        mutate("summary", verdicts={"maybe": 1}),
        mutate("start", check="node1"),
        mutate("host", name=DROP),
        mutate("pair", verdict="maybe"),
        mutate("pair", port=DROP),  # udp needs port or ports
        mutate("pair", a_to_b="yes"),
        mutate("pair", ports="30000-", port=DROP),
    ],
)
def test_bad_records_are_rejected(rec: dict[str, Any]) -> None:
    assert errors(rec) != []


def test_pair_with_a_port_range_and_a_portless_pair() -> None:
    assert errors(mutate("pair", port=DROP, ports="30000-32767")) == []
    assert errors(mutate("pair", port=DROP, ports=[4789, 8472])) == []
    assert errors(mutate("pair", port=DROP, proto="ipip")) == []


def test_check_extras_validate() -> None:
    assert errors(mutate("summary", verdicts={"pass": 3, "fail": 1, "unknown": 0})) == []
    assert errors(mutate("start", check={"host": "node1"}, plan={"catalog": "x.toml"})) == []


def test_extra_fields_are_allowed() -> None:
    # probes add their own fields (icmp_from, ...); readers ignore what they do not know
    assert errors(mutate("result", icmp_from="198.18.0.254", something_new=1)) == []


# ---- golden lines ---------------------------------------------------------------------------------

TS = 1700000000.5  # 2023-11-14T22:13:20.500Z
SID = "0123456789abcdef"


def test_golden_result_line() -> None:
    r = Result(Flow("198.18.0.2", 6443, "tcp", "node2"), "open", "syn-ack", 0.1234567, 1, TS)
    assert encode(result_dict(r, SID)) == (
        b'{"type":"result","scan_id":"0123456789abcdef","ts":"2023-11-14T22:13:20.500Z",'
        b'"src":null,"dst":"198.18.0.2","af":"ipv4","host":"node2","proto":"tcp","port":6443,'
        b'"state":"open","reason":"syn-ack","rtt_ms":0.123,"attempts":1}\n'
    )


def test_golden_result_line_of_a_planned_flow() -> None:
    flow = Flow("198.18.0.3", None, "icmp", "node3", "198.18.0.1", "node1", "calico.icmp")
    r = Result(flow, "filtered", "no-response", None, 3, TS, "fail", {"icmp_from": "198.18.0.9"})
    assert encode(result_dict(r, SID)) == (
        b'{"type":"result","scan_id":"0123456789abcdef","ts":"2023-11-14T22:13:20.500Z",'
        b'"src":"198.18.0.1","dst":"198.18.0.3","af":"ipv4","host":"node3","proto":"icmp","port":null,'
        b'"state":"filtered","reason":"no-response","rtt_ms":null,"attempts":3,'
        b'"src_host":"node1","req":"calico.icmp","verdict":"fail","icmp_from":"198.18.0.9"}\n'
    )


def test_golden_result_line_over_ipv6() -> None:
    r = Result(
        Flow("2001:2::2", 6443, "tcp", "node2"),
        "open",
        "syn-ack",
        0.5,
        1,
        TS,
        None,
        {"tcp_method": "connect"},
    )
    assert encode(result_dict(r, SID)) == (
        b'{"type":"result","scan_id":"0123456789abcdef","ts":"2023-11-14T22:13:20.500Z",'
        b'"src":null,"dst":"2001:2::2","af":"ipv6","host":"node2","proto":"tcp","port":6443,'
        b'"state":"open","reason":"syn-ack","rtt_ms":0.5,"attempts":1,"tcp_method":"connect"}\n'
    )
    assert errors(orjson.loads(encode(result_dict(r, SID)))) == []


def test_encode_results_is_the_lines_joined() -> None:
    rs = [
        Result(Flow(LOCAL, p), s, why, rtt, 1, TS + i)
        for i, (p, s, why, rtt) in enumerate(
            [(22, "open", "syn-ack", 0.05), (23, "closed", "conn-refused", 0.0004)]
        )
    ]
    batch = encode_results(rs, SID)
    assert batch == b"".join(encode(result_dict(r, SID)) for r in rs)
    assert batch.count(b"\n") == 2
    assert b'"rtt_ms":0.0,' in batch  # rounded to microseconds
    assert b'"ts":"2023-11-14T22:13:21.500Z"' in batch


def test_golden_start_and_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    import scanner.core.results as results

    monkeypatch.setattr(results.time, "time", lambda: TS)
    assert encode(start_record(SID, ["portmesh", "scan", "-p", "22"], 5)) == (
        b'{"type":"start","version":1,"scan_id":"0123456789abcdef",'
        b'"ts":"2023-11-14T22:13:20.500Z","argv":["portmesh","scan","-p","22"],"planned":5}\n'
    )
    rec = summary_record(SID, 5, 5, {"open": 2, "closed": 3}, 0.123456, workers=1)
    assert encode(rec) == (
        b'{"type":"summary","scan_id":"0123456789abcdef","ts":"2023-11-14T22:13:20.500Z",'
        b'"planned":5,"results":5,"states":{"open":2,"closed":3},"elapsed_s":0.1235,'
        b'"rate_pps":40.5,"workers":1}\n'
    )
    assert summary_record(SID, 0, 0, {}, 0.0)["rate_pps"] is None
    # --emit failures: the rate is over the flows decided (results + tallied), not the lines
    # written (issue 21: `"results":0,"rate_pps":0.0` after 24954 probes)
    rec = summary_record(SID, 100, 0, {"open": 100}, 2.0, emit="failures", tallied=100)
    assert rec["rate_pps"] == 50.0 and list(rec)[7] == "rate_pps"


@pytest.mark.parametrize(
    ("t", "want"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (TS, "2023-11-14T22:13:20.500Z"),
        (1700000000.25, "2023-11-14T22:13:20.250Z"),
        (1700000000.9999, "2023-11-14T22:13:20.999Z"),  # truncated, never rounded up to :21
        (1700000039.0, "2023-11-14T22:13:59.000Z"),
        (1700000040.0, "2023-11-14T22:14:00.000Z"),  # the cached second prefix moves on
        (951782400.0, "2000-02-29T00:00:00.000Z"),
    ],
)
def test_iso_ts(t: float, want: str) -> None:
    assert iso_ts(t) == want


@pytest.mark.parametrize(
    ("t", "want"),
    [
        (1700000000.123, "2023-11-14T22:13:20.123Z"),
        (1700000000.001, "2023-11-14T22:13:20.001Z"),
    ],
)
def test_iso_ts_keeps_the_milliseconds_given(t: float, want: str) -> None:
    assert iso_ts(t) == want
