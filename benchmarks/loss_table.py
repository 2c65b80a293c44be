"""Loss table for the README: a default scan of 30000-32767 against a responder host at 0-40% random
SYN loss (nftables numgen), 10 sweeps per row, syn and connect, default and --retries 0.
Run as root: python benchmarks/loss_table.py"""

import json
import statistics
import subprocess
import sys
import time

from scanner.lab.netns import Lab

lab = Lab.up(2, "losstab")
PM = [sys.executable, "-m", "scanner"]
try:
    n2 = lab.host("node2")
    p = lab.popen(
        "node2",
        PM + ["respond", "-p", "30000-32767", "--ttl", "600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    p.stdout.readline()
    print(
        "| method | settings | SYN loss | sweeps with a miss | ports missed (max/sweep) | retries (median) | loss_observed (median) | wall s (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in ("syn", "connect"):
        for extra in ([], ["--retries", "0"]):
            for pct in (0, 5, 20, 40):
                lab.nft(
                    "node2",
                    f"table inet loss {{\n chain input {{\n type filter hook input priority 0;\n tcp flags syn tcp dport 30000-32767 numgen random mod 100 < {pct} drop\n }}\n}}\n",
                ) if pct else lab.run(
                    "node2", ["nft", "delete", "table", "inet", "loss"], capture_output=True
                )
                miss = []
                rts = []
                lo = []
                walls = []
                for _ in range(10):
                    t = time.perf_counter()
                    r = lab.run(
                        "node1",
                        PM + ["scan", n2.addr, "-p", "30000-32767", "--method", method, *extra],
                        capture_output=True,
                        text=True,
                    )
                    walls.append(time.perf_counter() - t)
                    recs = [json.loads(x) for x in r.stdout.splitlines()]
                    s = recs[-1]
                    miss.append(
                        sum(1 for x in recs if x["type"] == "result" and x["state"] != "open")
                    )
                    rts.append(s["retries"])
                    lo.append(s["loss_observed"])
                bad = sum(1 for m in miss if m)
                print(
                    f"| {method} | {' '.join(extra) or 'default'} | {pct}% | {bad}/10 | {sum(miss)} ({max(miss)}) | {statistics.median(rts):.0f} | {statistics.median(lo):.3f} | {statistics.median(walls):.2f} |",
                    flush=True,
                )
                lab.run("node2", ["nft", "delete", "table", "inet", "loss"], capture_output=True)
    p.terminate()
    p.wait()
finally:
    lab.down()
