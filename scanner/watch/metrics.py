"""The Prometheus text exposition (format 0.0.4) of one watch agent (pure).

Series are O(requirements), never O(nodes): a requirement x direction gauge counts the peers
for which it fails, and the per-pair detail goes to the NDJSON event stream instead. About a
dozen fixed families; histogram buckets are few on purpose (``BUCKETS``), since each costs one
series per protocol. Hand-written rather than ``prometheus_client``: the exposition is ~80
lines, and the agent ships in an air-gapped bundle with nothing but our five dependencies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# probe round-trip buckets (seconds): LAN RTTs sit in the first two, timeouts in the last
BUCKETS = (0.001, 0.01, 0.1, 1.0)
RESULTS = ("pass", "fail", "unknown")
DIRECTIONS = ("outgoing", "incoming")


class Histogram:
    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1


class WatchMetrics:
    """Counters and gauges of one agent; ``render()`` gives the /metrics body."""

    def __init__(
        self,
        version: str,
        node: str,
        protos: Iterable[str],
        outgoing: Iterable[str] = (),
        incoming: Iterable[str] = (),
    ):
        """``outgoing``/``incoming``: the requirements this node sends / receives (witnessably);
        a direction that does not exist on this node gets no series."""
        self.version = version
        self.node = node
        self.protos = tuple(sorted(set(protos)))
        self.probes = {(p, r): 0 for p in self.protos for r in RESULTS}
        self.duration = {p: Histogram() for p in self.protos}
        self.failing = {(q, "outgoing"): 0 for q in sorted(set(outgoing))}
        self.failing.update({(q, "incoming"): 0 for q in sorted(set(incoming))})
        self.one_way = 0
        self.coverage = math.nan  # no sweep yet: no verdict on coverage (alerts stay quiet)
        self.sweep_seconds = 0.0
        self.last_sweep = 0.0
        self.rounds = 0
        self.peers = 0
        self.incoming_expected = 0
        self.incoming_silent = 0
        self.budget = 0.0
        self.schedule = ""  # schedule.fingerprint: equal on every agent of one schedule

    def probe(self, proto: str, result: str, rtt_s: float | None) -> None:
        key = (proto, result)
        if key in self.probes:
            self.probes[key] += 1
        if rtt_s is not None and proto in self.duration:
            self.duration[proto].observe(rtt_s)

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        family("portmesh_build_info", "gauge", "portmesh version of this agent (always 1).")
        out.append(f'portmesh_build_info{{version="{_esc(self.version)}"}} 1')
        if self.schedule:
            family(
                "portmesh_schedule_info",
                "gauge",
                "The schedule this agent runs (a hash of the plan, --round, --rate, --neighbours,"
                " --chunk); every agent must show the same (always 1).",
            )
            out.append(f'portmesh_schedule_info{{schedule="{_esc(self.schedule)}"}} 1')
        family("portmesh_probes_total", "counter", "Probes sent by this node, by verdict.")
        for (p, r), v in self.probes.items():
            out.append(f'portmesh_probes_total{{proto="{p}",result="{r}"}} {v}')
        family(
            "portmesh_probe_duration_seconds", "histogram", "Round-trip time of answered probes."
        )
        for p, h in self.duration.items():
            # observe() counts a value in every bucket it fits: the counts are cumulative
            for b, c in zip(BUCKETS, h.counts, strict=True):
                out.append(f'portmesh_probe_duration_seconds_bucket{{proto="{p}",le="{b}"}} {c}')
            out.append(f'portmesh_probe_duration_seconds_bucket{{proto="{p}",le="+Inf"}} {h.count}')
            out.append(f'portmesh_probe_duration_seconds_sum{{proto="{p}"}} {_num(h.sum)}')
            out.append(f'portmesh_probe_duration_seconds_count{{proto="{p}"}} {h.count}')
        family(
            "portmesh_flows_failing",
            "gauge",
            "Peers for which a requirement fails: outgoing (our probe failed) or incoming"
            " (the peer's scheduled probe never arrived).",
        )
        for (q, d), v in self.failing.items():
            out.append(f'portmesh_flows_failing{{req="{_esc(q)}",direction="{d}"}} {v}')
        family(
            "portmesh_one_way_flows",
            "gauge",
            "(requirement, peer) pairs failing outgoing while the same peer's probes arrive"
            " (which ones: the NDJSON events).",
        )
        out.append(f"portmesh_one_way_flows {self.one_way}")
        for name, v, help_ in (
            (
                "portmesh_sweep_coverage_ratio",
                self.coverage,
                "Share of this node's scheduled pair visits in the last sweep that got a verdict.",
            ),
            (
                "portmesh_sweep_seconds",
                self.sweep_seconds,
                "How long one sweep (every pair once) takes at this schedule.",
            ),
            (
                "portmesh_last_sweep_timestamp_seconds",
                self.last_sweep,
                "Unix time at which this node's last full sweep ended.",
            ),
            ("portmesh_peers", self.peers, "Ends this node has a requirement towards."),
            (
                "portmesh_incoming_peers_expected",
                self.incoming_expected,
                "Peers whose probes this node could witness in the last sweep.",
            ),
            (
                "portmesh_incoming_peers_silent",
                self.incoming_silent,
                "Of those, peers none of whose scheduled probes arrived.",
            ),
            (
                "portmesh_probe_budget_per_second",
                self.budget,
                "The probe rate this agent keeps under.",
            ),
        ):
            family(name, "gauge", help_)
            out.append(f"{name} {_num(v)}")
        family("portmesh_rounds_total", "counter", "Rounds this agent has run.")
        out.append(f"portmesh_rounds_total {self.rounds}")
        return "\n".join(out) + "\n"

    def series(self) -> int:
        """How many samples ``render`` writes (the <= 100 promise is tested on this)."""
        return sum(1 for line in self.render().splitlines() if line and not line.startswith("#"))


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
