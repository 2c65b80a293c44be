"""The far kernel's ICMP error rate limit (net.ipv4.icmp_ratelimit, left at its default here)
answers ~6 closed UDP ports at once, then one per second: the engine's per-destination pacing,
switched on by the first unanswered attempt, must still classify every closed port."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest


@pytest.mark.lab
def test_closed_udp_ports_beyond_the_icmp_burst_are_all_closed(make_lab) -> None:
    lab = make_lab(hosts=2)
    far = lab.host("node2").addr
    limit = lab.run(
        "node2", ["cat", "/proc/sys/net/ipv4/icmp_ratelimit"], capture_output=True, text=True
    )
    assert limit.stdout.strip() != "0", "the test needs the kernel's default ICMP rate limit"
    r = lab.run(
        "node1",
        [sys.executable, "-m", "scanner", "scan", far, "-p", "U:40000-40011", "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    results = [x for x in recs if x["type"] == "result"]
    assert len(results) == 12
    states = Counter((x["state"], x["reason"]) for x in results)
    assert states == {("closed", "port-unreach"): 12}, states
    # without pacing the ports past the burst would have been silent: some needed a retry
    assert any(x["attempts"] > 1 for x in results)
