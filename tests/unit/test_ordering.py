"""The ordering rule (relay.ordering.plan) over every mix of results in small batches."""

from __future__ import annotations

import itertools

import pytest
from unit import fakes

from relay import envelope, ordering, publisher

S = publisher.Status
RESULTS = {
    S.ACKED: publisher.ACKED,
    S.POISON: publisher.Result(S.POISON, "too_large", "big"),
    S.HOLD: publisher.Result(S.HOLD, "unknown_topic", "missing"),
    S.RETRY: publisher.Result(S.RETRY, "kafka", "timeout"),
    S.NOT_SENT: publisher.NOT_SENT,
}


def _batch(pattern: str) -> list[envelope.Row]:
    """Rows in id order; the pattern's letters are their aggregates (a, b)."""
    store = fakes.FakeStore()
    return [store.insert(letter) for letter in pattern]


def _invariants(
    rows: list[envelope.Row], statuses: tuple[S, ...], policy: str, plan: ordering.Plan
) -> None:
    published = {r.id for r in plan.published}
    failed = {r.id for r, _, _ in plan.failed}
    parked = set(plan.parked)
    retried = {i for i, _ in plan.retried}
    untouched = set(plan.untouched)
    # every row gets exactly one fate
    fates = [published, failed, parked, retried, untouched]
    assert sum(len(f) for f in fates) == len(rows)
    assert set().union(*fates) == {r.id for r in rows}
    for key in {r.aggregate for r in rows}:
        mine = [(r, s) for r, s in zip(rows, statuses, strict=True) if r.aggregate == key]
        broke = False
        for row, status in mine:
            if broke:
                # after a break nothing of the aggregate is published or failed
                assert row.id not in published | failed | retried
            else:
                if status is S.ACKED:
                    assert row.id in published
                if status is S.POISON:
                    assert row.id in failed
            if status is S.POISON and policy == "skip":
                continue  # a gap, documented: the aggregate does not break
            broke = broke or status is not S.ACKED
    kinds = sorted(h.kind for h in plan.holds)
    assert len({h.key for h in plan.holds}) == len(plan.holds)  # one hold per aggregate
    assert kinds.count("poison") <= (len(failed) if policy == "hold" else 0)


@pytest.mark.parametrize("policy", ["hold", "skip"])
@pytest.mark.parametrize("pattern", ["aaa", "abab", "aabb", "abba"])
def test_every_mix_of_results(pattern: str, policy: str) -> None:
    rows = _batch(pattern)
    for statuses in itertools.product(list(S), repeat=len(rows)):
        results = {r.id: RESULTS[s] for r, s in zip(rows, statuses, strict=True)}
        plan = ordering.plan(rows, results, policy)
        _invariants(rows, statuses, policy, plan)


def test_acked_after_a_timeout_is_not_marked() -> None:
    a1, a2, b1 = _batch("aab")
    results = {a1.id: RESULTS[S.RETRY], a2.id: publisher.ACKED, b1.id: publisher.ACKED}
    plan = ordering.plan([a1, a2, b1], results, "hold")
    assert [r.id for r in plan.published] == [b1.id]
    assert plan.retried == [(a1.id, "kafka: timeout")]
    assert plan.untouched == [a2.id]
    assert plan.broken


def test_poison_under_hold_parks_the_rest_of_its_aggregate() -> None:
    a1, b1, a2, a3 = _batch("abaa")
    results = {a1.id: publisher.ACKED, b1.id: publisher.ACKED, a2.id: RESULTS[S.POISON]}
    plan = ordering.plan([a1, b1, a2, a3], results, "hold")
    assert [r.id for r in plan.published] == [a1.id, b1.id]
    assert [r.id for r, _, _ in plan.failed] == [a2.id]
    assert plan.parked == [a3.id]
    (hold,) = plan.holds
    assert (hold.kind, hold.failed_id, hold.key) == ("poison", a2.id, a2.aggregate)
    assert not plan.broken


def test_poison_under_skip_leaves_a_gap() -> None:
    a1, a2 = _batch("aa")
    plan = ordering.plan([a1, a2], {a1.id: RESULTS[S.POISON], a2.id: publisher.ACKED}, "skip")
    assert [r.id for r in plan.published] == [a2.id]
    assert plan.holds == []


def test_operational_error_holds_only_its_aggregate() -> None:
    a1, b1, a2 = _batch("aba")
    results = {a1.id: RESULTS[S.HOLD], b1.id: publisher.ACKED}
    plan = ordering.plan([a1, b1, a2], results, "hold")
    assert [r.id for r in plan.published] == [b1.id]
    assert plan.parked == [a1.id, a2.id]
    assert [h.kind for h in plan.holds] == ["timed"]
    assert plan.failed == []  # an operator's mistake never fails a row


def test_aggregate_is_type_and_id() -> None:
    store = fakes.FakeStore()
    order = store.insert("42", aggregate_type="order")
    user = store.insert("42", aggregate_type="user")
    plan = ordering.plan(
        [order, user], {order.id: RESULTS[S.RETRY], user.id: publisher.ACKED}, "hold"
    )
    assert [r.id for r in plan.published] == [user.id]
