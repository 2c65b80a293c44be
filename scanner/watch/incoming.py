"""The incoming side of `portmesh watch`: did a scheduled sender's probes arrive? (pure)

The agent feeds it one judged visit at a time: for a (requirement, sender) key, the ports our
responder holds that the sender should have probed in the judged round (``witnessable``), the
ones whose probe arrived (``got``), and whether the sender was heard from at all lately
(``alive``). It answers with the key's new state, or None for "no change".

Two things look like a drop and are not, so a key fails only after ``misses_to_fail`` judged
visits in a row had a port missing (all of them or some):

- the sender's visit was cut short: its agent was stopped mid-round, or starved of CPU;
- our responder came up while the sender was probing us: the probes before it were refused
  by the kernel. ``judgeable`` keeps such a round out of the judgment altogether.

"In a row" means with the sender running each of those rounds (``alive``): a visit on which
it was not ends the run, so a visit cut short by a kill and the first visit of the restarted
agent are not two misses. Whether it ran the judged round is told by when its probes arrived
(``Arrivals``, per round of arrival): within the round, or in the last ``ALIVE_EARLY`` of the
round before (a clock running ahead). Not later: a restarted agent's first probes, which arrive
before we judge the round it was down, are its next round's; and not earlier: an agent killed
after half its round left probes of ports it probes every round, which count as arrived for a
clock half a round ahead (``earliest``) but are no sign that it ran the judged round.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from scanner.watch.schedule import LAST_PROBE

MISSES_TO_FAIL = 2
# Is the sender running the judged round at all? Heard from no earlier than this fraction of a
# round before it: a round's probes leave within its first schedule.LAST_PROBE, so a probe in
# the rest of the round before is the judged round's from a clock running ahead, never the round
# before's from an agent killed since (whose ports probed every round would otherwise count as
# arrived). A sender whose clock runs further ahead than that and whose whole visit arrives
# early is not judged (no verdict), never failed.
ALIVE_EARLY = round(1 - LAST_PROBE, 9)  # 0.2

Key = tuple[str, str]  # (requirement id, sender name)
Port = int | None


def judgeable(rnd: int, period: float, up_since: float) -> bool:
    """Can round ``rnd`` be judged by a responder that has listened since ``up_since``?

    A sender's round-``rnd`` probe leaves at or after the round's start by its own clock, and
    clocks that NTP keeps within half a round of ours may start it half a round early: the
    round is judged only when all of that window lies after our responder came up.
    """
    return up_since <= earliest(rnd, period)


def earliest(rnd: int, period: float) -> float:
    """The earliest time (our clock) a probe of round ``rnd`` can arrive."""
    return rnd * period - period / 2


class Arrivals:
    """When probes arrived, per key (a sender), kept per round of arrival by our clock: the
    last arrival in each round, so a later round's probe never stands in for an earlier round's
    (O(1) per probe; ``prune`` every round bounds it to a few rounds)."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.at: dict[Hashable, dict[int, float]] = {}

    def add(self, key: Hashable, now: float) -> None:
        b = int(now // self.period)
        rounds = self.at.get(key)
        if rounds is None:
            self.at[key] = {b: now}
        else:
            rounds[b] = now

    def arrived(self, key: Hashable, rnd: int, early: float = 0.5) -> bool:
        """Did a probe arrive in round ``rnd``'s window: from ``early`` of a round before it
        (a sender's clock may run ahead: half a round, ``earliest``) to its end by our clock?"""
        rounds = self.at.get(key)
        if not rounds:
            return False
        if rnd in rounds:
            return True
        return rounds.get(rnd - 1, float("-inf")) >= (rnd - early) * self.period

    def prune(self, before: int) -> None:
        """Forget arrivals of rounds before ``before``."""
        for key in list(self.at):
            rounds = self.at[key]
            for b in [b for b in rounds if b < before]:
                del rounds[b]
            if not rounds:
                del self.at[key]


class IncomingJudge:
    """Per (requirement, sender): consecutive visits with a port missing, and the ports that
    fail now (a long range is probed a window at a time, so a failing port keeps its key
    failing until a later visit sees that very port arrive)."""

    def __init__(self, misses_to_fail: int = MISSES_TO_FAIL) -> None:
        if misses_to_fail < 1:
            raise ValueError("misses_to_fail must be at least 1")
        self.misses_to_fail = misses_to_fail
        self.misses: dict[Key, int] = {}
        self.bad: dict[Key, dict[Port, None]] = {}

    def judge(
        self, key: Key, witnessable: Sequence[Port], got: Sequence[Port], alive: bool
    ) -> tuple[str, list[Port]] | None:
        """("pass", []) / ("fail", failing ports) when the key has a verdict now, None when
        this visit says nothing (the sender was not heard from in the round, or a first miss).
        ``alive`` is the stricter test (``ALIVE_EARLY``): a port can count as arrived from a
        probe before the round while the sender is not known to have run it."""
        if not alive:
            # nothing at all from that sender lately: it is down, late or probing from another
            # address. That is the node's story (silent peers, the agent-absent alert). It also
            # ends a run of misses: a miss just before it was the sender going down.
            self.misses.pop(key, None)
            return None
        bad = self.bad.get(key, {})
        for p in got:
            bad.pop(p, None)
        arrived = set(got)
        missing = [p for p in witnessable if p not in arrived]
        if missing:
            n = self.misses[key] = self.misses.get(key, 0) + 1
            if n < self.misses_to_fail:
                # a first miss can be a visit the sender cut short: wait for the next one
                if bad:
                    self.bad[key] = bad
                    return "fail", list(bad)
                self.bad.pop(key, None)
                return None
            bad.update(dict.fromkeys(missing))
        else:
            self.misses.pop(key, None)
        if bad:
            self.bad[key] = bad
            return "fail", list(bad)
        self.bad.pop(key, None)
        return "pass", []
