"""Verdicts: does a probe's state mean the flow's requirement is met? (pure)

``expect`` says what the check is for:
  reachable  before install (default): the packets must get through. An RST or an ICMP
             port-unreachable from the destination proves they did ("nothing listens yet").
  listening  after install: the service must answer; closed is a fail too.
``responder`` says whether our responders run on the destination (a scan secret was given):
then every TCP/UDP port should be answered by them, and ``closed`` means something else (a
firewall's reject) answered instead: a fail.

  state           tcp/udp reachable   with responder   listening     icmp    ipip
  open            pass                pass             pass          pass    pass
  closed          pass                fail             fail          -       pass (proto-unreach:
                                                                              it arrived)
  filtered        fail                fail             fail          fail    fail
  open|filtered   udp: unknown        fail             unknown       -       fail
  error           unknown (the probe could not be made: privileges, interrupted, resources)

IP-in-IP: a Linux host without a tunnel endpoint answers protocol-unreachable, so silence means
the packet was dropped on the way (fail); an echo reply through a tunnel is open (pass).
"""

from __future__ import annotations

EXPECTS = ("reachable", "listening")


def verdict(proto: str, state: str, expect: str = "reachable", responder: bool = False) -> str:
    if state == "error":
        return "unknown"
    if state == "open":
        return "pass"
    if state == "filtered":
        return "fail"
    if proto == "ipip":
        return "pass" if state == "closed" else "fail"
    if proto == "icmp":
        return "fail"
    if state == "closed":
        return "pass" if expect == "reachable" and not responder else "fail"
    if state == "open|filtered":
        return "fail" if responder and proto == "udp" else "unknown"
    return "unknown"
