"""`portmesh watch` end to end: agents in lab namespaces, a real Prometheus scraping them, a
fault injected with nftables mid-run; the metric and the alerts fire and clear. Also the
shipped rules under `promtool test rules`, the manifests under kubernetes-validate, and the
command's bad-input paths."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from scanner.watch import manifests

ROOT = Path(__file__).resolve().parent.parent
PORT = 9470


def portmesh(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scanner", *args], capture_output=True, text=True, cwd=ROOT, **kw
    )


# ---- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hosts", "127.0.0.1,127.0.0.2", "--as", "127.0.0.1"], "must share a secret"),
        (
            ["--hosts", "127.0.0.1,127.0.0.2", "--as", "nope", "--secret", "s"],
            "no host named 'nope'",
        ),
        (
            [
                "--hosts",
                "127.0.0.1,127.0.0.2",
                "--as",
                "127.0.0.1",
                "--secret",
                "s",
                "--metrics",
                "9470",
            ],
            "not HOST:PORT",
        ),
        (
            [
                "--hosts",
                "127.0.0.1,127.0.0.2",
                "--as",
                "127.0.0.1",
                "--secret",
                "s",
                "--round",
                "0",
            ],
            "--round",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    p = portmesh("watch", *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_watch_on_loopback_serves_metrics(tmp_path: Path) -> None:
    # two "hosts" on 127.0.0.1/127.0.0.2; ports above 1024 only (no privilege needed)
    cat = tmp_path / "cat.toml"
    cat.write_text(
        '[[requirement]]\nid = "test.a"\ncomponent = "t"\nproto = "tcp"\nports = "47001"\n'
        'description = "t"\ndst_role = "node"\nsrc_roles = ["node"]\n'
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scanner",
            "watch",
            "--hosts",
            "127.0.0.1,127.0.0.2",
            "--as",
            "127.0.0.1",
            "--secret",
            "s",
            "--bind",
            "127.0.0.1",
            "--round",
            "1",
            "--rounds",
            "3",
            "--metrics",
            f"127.0.0.1:{mport}",
            "--catalog",
            str(cat),
            "--without",
            "vxlan",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    body = ""
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                body = (
                    urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2)
                    .read()
                    .decode()
                )
                if "portmesh_rounds_total 2" in body or "portmesh_rounds_total 3" in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert 'portmesh_build_info{version="' in body
    assert 'portmesh_flows_failing{req="test.a",direction="outgoing"}' in body
    recs = [json.loads(line) for line in out.splitlines()]
    assert recs[0]["type"] == "watch_start" and recs[-1]["type"] == "watch_exit"
    # 127.0.0.2 has no agent: our probe of test.a got an RST (reachable: pass), never a fail
    changes = [r for r in recs if r["type"] == "watch"]
    assert any(r["peer"] == "127.0.0.2" and r["to"] == "pass" for r in changes), changes


# ---- shipped rules and manifests ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_shipped_rules_pass_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(portmesh("watch", "rules").stdout)
    p = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    (tmp_path / "test.yml").write_text(RULE_TESTS)
    p = subprocess.run(
        ["promtool", "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert p.returncode == 0, p.stdout + p.stderr


RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 30s
tests:
  - interval: 30s
    input_series:
      - series: 'portmesh_flows_failing{req="k8s.kubelet",direction="outgoing",instance="n1:9470",job="portmesh-watch"}'
        values: '0 0 1 1 1 1 1 1 0 0'
      - series: 'portmesh_flows_failing{req="k8s.kubelet",direction="outgoing",instance="n3:9470",job="portmesh-watch"}'
        values: '0 0 1 1 1 1 1 1 0 0'
      - series: 'portmesh_flows_failing{req="calico.vxlan",direction="incoming",instance="n5:9470",job="portmesh-watch"}'
        values: '0 0 0 0 0 0 0 0 1 1 1 1 1 1'
      - series: 'portmesh_one_way_flows{instance="n1:9470",job="portmesh-watch"}'
        values: '0 0 1 1 1 1 1 1 0 0'
      - series: 'portmesh_incoming_peers_expected{instance="n2:9470",job="portmesh-watch"}'
        values: '9 9 9 9 9 9 9 9 9 9'
      - series: 'portmesh_incoming_peers_silent{instance="n2:9470",job="portmesh-watch"}'
        values: '0 0 8 8 8 8 8 8 0 0'
      - series: 'up{instance="n4:9470",job="portmesh-watch"}'
        values: '1 1 0 0 0 0 0 0 1 1'
      - series: 'portmesh_sweep_coverage_ratio{instance="n1:9470",job="portmesh-watch"}'
        values: '1 1 1 1 1 1 1 1 1 1'
      - series: 'portmesh_last_sweep_timestamp_seconds{instance="n1:9470",job="portmesh-watch"}'
        values: '0 30 60 90 120 150 180 210 240 270'
      - series: 'portmesh_sweep_seconds{instance="n1:9470",job="portmesh-watch"}'
        values: '30 30 30 30 30 30 30 30 30 30'
      - series: 'portmesh_sweep_coverage_ratio{instance="n6:9470",job="portmesh-watch"}'
        values: 'NaN NaN NaN NaN NaN NaN NaN NaN NaN NaN'
      # a 23-minute sweep (1,000 nodes): 40 minutes since the last one is not stale
      - series: 'portmesh_last_sweep_timestamp_seconds{instance="n7:9470",job="portmesh-watch"}'
        values: '1x20'
      - series: 'portmesh_sweep_seconds{instance="n7:9470",job="portmesh-watch"}'
        values: '1380x20'
      # a rolling update: n3 comes back at 6m with another schedule than n1 and n2
      - series: 'portmesh_schedule_info{schedule="aaa",instance="n1:9470",job="portmesh-watch"}'
        values: '1x30'
      - series: 'portmesh_schedule_info{schedule="aaa",instance="n2:9470",job="portmesh-watch"}'
        values: '1x30'
      - series: 'portmesh_schedule_info{schedule="aaa",instance="n3:9470",job="portmesh-watch"}'
        values: '1 1 1 1 1 1 1 1 1 1 1 1 stale'
      - series: 'portmesh_schedule_info{schedule="bbb",instance="n3:9470",job="portmesh-watch"}'
        values: '_ _ _ _ _ _ _ _ _ _ _ _ 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 1m
        alertname: PortmeshRequirementFailing
        exp_alerts: []
      - eval_time: 5m
        alertname: PortmeshScheduleMismatch
        exp_alerts: []
      - eval_time: 12m
        alertname: PortmeshScheduleMismatch
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations: {summary: "the portmesh agents run 2 different schedules (another --round, --rate, --neighbours, --chunk or inventory, or a rolling update): incoming failures are not to be trusted until they agree"}
      - eval_time: 3m
        alertname: PortmeshRequirementFailing
        exp_alerts:
          - exp_labels: {severity: critical, req: k8s.kubelet}
            exp_annotations: {summary: "k8s.kubelet: 2 node-peer directions fail"}
      - eval_time: 3m
        alertname: PortmeshOneWayFlow
        exp_alerts:
          - exp_labels: {severity: warning, instance: "n1:9470", job: portmesh-watch}
            exp_annotations: {summary: "n1:9470: 1 flows fail towards peers whose probes to it arrive (one-way; the agent's events name them)"}
      - eval_time: 3m
        alertname: PortmeshNodeUnreachable
        exp_alerts:
          - exp_labels: {severity: critical, instance: "n2:9470", job: portmesh-watch}
            exp_annotations: {summary: "n2:9470: most peers' probes never arrive"}
      - eval_time: 3m
        alertname: PortmeshAgentAbsent
        exp_alerts:
          - exp_labels: {severity: critical, instance: "n4:9470", job: portmesh-watch}
            exp_annotations: {summary: "n4:9470: the portmesh agent does not answer (node down?)"}
      - eval_time: 4m30s
        alertname: PortmeshRequirementFailing
        exp_alerts: []
      - eval_time: 4m30s
        alertname: PortmeshCoverageLow
        exp_alerts: []
      # an incoming-only failure (a UDP drop: the sender only sees silence) alerts too
      - eval_time: 6m30s
        alertname: PortmeshRequirementFailing
        exp_alerts:
          - exp_labels: {severity: critical, req: calico.vxlan}
            exp_annotations: {summary: "calico.vxlan: 1 node-peer directions fail"}
      - eval_time: 9m
        alertname: PortmeshSweepStale
        exp_alerts: []
"""


def test_manifests_validate_against_the_kubernetes_schemas(tmp_path: Path) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = list(
        yaml.safe_load_all(
            portmesh("watch", "manifests", "--image", "reg.local/portmesh:0.1").stdout
        )
    )
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace", "ServiceAccount", "DaemonSet", "PrometheusRule", "PodMonitor"]
    for d in docs:
        if d["kind"] in ("PrometheusRule", "PodMonitor"):
            continue  # CRDs of the Prometheus operator: the rules are what promtool checks above
        kv.validate(d, "1.30", strict=True)
    ds = docs[2]["spec"]["template"]["spec"]
    assert ds["hostNetwork"] is True and ds["automountServiceAccountToken"] is False
    assert docs[3]["spec"] == manifests.rules()


# ---- the lab with a real Prometheus ------------------------------------------------------------


def _prom_query(base: str, q: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def _wait(base: str, q: str, pred, timeout: float) -> tuple[list[dict], float]:
    t0 = time.monotonic()
    res: list[dict] = []
    while time.monotonic() - t0 < timeout:
        try:
            res = _prom_query(base, q)
            if pred(res):
                return res, time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting on {q!r}: {res}")


def _firing(name: str):
    return lambda res: any(r["metric"].get("alertname") == name for r in res)


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus (Debian package)")
def test_prometheus_sees_a_fault_fire_and_clear(make_lab, tmp_path: Path) -> None:
    from scanner.lab.lab import write_inventory

    lab = make_lab(hosts=4)
    inv = write_inventory(lab)
    secret = tmp_path / "secret"
    secret.write_text("watch-test-secret\n")
    agents = {}
    for h in lab.hosts:
        agents[h.name] = lab.popen(
            h.name,
            [
                sys.executable,
                "-m",
                "scanner",
                "watch",
                "-i",
                str(inv),
                "--as",
                h.name,
                "--secret-file",
                str(secret),
                "--round",
                "2",
                "--metrics",
                f"{h.addr}:{PORT}",
                "-o",
                str(tmp_path / f"{h.name}.ndjson"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
    (tmp_path / "rules.yml").write_text(manifests.rules_text(for_="2s"))
    (tmp_path / "prom.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "rules.yml")],
                "scrape_configs": [
                    {
                        "job_name": "portmesh-watch",
                        "static_configs": [{"targets": [f"{h.addr}:{PORT}" for h in lab.hosts]}],
                    }
                ],
            }
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        pport = s.getsockname()[1]
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prom.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{pport}"
    n1, n2 = lab.hosts[0], lab.hosts[1]
    try:
        # clean: every agent up, at least two rounds in, and nothing failing
        _wait(
            base,
            'min(portmesh_rounds_total) >= 3 and count(up{job="portmesh-watch"} == 1) == 4',
            lambda r: r,
            60,
        )
        res = _prom_query(base, "portmesh_flows_failing > 0")
        events = [
            line
            for h in lab.hosts
            for line in (tmp_path / f"{h.name}.ndjson").read_text().splitlines()
            if '"to":"fail"' in line
        ]
        assert not res, (res, events)
        # the fault: node2 drops kubelet (tcp/10250) from node1 only
        lab.nft(
            n2.name,
            "table inet pmwatch {\n chain input {\n type filter hook input priority 0;\n"
            f" ip saddr {n1.addr} tcp dport 10250 drop\n }}\n}}\n",
        )
        t_fault = time.monotonic()
        _wait(
            base,
            'portmesh_flows_failing{req="k8s.kubelet",direction="outgoing"} > 0',
            lambda r: [x["metric"]["instance"] for x in r] == [f"{n1.addr}:{PORT}"],
            30,
        )
        _wait(
            base,
            'portmesh_flows_failing{req="k8s.kubelet",direction="incoming"} > 0',
            lambda r: [x["metric"]["instance"] for x in r] == [f"{n2.addr}:{PORT}"],
            30,
        )
        seen_in = time.monotonic() - t_fault
        _wait(base, 'ALERTS{alertstate="firing"}', _firing("PortmeshRequirementFailing"), 30)
        res, _ = _wait(base, 'ALERTS{alertstate="firing"}', _firing("PortmeshOneWayFlow"), 30)
        one_way = [r["metric"] for r in res if r["metric"]["alertname"] == "PortmeshOneWayFlow"]
        assert [m["instance"] for m in one_way] == [f"{n1.addr}:{PORT}"]
        # nothing else fails: only the one requirement, only in the one pair
        res = _prom_query(base, "portmesh_flows_failing > 0")
        assert sorted(
            (r["metric"]["instance"], r["metric"]["req"], r["metric"]["direction"]) for r in res
        ) == [
            (f"{n1.addr}:{PORT}", "k8s.kubelet", "outgoing"),
            (f"{n2.addr}:{PORT}", "k8s.kubelet", "incoming"),
        ]
        # the probe budget: at most 20 probes/s per node (10 s window)
        res = _prom_query(base, "max(sum by (instance) (rate(portmesh_probes_total[10s])))")
        assert float(res[0]["value"][1]) <= 20.0, res
        # the per-pair detail: `portmesh report` reads the event streams (latest state wins)
        files = [str(tmp_path / f"{h.name}.ndjson") for h in lab.hosts]
        rep = portmesh("report", *files)
        assert rep.returncode == 1, rep.stdout + rep.stderr
        assert "k8s.kubelet" in rep.stdout and n2.name in rep.stdout, rep.stdout
        ecs = [
            json.loads(x) for x in portmesh("report", "--format", "ecs", *files).stdout.splitlines()
        ]
        bad = [e for e in ecs if e["event"]["outcome"] == "failure"]
        assert bad and {e["event"]["dataset"] for e in bad} == {"portmesh.watch"}
        assert {e["rule"]["id"] for e in bad} == {"k8s.kubelet"}, bad
        # lift it: the metric and the alerts clear
        lab.run(n2.name, ["nft", "delete", "table", "inet", "pmwatch"], check=True)
        _wait(base, "sum(portmesh_flows_failing)", lambda r: r and float(r[0]["value"][1]) == 0, 30)
        _wait(base, 'ALERTS{alertstate="firing"}', lambda r: not r, 30)
        rep = portmesh("report", *files)
        assert rep.returncode == 0, rep.stdout + rep.stderr
        # a dead node: its agent stops; the absent-agent alert names it
        agents[lab.hosts[3].name].terminate()
        t_dead = time.monotonic()
        res, _ = _wait(
            base, 'ALERTS{alertstate="firing",alertname="PortmeshAgentAbsent"}', lambda r: r, 60
        )
        assert res[0]["metric"]["instance"] == f"{lab.hosts[3].addr}:{PORT}"
        dead_in = time.monotonic() - t_dead
        start = json.loads((tmp_path / f"{n1.name}.ndjson").read_text().splitlines()[0])
        print(
            f"fault seen in {seen_in:.1f}s (round {start['round_seconds']}s,"
            f" {start['rounds_per_sweep']} round(s) a sweep); dead node alert in {dead_in:.1f}s"
        )
        assert dead_in < 60
    finally:
        prom.terminate()
        for p in agents.values():
            p.terminate()
        for p in [prom, *agents.values()]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.lab
def test_udp_drop_fails_incoming_and_a_late_agent_makes_no_false_failure(
    make_lab, tmp_path: Path
) -> None:
    """A UDP drop is silence to the sender (unknown), so the receiver must name it (incoming
    fail); an agent started two rounds late must not make its peers report failures, nor one
    killed mid-round (SIGKILL, its visits cut short) and restarted at the start of the round
    after next (its first probes arrive before its peers judge the round it was down)."""
    from scanner.lab.lab import write_inventory

    lab = make_lab(hosts=4)
    inv = write_inventory(lab)
    secret = tmp_path / "secret"
    secret.write_text("watch-test-secret\n")
    n1, n2, n3, n4 = lab.hosts

    def start(h, tag=""):
        return lab.popen(
            h.name,
            [sys.executable, "-m", "scanner", "watch", "-i", str(inv), "--as", h.name,
             "--secret-file", str(secret), "--round", "2", "--metrics", f"{h.addr}:{PORT}",
             "-o", str(tmp_path / f"{h.name}{tag}.ndjson")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip

    lab.nft(n3.name, "table inet pmwatch {\n chain input {\n type filter hook input priority 0;\n"
                     f" ip saddr {n2.addr} udp dport 4789 drop\n }}\n}}\n")  # fmt: skip
    agents = [start(h) for h in (n1, n2, n3)]
    try:
        time.sleep(12)
        agents.append(start(n4))  # late: its peers have expected its probes for rounds already
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            try:
                body = (
                    urllib.request.urlopen(f"http://{n3.addr}:{PORT}/metrics", timeout=3)
                    .read()
                    .decode()
                )
            except OSError:
                body = ""
            if 'portmesh_flows_failing{req="calico.vxlan",direction="incoming"} 1' in body:
                break
            time.sleep(1)
        assert 'portmesh_flows_failing{req="calico.vxlan",direction="incoming"} 1' in body, body
        period = json.loads((tmp_path / f"{n1.name}.ndjson").read_text().splitlines()[0])[
            "round_seconds"
        ]

        def at_phase(ph: float) -> None:  # sleep until the next time a round is ph through
            now = time.time()
            t = (now // period + ph) * period
            time.sleep(t - now if t > now else t + period - now)

        at_phase(0.25)  # n4 is probing its peers (a round's probes take under half of it)
        agents[3].kill()
        agents[3].wait(timeout=15)
        time.sleep(period)
        at_phase(0.0)  # the round after next
        agents[3] = start(n4, ".restarted")
        time.sleep(2.5 * period)  # its peers judge the round it was down, then its first round
    finally:
        for p in agents:
            p.terminate()
        for p in agents:
            p.wait(timeout=15)
    fails = [
        json.loads(line)
        for f in sorted(tmp_path.glob("*.ndjson"))
        for line in f.read_text().splitlines()
        if '"to":"fail"' in line
    ]
    # the one drop, named by the receiver; nothing about the late or restarted agent, nothing else
    assert {(f["node"], f["peer"], f["req"], f["direction"]) for f in fails} == {
        (n3.name, n2.name, "calico.vxlan", "incoming")
    }, fails
