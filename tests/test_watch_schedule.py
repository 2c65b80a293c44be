"""The watch schedule (pure): coverage of every ordered pair, the inverse the receivers use,
range windows, and the metrics' series bound at 1,000 nodes."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from scanner.catalog import load_catalog
from scanner.core.model import Cluster, Host, Site
from scanner.plan.planner import legs
from scanner.plan.selection import Selection
from scanner.watch import schedule
from scanner.watch.metrics import WatchMetrics


def site(n: int, cps: int = 3) -> Site:
    hosts = []
    for i in range(n):
        roles = {"node", "control_plane", "etcd"} if i < cps else {"node", "worker"}
        a = 18 + (i >> 16)
        hosts.append(
            Host(f"node{i + 1}", f"198.{a}.{(i >> 8) & 255}.{i & 255}", frozenset(roles), "c1")
        )
    return Site(clusters=(Cluster("c1", "worker", tuple(hosts)),))


def topo(n: int) -> schedule.Topology:
    return schedule.Topology.from_legs(legs(load_catalog(), site(n), Selection()))


@pytest.mark.parametrize(("n", "k"), [(2, 16), (3, 1), (5, 2), (17, 16), (20, 16), (50, 7)])
def test_every_ordered_pair_is_visited_once_per_sweep(n: int, k: int) -> None:
    t = topo(n)
    per = schedule.rounds_per_sweep(t.n, k)
    assert per == math.ceil((t.n - 1) / min(k, t.n - 1))
    for a in range(t.n):
        seen = [p for r in range(per) for p, _ in schedule.visits(t, a, r, k)]
        assert a not in seen
        assert set(seen) == set(range(t.n)) - {a}
        # no pair twice in a sweep but at the wrap of the last round
        assert len(seen) - len(set(seen)) < min(k, t.n - 1)


@pytest.mark.parametrize(("n", "k"), [(5, 2), (20, 16), (33, 4)])
def test_visitors_is_the_inverse_of_visits(n: int, k: int) -> None:
    t = topo(n)
    for r in range(7):
        forward = {(a, b, v) for a in range(t.n) for b, v in schedule.visits(t, a, r, k)}
        backward = {(a, b, v) for b in range(t.n) for a, v in schedule.visitors(t, b, r, k)}
        assert forward == backward


def test_peers_are_not_neighbours_in_name_order() -> None:
    t = topo(40)
    first = [p for p, _ in schedule.visits(t, 0, 0, 8)]
    assert first != list(range(1, 9))


def test_range_windows_cover_the_range() -> None:
    ports = tuple(range(30000, 32768))
    seen: set[int | None] = set()
    for v in range(math.ceil(len(ports) / 8)):
        seen.update(schedule.window(ports, v, 8))
    assert seen == set(ports)
    assert schedule.window((22, 6443), 5, 8) == (22, 6443)


def test_round_flows_and_expected_incoming_agree() -> None:
    t = topo(12)
    k, chunk = 4, 8
    for r in range(3):
        sent = {
            (f.src_host, f.host, f.req, f.port)
            for me in t.names
            for f in schedule.round_flows(t, me, r, k, chunk)
        }
        expected = {
            (src, me, need.req, p)
            for me in t.names
            for src, need, ports in schedule.expected_incoming(t, me, r, k, chunk)
            for p in ports
        }
        assert sent == expected


def test_metric_series_stay_under_100_at_1000_nodes() -> None:
    t = topo(1000)
    me = "node1"  # a control-plane node: the most requirements
    peers = t.peers_of(me)
    sources = t.sources_of(me)
    reqs = {n.req for p in peers for n in t.needs(me, p)} | {
        n.req for s in sources for n in t.needs(s, me)
    }
    protos = {n.proto for p in peers for n in t.needs(me, p)}
    m = WatchMetrics("0", me, protos, reqs)
    assert m.series() <= 100, m.series()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_exposition_passes_promtool() -> None:
    m = WatchMetrics("0.1.0", "node1", {"tcp", "udp"}, {"etcd.peer", "kubelet"})
    m.probe("tcp", "pass", 0.0004)
    m.probe("udp", "fail", None)
    m.failing[("kubelet", "incoming")] = 3
    m.coverage = 0.75
    p = subprocess.run(
        ["promtool", "check", "metrics"], input=m.render(), capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout + p.stderr
