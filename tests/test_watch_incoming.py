"""The incoming judgment of `portmesh watch` (scanner.watch.incoming), table-driven: a key
fails only after visits in a row with a port missing, a half-arrived visit counts as a miss
and not as a drop, and a round that began before the responder listened is not judged."""

from __future__ import annotations

import pytest

from scanner.watch.incoming import ALIVE_EARLY, Arrivals, IncomingJudge, judgeable

K = ("k8s.nodeport", "node2")
W1 = [30000, 30001, 30002, 30003]
W2 = [30004, 30005, 30006, 30007]


def run(visits, misses_to_fail=2):
    """Feed (witnessable, got, alive) visits to one key; the answers, in order."""
    judge = IncomingJudge(misses_to_fail)
    return [judge.judge(K, w, g, a) for w, g, a in visits]


@pytest.mark.parametrize(
    ("visits", "answers"),
    [
        # every port arrived: pass
        ([(W1, W1, True)], [("pass", [])]),
        # the late-agent case: a visit half-arrived (the sender was probing while our responder
        # came up, or it was stopped mid-round) and the next visit is whole: never a failure
        ([(W1, W1[2:], True), (W2, W2, True)], [None, ("pass", [])]),
        # nothing arrived once, then whole: no failure either
        ([(W1, [], True), (W2, W2, True)], [None, ("pass", [])]),
        # a real drop of the whole range: the second visit in a row fails, naming its ports
        ([(W1, [], True), (W2, [], True)], [None, ("fail", W2)]),
        # a drop of part of the range, seen on two visits in a row: only the missing ports
        ([(W1, W1[:2], True), (W2, W2[:3], True)], [None, ("fail", [30007])]),
        # a sender not heard from at all is the node's story: no answer, and no miss counted
        ([(W1, [], False), (W2, [], True), (W1, [], False)], [None, None, None]),
        # a visit cut short (SIGKILL mid-round), the sender down for a visit, then the first visit
        # of the restarted agent half-arrives (it started late in the round): the silent visit
        # ends the run of misses, so no failure
        ([(W1, W1[:2], True), (W2, [], False), (W1, W1[:1], True)], [None, None, None]),
        # ... and a real drop after such a restart still fails on its second miss in a row
        (
            [(W1, W1[:2], True), (W2, [], False), (W1, [], True), (W2, [], True)],
            [None, None, None, ("fail", W2)],
        ),
        # the agent-killed-after-half-the-round case: a visit cut short, then the next visit
        # "arrived" only from the dead agent's last probes of ports probed every round (they
        # count for a clock running ahead) while the sender was not heard in the round: no miss
        ([(W1, W1[:2], True), (W2, W2[:1], False)], [None, None]),
        # a whole visit between two misses resets the count
        ([(W1, [], True), (W2, W2, True), (W1, [], True)], [None, ("pass", []), None]),
        # a failing port keeps the key failing until that very port arrives again
        (
            [(W1, [], True), (W1, W1[1:], True), (W2, W2, True), (W1, W1, True)],
            [None, ("fail", [30000]), ("fail", [30000]), ("pass", [])],
        ),
        # a third miss in a row adds its ports to the failure
        (
            [(W1, [], True), (W1, [], True), (W2, W2[1:], True)],
            [None, ("fail", W1), ("fail", [*W1, 30004])],
        ),
        # while failing, a first miss after a whole visit leaves the old failure standing
        (
            [(W1, [], True), (W1, [], True), (W2, W2, True), (W2, W2[1:], True)],
            [None, ("fail", W1), ("fail", W1), ("fail", W1)],
        ),
    ],
)
def test_incoming_judgment(visits, answers) -> None:
    assert run(visits) == answers


def test_one_miss_fails_when_told_so() -> None:
    assert run([(W1, W1[:1], True)], misses_to_fail=1) == [("fail", W1[1:])]
    with pytest.raises(ValueError):
        IncomingJudge(0)


@pytest.mark.parametrize(
    ("rnd", "up_since", "ok"),
    [
        (10, 0.0, True),  # up long before the round
        (10, 142.5, True),  # up exactly when a fast clock's round-10 probe can first arrive
        (10, 142.6, False),  # up after that: an early probe may have been refused
        (10, 151.0, False),  # up mid-round: the late-agent case
        (11, 151.0, True),  # the round after is judged
    ],
)
def test_a_round_before_the_responder_listened_is_not_judged(rnd, up_since, ok) -> None:
    assert judgeable(rnd, 15.0, up_since) is ok


P = 15.0


@pytest.mark.parametrize(
    ("arrivals", "rnd", "ok"),
    [
        ([10 * P + 3], 10, True),  # in the round
        ([10 * P - 7.5], 10, True),  # half a round early: a sender whose clock runs ahead
        ([10 * P - 7.6], 10, False),  # earlier: the round before's probe
        # the restarted-agent case: the probe arrived after round 10 ended, so it is round 11's
        # (a restarted sender's first round), no sign that the sender ran round 10
        ([11 * P + 1], 10, False),
        # a sender heard every round: round 11's arrival does not hide round 10's
        ([10 * P + 3, 11 * P + 3], 10, True),
        ([10 * P + 3, 11 * P + 3], 11, True),
        ([], 10, False),
    ],
)
def test_a_sender_ran_a_round_if_heard_in_it(arrivals, rnd, ok) -> None:
    a = Arrivals(P)
    for t in arrivals:
        a.add("k", t)
    assert a.arrived("k", rnd) is ok


@pytest.mark.parametrize(
    ("t", "ok"),
    [
        (10 * P - 3.0, True),  # the last fifth of the round before: a clock running ahead
        (10 * P - 3.1, False),  # earlier: the round before's probe, from an agent killed since
        (10 * P + 14.0, True),
    ],
)
def test_a_sender_is_alive_for_a_round_from_a_fifth_of_a_round_before(t, ok) -> None:
    a = Arrivals(P)
    a.add("src", t)
    assert a.arrived("src", 10, ALIVE_EARLY) is ok


def test_arrivals_are_pruned_by_round() -> None:
    a = Arrivals(P)
    a.add("old", 8 * P + 1)
    a.add("k", 9 * P + 14)
    a.add("k", 10 * P + 1)
    a.prune(10)
    assert a.at == {"k": {10: 10 * P + 1}}
    assert not a.arrived("old", 8) and a.arrived("k", 10)
