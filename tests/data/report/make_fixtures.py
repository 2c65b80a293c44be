"""Write the report fixtures (run once; the .ndjson files are committed).

    python tests/data/report/make_fixtures.py

mesh4.ndjson: a 4-host mesh (node1..node4, 198.18.0.1-4) with exactly three faults:
  1. node3 drops tcp/10250 (k8s.kubelet) from every peer            (ingress, filtered)
  2. node2 -> node4 udp/4789 (calico.vxlan) blocked, reverse fine    (one-way)
  3. node3 rejects tcp/30100-30199 (k8s.nodeport) from node1, node2  (nodeport slice)
  everything else passes: node.ssh tcp/22, node.exporter tcp/9100, calico.bgp tcp/179,
  the rest of the swept NodePort slice tcp/30090-30209.
mixed.ndjson: two runs concatenated (a plain scan of 127.0.0.1, a check from node1), with
  damage: garbage, a JSON array, a result without 'dst', a plan 'flow' record (ignored) and a
  truncated last line.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson

HERE = Path(__file__).parent
HOSTS = {f"node{i}": f"198.18.0.{i}" for i in range(1, 5)}
NODEPORTS = range(30090, 30210)
REQS = [  # (req, proto, ports)
    ("node.ssh", "tcp", [22]),
    ("node.exporter", "tcp", [9100]),
    ("k8s.kubelet", "tcp", [10250]),
    ("calico.bgp", "tcp", [179]),
    ("calico.vxlan", "udp", [4789]),
    ("k8s.nodeport", "tcp", list(NODEPORTS)),
]
SCAN_ID = "5ca1ab1e0000a001"
_clock = itertools.count()


def ts() -> str:
    n = next(_clock)
    return f"2026-11-26T10:00:{n // 1000:02d}.{n % 1000:03d}Z"


def outcome(req: str, src: str, dst: str, port: int) -> tuple[str, str, float | None, str]:
    """(state, reason, rtt_ms, verdict): the ground truth of the faults above."""
    if req == "k8s.kubelet" and dst == "node3":
        return "filtered", "no-response", None, "fail"
    if req == "calico.vxlan" and (src, dst) == ("node2", "node4"):
        return "open|filtered", "no-response (responder saw nothing)", None, "fail"
    if (
        req == "k8s.nodeport"
        and dst == "node3"
        and src in ("node1", "node2")
        and 30100 <= port <= 30199
    ):
        return "filtered", "admin-prohibited", 0.21, "fail"
    if req == "calico.vxlan":
        return "open", "responder", 0.35, "pass"
    return "open", "responder", 0.12, "pass"


def mesh4() -> list[dict]:
    out: list[dict] = []
    results = []
    verdicts: dict[tuple[str, str, str], str] = {}
    for req, proto, ports in REQS:
        for src, dst in itertools.permutations(HOSTS, 2):
            worst = "pass"
            for port in ports:
                state, reason, rtt, verdict = outcome(req, src, dst, port)
                results.append(
                    {
                        "type": "result",
                        "scan_id": SCAN_ID,
                        "ts": "",
                        "src": HOSTS[src],
                        "dst": HOSTS[dst],
                        "host": dst,
                        "proto": proto,
                        "port": port,
                        "state": state,
                        "reason": reason,
                        "rtt_ms": rtt,
                        "attempts": 1 if verdict == "pass" else 2,
                        "src_host": src,
                        "req": req,
                        "verdict": verdict,
                    }
                )
                if verdict == "fail":
                    worst = "fail"
            verdicts[(req, src, dst)] = worst
    planned = len(results)
    out.append(
        {
            "type": "start",
            "version": 1,
            "scan_id": SCAN_ID,
            "ts": ts(),
            "argv": ["portmesh", "mesh", "--inventory", "lab.yaml", "--nodeport-sample", "120"],
            "planned": planned,
        }
    )
    for r in results:
        r["ts"] = ts()
        out.append(r)
    for req, proto, ports in REQS:
        for a, b in itertools.combinations(HOSTS, 2):
            ab, ba = verdicts[(req, a, b)], verdicts[(req, b, a)]
            v = "pass" if ab == ba == "pass" else ("fail" if ab == ba else "one-way")
            rec = {"type": "pair", "scan_id": SCAN_ID, "a": a, "b": b, "proto": proto}
            if len(ports) == 1:
                rec["port"] = ports[0]
            else:
                rec["ports"] = f"{ports[0]}-{ports[-1]}"
            rec.update({"req": req, "a_to_b": ab, "b_to_a": ba, "verdict": v})
            out.append(rec)
    states: dict[str, int] = {}
    for r in results:
        states[r["state"]] = states.get(r["state"], 0) + 1
    out.append(
        {
            "type": "summary",
            "scan_id": SCAN_ID,
            "ts": ts(),
            "planned": planned,
            "results": planned,
            "states": states,
            "elapsed_s": 1.5,
            "rate_pps": round(planned / 1.5, 1),
        }
    )
    return out


def mixed() -> bytes:
    a, b = "5ca1ab1e0000b001", "5ca1ab1e0000b002"
    lines = [
        {
            "type": "start",
            "version": 1,
            "scan_id": a,
            "ts": "2026-11-26T11:00:00.000Z",
            "argv": ["portmesh", "scan", "127.0.0.1", "-p", "22,80,443,U:53"],
            "planned": 4,
        },
        {
            "type": "result",
            "scan_id": a,
            "ts": "2026-11-26T11:00:00.010Z",
            "src": None,
            "dst": "127.0.0.1",
            "host": None,
            "proto": "tcp",
            "port": 22,
            "state": "open",
            "reason": "syn-ack",
            "rtt_ms": 0.05,
            "attempts": 1,
        },
        {
            "type": "result",
            "scan_id": a,
            "ts": "2026-11-26T11:00:00.011Z",
            "src": None,
            "dst": "127.0.0.1",
            "host": None,
            "proto": "tcp",
            "port": 80,
            "state": "filtered",
            "reason": "no-response",
            "rtt_ms": None,
            "attempts": 2,
        },
        b"this is not json\n",
        {
            "type": "result",
            "scan_id": a,
            "ts": "2026-11-26T11:00:00.012Z",
            "src": None,
            "dst": "127.0.0.1",
            "host": None,
            "proto": "tcp",
            "port": 443,
            "state": "closed",
            "reason": "conn-refused",
            "rtt_ms": 0.04,
            "attempts": 1,
        },
        {
            "type": "result",
            "scan_id": a,
            "ts": "2026-11-26T11:00:00.013Z",
            "src": None,
            "dst": "127.0.0.1",
            "host": None,
            "proto": "udp",
            "port": 53,
            "state": "open|filtered",
            "reason": "no-response",
            "rtt_ms": None,
            "attempts": 2,
        },
        b"[1, 2, 3]\n",
        {
            "type": "summary",
            "scan_id": a,
            "ts": "2026-11-26T11:00:01.000Z",
            "planned": 4,
            "results": 4,
            "states": {"open": 1, "filtered": 1, "closed": 1, "open|filtered": 1},
            "elapsed_s": 1.0,
            "rate_pps": 4.0,
        },
        {
            "type": "start",
            "version": 1,
            "scan_id": b,
            "ts": "2026-11-26T11:05:00.000Z",
            "argv": ["portmesh", "check", "--inventory", "lab.yaml", "--from", "node1"],
            "planned": 3,
        },
        {
            "type": "flow",
            "src": "198.18.0.1",
            "src_host": "node1",
            "dst": "198.18.0.2",
            "host": "node2",
            "proto": "tcp",
            "port": 6443,
            "req": "k8s.api",
        },
        {
            "type": "result",
            "scan_id": b,
            "ts": "2026-11-26T11:05:00.010Z",
            "src": "198.18.0.1",
            "dst": "198.18.0.2",
            "host": "node2",
            "proto": "tcp",
            "port": 6443,
            "state": "open",
            "reason": "syn-ack",
            "rtt_ms": 0.2,
            "attempts": 1,
            "src_host": "node1",
            "req": "k8s.api",
            "verdict": "pass",
        },
        {
            "type": "result",
            "scan_id": b,
            "ts": "2026-11-26T11:05:00.011Z",
            "src": "198.18.0.1",
            "host": "node2",
            "proto": "tcp",
            "port": 2379,
            "state": "filtered",
        },
        {
            "type": "result",
            "scan_id": b,
            "ts": "2026-11-26T11:05:00.012Z",
            "src": "198.18.0.1",
            "dst": "198.18.0.2",
            "host": "node2",
            "proto": "tcp",
            "port": 2379,
            "state": "filtered",
            "reason": "no-response",
            "rtt_ms": None,
            "attempts": 2,
            "src_host": "node1",
            "req": "etcd.client",
            "verdict": "fail",
        },
        {
            "type": "result",
            "scan_id": b,
            "ts": "2026-11-26T11:05:00.013Z",
            "src": "198.18.0.1",
            "dst": "198.18.0.3",
            "host": "node3",
            "proto": "icmp",
            "port": None,
            "state": "error",
            "reason": "needs-cap-net-raw",
            "rtt_ms": None,
            "attempts": 0,
            "src_host": "node1",
            "req": "cilium.health-icmp",
            "verdict": "unknown",
        },
        b'{"type": "summary", "scan_id": "5ca1ab1e0000b002", "planned": 3, "resu',
    ]
    return b"".join(x if isinstance(x, bytes) else orjson.dumps(x) + b"\n" for x in lines)


def main() -> None:
    (HERE / "mesh4.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in mesh4()))
    (HERE / "mixed.ndjson").write_bytes(mixed())


if __name__ == "__main__":
    main()
