"""The incoming judgment of `portmesh watch` (scanner.watch.incoming), table-driven: a key
fails only after visits in a row with a port missing, a half-arrived visit counts as a miss
and not as a drop, and a round that began before the responder listened is not judged."""

from __future__ import annotations

import pytest

from scanner.watch.incoming import IncomingJudge, judgeable

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
