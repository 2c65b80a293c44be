"""`portmesh watch` on an N-host lab: false failures on a clean lab over a soak, time until a
blocked port shows, and the probe rate measured on the wire (an nftables counter).

    sudo python benchmarks/watch.py --hosts 20 --soak 600

Prints one line per phase; exits 1 if the clean soak saw any failure.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scanner.lab.lab import write_inventory  # noqa: E402
from scanner.lab.netns import Lab  # noqa: E402

PORT = 9470


def metrics(addr: str) -> str:
    return urllib.request.urlopen(f"http://{addr}:{PORT}/metrics", timeout=5).read().decode()


def value(body: str, pattern: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" (\S+)", body))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--soak", type=float, default=600.0, help="clean-lab seconds")
    ap.add_argument("--name", default="bwatch")
    args = ap.parse_args()
    Lab.cleanup(args.name)
    lab = Lab.up(args.hosts, args.name)
    agents = []
    try:
        inv = write_inventory(lab)
        secret = lab.state_dir() / "watch.secret"
        secret.write_text("bench-watch\n")
        out = lab.state_dir()
        for h in lab.hosts:
            agents.append(
                lab.popen(
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
                        "--metrics",
                        f"{h.addr}:{PORT}",
                        "-o",
                        str(out / f"{h.name}.watch.ndjson"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(out / f"{h.name}.watch.err").open("w"),
                    cwd=ROOT,
                )
            )
        n1, n2 = lab.hosts[0], lab.hosts[1]
        # count every probe node1 sends (TCP SYN, UDP, ICMP echo) on the wire
        lab.nft(
            n1.name,
            "table inet pmcount {\n chain output {\n type filter hook output priority 0;\n"
            f" ip daddr {lab.subnet} tcp flags syn / syn,ack counter\n"
            f" ip daddr {lab.subnet} meta l4proto {{ udp, icmp }} counter\n }}\n}}\n",
        )
        deadline = time.time() + 120
        files = [out / f"{h.name}.watch.ndjson" for h in lab.hosts]
        while not all(f.exists() and f.stat().st_size for f in files):
            if time.time() > deadline or any(a.poll() is not None for a in agents):
                print(
                    "agents did not start:",
                    [(out / f"{h.name}.watch.err").read_text()[-300:] for h in lab.hosts],
                )
                return 1
            time.sleep(0.5)
        start = json.loads((out / f"{n1.name}.watch.ndjson").read_text().splitlines()[0])
        sweep = start["round_seconds"] * start["rounds_per_sweep"]
        print(
            f"hosts {args.hosts}: round {start['round_seconds']} s, {start['rounds_per_sweep']}"
            f" rounds a sweep = {sweep:.0f} s; soak {args.soak:.0f} s"
        )
        t0 = time.time()
        time.sleep(args.soak)
        fails = sum(
            line.count('"to":"fail"')
            for h in lab.hosts
            for line in (out / f"{h.name}.watch.ndjson").read_text().splitlines()
        )
        failing = sum(value(metrics(h.addr), r"portmesh_flows_failing\{[^}]*\}") for h in lab.hosts)
        ruleset = lab.run(
            n1.name, ["nft", "list", "table", "inet", "pmcount"], capture_output=True, text=True
        ).stdout
        packets = sum(int(x) for x in re.findall(r"counter packets (\d+)", ruleset))
        elapsed = time.time() - t0
        print(
            f"clean soak: {fails} fail events, {failing:.0f} failing now; node1 sent {packets} probe"
            f" packets in {elapsed:.0f} s = {packets / elapsed:.1f}/s (budget 20/s)"
        )
        lab.nft(
            n2.name,
            "table inet pmfault {\n chain input {\n type filter hook input priority 0;\n"
            f" ip saddr {n1.addr} tcp dport 10250 drop\n }}\n}}\n",
        )
        tf = time.time()
        while time.time() - tf < 3 * sweep + 60:
            if (
                value(
                    metrics(n1.addr),
                    r'portmesh_flows_failing\{req="k8s.kubelet",direction="outgoing"\}',
                )
                > 0
            ):
                break
            time.sleep(1)
        seen = time.time() - tf
        print(
            f"blocked port (node2 drops tcp/10250 from node1): outgoing failing after {seen:.0f} s"
            f" (one sweep = {sweep:.0f} s)"
        )
        return 1 if fails or failing else 0
    finally:
        for a in agents:
            a.terminate()
        for a in agents:
            try:
                a.wait(timeout=10)
            except subprocess.TimeoutExpired:
                a.kill()
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
