"""The watch schedule (pure): coverage of every ordered pair, the inverse the receivers use,
range windows, and the metrics' series bound at 1,000 nodes."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def worst_series(t: schedule.Topology) -> int:
    """The most samples any agent of the topology would export (as the agent builds them)."""
    most = 0
    for me in t.names:
        out = {n.req: n.proto for p in t.peers_of(me) for n in t.needs(me, p)}
        inn = {n.req: n.proto for s in t.sources_of(me) for n in t.needs(s, me)}
        m = WatchMetrics(
            "0",
            me,
            set(out.values()),
            outgoing=set(out),
            incoming={q for q, proto in inn.items() if proto in ("tcp", "udp")},
        )
        m.schedule = "0123456789ab"  # the agent always sets it (schedule.fingerprint)
        most = max(most, m.series())
    return most


def test_metric_series_stay_under_100_at_1000_nodes() -> None:
    t = topo(1000)
    names = t.names
    t = schedule.Topology(names[:40], t.addrs[:40], t.legs, t.perm[:39])  # every role is here
    assert worst_series(t) <= 100


@pytest.mark.parametrize(
    ("cni", "features"),
    [(None, ()), ("cilium", ()), ("cilium", ("metallb", "kube-vip", "wireguard", "bgp", "typha"))],
)
def test_metric_series_stay_under_100_on_a_multi_cluster_site(cni, features) -> None:
    from pathlib import Path

    from scanner.plan.selection import SelectionOptions

    site_file = Path(__file__).parent / "data" / "inventories" / "site" / "site.yml"
    catalog, st, sel = SelectionOptions(
        inventories=(str(site_file),), cni=cni, with_features=features
    ).resolve()
    assert worst_series(schedule.Topology.from_legs(legs(catalog, st, sel))) <= 100


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_exposition_passes_promtool() -> None:
    m = WatchMetrics("0.1.0", "node1", {"tcp", "udp"}, {"etcd.peer", "kubelet"})
    m.probe("tcp", "pass", 0.0004)
    m.probe("udp", "fail", None)
    m.failing[("kubelet", "incoming")] = 3
    m.coverage = 0.75
    m.schedule = "0123456789ab"
    p = subprocess.run(
        ["promtool", "check", "metrics"], input=m.render(), capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout + p.stderr


def test_watch_and_respond_share_their_responder_options(monkeypatch, tmp_path) -> None:
    """One definition of --as/--bind/--secret/--secret-file for respond and watch, and watch's
    tuning options reach WatchConfig from one table (no option list repeated in a signature)."""
    from click.testing import CliRunner

    from scanner.commands import respond, watch
    from scanner.watch import agent

    def opts(cmd) -> dict:
        return {p.name: (p.opts, p.metavar, p.default) for p in cmd.params}

    w, r = opts(watch.command), opts(respond.command)
    for name in ("as_host", "bind", "secret", "secret_file"):
        assert w[name] == r[name], name
    got = {}
    monkeypatch.setattr(agent, "run_watch", lambda cfg: got.setdefault("cfg", cfg) and 0)
    monkeypatch.setattr(watch, "NdjsonOutput", lambda *a, **k: None)
    inv = tmp_path / "inv.yml"
    inv.write_text("all:\n  hosts:\n    node1: {ip: 198.18.9.1}\n    node2: {ip: 198.18.9.2}\n"
                   "  children:\n    kube_node:\n      hosts: {node1: null, node2: null}\n")  # fmt: skip
    sec = tmp_path / "secret"
    sec.write_text("s3cret-s3cret-s3cret\n")
    res = CliRunner().invoke(watch.command, [
        "-i", str(inv), "--as", "node1", "--secret-file", str(sec), "--round", "7",
        "--rate", "3", "--neighbours", "2", "--chunk", "5", "--timeout", "0.5",
        "--bind", "127.0.0.1",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = got["cfg"]
    assert (cfg.round_seconds, cfg.rate, cfg.neighbours, cfg.chunk, cfg.timeout, cfg.bind) == (
        7.0, 3.0, 2, 5, 0.5, "127.0.0.1"
    )
    assert cfg.me == "node1"


@pytest.mark.parametrize(
    ("now", "probes", "ok"),
    [
        (150.0, 200, True),  # on time: 10 s of probes in a 15 s round
        (151.5, 200, True),  # the most jitter: they all leave in the round's first 0.8
        (152.1, 200, False),  # a late start or restart: the visit would be cut short
        (170.0, 0, False),  # woken after the round ended (a pause, a clock step)
    ],
)
def test_a_round_that_cannot_be_probed_whole_is_skipped(now, probes, ok) -> None:
    assert schedule.fits(10, 15.0, now, probes, 20.0) is ok


DUAL = """
all:
  hosts:
    node1: {ip: 198.18.0.1, ip6: "2001:2::1"}
    node2: {ip: 198.18.0.2, ip6: "2001:2::2"}
  children:
    kube_control_plane: {hosts: {node1: {}}}
    etcd: {hosts: {node1: {}}}
    kube_node: {hosts: {node2: {}}}
    k8s_cluster: {children: {kube_control_plane: {}, kube_node: {}}}
  vars:
    calico_vxlan_mode_ipv6: Always
    calico_wireguard_enabled: true
"""


@pytest.mark.parametrize(
    ("extra", "unwatched", "addrs"),
    [
        # dual stack: every end is probed at its main (IPv4) address; the IPv6 legs are listed,
        # never probed at the IPv4 address as if they were checked
        (
            "    enable_dual_stack_networks: true\n",
            (("calico.vxlan", "ipv6"), ("calico.wireguard6", "ipv6")),
            ("198.18.0.1", "198.18.0.2"),
        ),
        # IPv4 only: nothing left out
        ("", (), ("198.18.0.1", "198.18.0.2")),
    ],
)
def test_a_leg_at_another_address_is_listed_not_probed(tmp_path, extra, unwatched, addrs) -> None:
    from scanner.plan.inventory import load_site

    inv = tmp_path / "hosts.yml"
    inv.write_text(DUAL + extra)
    t = schedule.Topology.from_legs(legs(load_catalog(), load_site([str(inv)]), Selection()))
    assert t.unwatched == unwatched
    assert t.addrs == addrs
    # what is folded is probed at the main addresses only
    flows = [f for me in t.names for r in range(3) for f in schedule.round_flows(t, me, r, 16, 8)]
    assert flows and {f.dst for f in flows} <= set(addrs)
    assert "calico.wireguard6" not in {f.req for f in flows}


def test_the_schedule_fingerprint_is_the_schedules_and_only_its() -> None:
    """Equal for the same plan and settings in any process (string hashing is salted per
    process: the fingerprint must not depend on it), different when anything the schedule is
    computed from differs."""
    code = (
        "from tests.test_watch_schedule import topo\n"
        "from scanner.watch import schedule\n"
        "print(schedule.fingerprint(topo(7), 15.0, 16, 8))\n"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    base = schedule.fingerprint(topo(7), 15.0, 16, 8)
    assert seen == {base} and len(base) == 12
    others = {
        schedule.fingerprint(topo(7), 16.0, 16, 8),  # another round length (--round, --rate)
        schedule.fingerprint(topo(7), 15.0, 2, 8),  # --neighbours
        schedule.fingerprint(topo(7), 15.0, 16, 4),  # --chunk
        schedule.fingerprint(topo(8), 15.0, 16, 8),  # another inventory
    }
    assert base not in others and len(others) == 4
